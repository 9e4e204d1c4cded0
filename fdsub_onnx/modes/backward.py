"""Per-instance backward passes: the `local` filters (exact input gradients) and the deconvnet projections.

For one instance (image, neuron k, output position q) a ReLU/MaxPool network is linear around
the image: response = <D_local, image> + beta_local. ``D_local`` is the input gradient, got here
by one backward pass per instance through the forward activations that onnxruntime captured,
and ``beta_local`` collects every bias the active paths carry (so the identity is a real check,
not a definition). The deconvnet (Zeiler & Fergus) runs the same pass with ReLU applied to the
backward signal instead of the forward on/off mask; MaxPool switches come from the forward pass.

Each rule maps (node, forward values, output gradient) to input gradients and the bias the node
adds, batched over M instances: arrays are [M, ...]. AveragePool windows that overlap the
padding with count_include_pad=0 are treated as interior ones (a border effect only).
"""

from __future__ import annotations

import numpy as np

from ..compose.backend import array_module, get_backend, resolve_device
from ..errors import FdsubError, NotDecodable
from ..graph.geometry import Window
from ..graph.model import ancestors, attributes
from ..graph.ranges import reduce_axes, slice_ranges, split_ranges
from ..runtime.session import Forward


def instance_gradients(model, target: str, images: np.ndarray, neurons, positions, rule: str = "local",
                       forward: Forward | None = None, device="cpu"):
    """Input gradients [M, C, H, W] and local biases [M] of neuron ``neurons[m]`` at ``positions[m]`` on ``images[m]``.

    ``forward`` (from ``forward_for``) reuses one onnxruntime session across calls. On ``device="gpu"``
    the pass runs in CuPy and returns CuPy arrays.
    """
    if rule not in BACKWARD_MODES:
        raise FdsubError(f"backward rule must be one of {', '.join(BACKWARD_MODES)}, got {rule!r}")
    rules = BACKWARD_MODES[rule]
    device = resolve_device(device)
    backend = get_backend(device.backend)
    nodes = ancestors(model, [target])
    forward = forward if forward is not None else forward_for(model, target, device)
    values = {name: backend.asarray(value, np.float64) for name, value in forward(images).items()}
    seed = backend.zeros(values[target].shape, np.float64)
    m = np.arange(len(images))
    if seed.ndim == 4:
        seed[m, np.asarray(neurons), positions[:, 0], positions[:, 1]] = 1.0
    else:
        seed.reshape(len(images), -1)[m, np.asarray(neurons)] = 1.0
    grads, bias = {target: seed}, backend.zeros((len(images),), np.float64)
    for node in reversed(nodes):
        outs = [grads.pop(name, None) if name else None for name in node.output]
        if all(g is None for g in outs):
            continue
        grad = outs[0]
        if node.op_type in MULTI_OUTPUT:  # one gradient per output (zeros for an output nothing reads)
            grad = [g if g is not None else backend.zeros(values[name].shape, np.float64)
                    for name, g in zip(node.output, outs)]
        elif grad is None:
            raise FdsubError(f"{rule} mode: {node.op_type} node {model.node_name(node)!r}: only its first output "
                             "can be followed")
        step = rules.get(node.op_type)
        if node.op_type in NO_LOCAL_RULE:
            raise FdsubError(f"{rule} mode: {node.op_type} node {model.node_name(node)!r}: "
                             f"{NO_LOCAL_RULE[node.op_type]}")
        if step is None:
            raise FdsubError(f"{rule} mode does not support op {node.op_type} (node {model.node_name(node)!r}) yet")
        is_data = [bool(name) and name not in model.constants for name in node.input]
        ins = [(values[name] if data else model.constants.get(name)) if name else None
               for name, data in zip(node.input, is_data)]
        try:
            in_grads, added = step(node, ins, is_data, values[node.output[0]], grad)
        except NotDecodable as exc:
            raise FdsubError(f"{rule} mode: {node.op_type} node {model.node_name(node)!r}: {exc}") from None
        bias += added
        for name, g in zip(node.input, in_grads):
            if g is not None and name and name not in model.constants:
                grads[name] = grads[name] + g if name in grads else g
    if model.input_name not in grads:
        raise FdsubError(f"layer {target!r} does not depend on the image input")
    return grads[model.input_name], bias


def deconvnet_is_local(model, target: str) -> bool:
    """Whether every op below ``target`` has one rule in both tables (no rectifier): deconvnet then projects what
    ``local`` does, with bias 0, and one backward pass serves both."""
    return all(DECONVNET_RULES.get(n.op_type) is LOCAL_RULES.get(n.op_type) for n in ancestors(model, [target]))


def forward_for(model, target: str, device="cpu") -> Forward:
    """The onnxruntime session computing every tensor below ``target`` (the forward values a backward pass reads)."""
    return Forward(model, [o for n in ancestors(model, [target]) for o in n.output if o], device)


def instances_per_batch(model, target: str, most: int, backend) -> int:
    """How many instances one backward pass to ``target`` takes: at most ``most``, fewer where a quarter of the
    memory left (``backend.free_bytes``) cannot hold them. A quarter: the report runs two passes at once.

    Per instance the pass holds every forward value below ``target`` (float32 from onnxruntime, then a float64
    copy) and the gradients, plus temporaries of the size of the largest tensor: VGG19 at 224 needs about
    700 MB per instance, so a fixed batch of 16 ran a 24 GB machine out of memory.
    """
    sizes = [int(np.prod(model.shapes[o][1:])) for n in ancestors(model, [target]) for o in n.output
             if o and o in model.shapes]
    per_instance = 16 * sum(sizes) + 64 * max(sizes, default=0)
    return int(max(1, min(most, backend.free_bytes() // 4 // max(per_instance, 1))))


def _none_added(grad):
    return array_module(grad).zeros(len(grad))


def _on(grad, constant):
    """A constant (NumPy, from the model) as float64 on the array module of ``grad``."""
    return array_module(grad).asarray(constant, dtype=np.float64)


# ---- the rules: (node, inputs, is_data, output, grad) -> ([input grads], bias added [M]) -------------
def _conv(node, ins, is_data, out, grad):
    x, w = ins[0], _on(grad, ins[1])
    attrs = attributes(node)
    gx = _transposed(grad, w, int(attrs.get("group", 1)), Window.of(attrs, x.shape[2:], w.shape[2:]), x.shape)
    has_bias = len(ins) > 2 and ins[2] is not None
    added = array_module(grad).einsum("mkhw,k->m", grad, _on(grad, ins[2])) if has_bias else _none_added(grad)
    return [gx, None, None][: len(ins)], added


def _avgpool(node, ins, is_data, out, grad):
    x = ins[0]
    window = Window.of(attributes(node), x.shape[2:])
    weight = array_module(grad).full((x.shape[1], 1, *window.kernel), 1.0 / np.prod(window.kernel))  # interior windows
    return [_transposed(grad, weight, x.shape[1], window, x.shape)], _none_added(grad)


def _transposed(grad, w, groups, window: Window, x_shape):
    """The gradient of a (grouped) convolution with ``w`` with respect to its input: the transposed convolution.

    Per group one batched GEMM gives every kernel tap's contribution, which is then added at its strided place.
    """
    kernel, begin = window.kernel, window.begin
    xp = array_module(grad)
    m, c_in, h, wd = x_shape
    qh, qw = grad.shape[2:]
    padded = xp.zeros((m, c_in, *_padded_size((h, wd), window, (qh, qw))))
    k_out, cig = w.shape[:2]
    kog = k_out // groups
    for g in range(groups):
        gout = grad[:, g * kog : (g + 1) * kog].reshape(m, kog, qh * qw)
        taps = w[g * kog : (g + 1) * kog].transpose(2, 3, 1, 0).reshape(-1, kog)  # [kh*kw*C_in/g, K/g]
        contrib = xp.matmul(taps, gout).reshape(m, kernel[0], kernel[1], cig, qh, qw)
        target = padded[:, g * cig : (g + 1) * cig]
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                _tap(target, i, j, window, (qh, qw))[...] += contrib[:, i, j]
    return padded[:, :, begin[0] : begin[0] + h, begin[1] : begin[1] + wd]


def _padded_size(size, window: Window, out_size) -> tuple[int, int]:
    """The padded input extent (per axis) that holds every window of the output, ceil_mode's extra ones included."""
    return tuple(max(n + b + e, span + s * (q - 1))
                 for n, b, e, span, s, q in zip(size, window.begin, window.end, window.span, window.strides, out_size))


def _tap(array, i, j, window: Window, out_size):
    """The strided view [.., Qh, Qw] of a padded ``array`` that kernel tap (i, j) of every window reads."""
    (dy, dx), (sy, sx) = window.dilations, window.strides
    y, x = i * dy, j * dx
    return array[..., y : y + sy * (out_size[0] - 1) + 1 : sy, x : x + sx * (out_size[1] - 1) + 1 : sx]


def _relu(node, ins, is_data, out, grad):
    """The forward on/off mask: the exact local linearization."""
    return [grad * (ins[0] > 0)], _none_added(grad)


def _relu_deconvnet(node, ins, is_data, out, grad):
    """Zeiler & Fergus: the backward signal itself rectified (the forward mask is not used)."""
    return [array_module(grad).maximum(grad, 0)] + [None] * (len(ins) - 1), _none_added(grad)


def _leaky_deconvnet(node, ins, is_data, out, grad):
    """A leaky rectifier applied to the backward signal: g where g > 0, alpha * g below (the forward is not used)."""
    xp = array_module(grad)
    alpha = xp.asarray(ins[1], np.float64) if node.op_type == "PRelu" else attributes(node).get("alpha", 0.01)
    return [xp.where(grad > 0, grad, alpha * grad)] + [None] * (len(ins) - 1), _none_added(grad)


def _clip_deconvnet(node, ins, is_data, out, grad):
    """A Clip whose lower bound is 0 (ReLU6) is a rectifier: the backward signal rectified; any other Clip keeps
    its forward slope (``local``)."""
    low = attributes(node).get("min") if len(ins) < 2 or ins[1] is None else float(np.asarray(ins[1]).reshape(-1)[0])
    if low is not None and float(low) == 0.0:
        return _relu_deconvnet(node, ins, is_data, out, grad)
    return LOCAL_RULES["Clip"](node, ins, is_data, out, grad)


def _slope(derivative):
    """An elementwise op whose local linearization is its slope at the forward value (bias: the offset)."""

    def step(node, ins, is_data, out, grad):
        d = array_module(grad).broadcast_to(derivative(array_module(grad), node, ins, out), out.shape)
        offset = out - d * ins[0]  # f(x) = d*x + offset around the instance
        return [grad * d] + [None] * (len(ins) - 1), (grad * offset).reshape(len(grad), -1).sum(axis=1)

    return step


def _quantization_scale(xp, node, ins, out):
    """Q/DQ's scale broadcast along its axis (the offset ``out - d x`` then holds zero point and rounding)."""
    scale = xp.asarray(ins[1], dtype=np.float64).reshape(-1)
    if scale.size > 1:
        shape = [1] * ins[0].ndim
        shape[int(attributes(node).get("axis", 1)) % ins[0].ndim] = scale.size
        scale = scale.reshape(shape)
    return 1 / scale if node.op_type == "QuantizeLinear" else scale


def _leaky(xp, node, ins, out):
    return xp.where(ins[0] > 0, 1.0, attributes(node).get("alpha", 0.01))


def _prelu(xp, node, ins, out):
    return xp.where(ins[0] > 0, 1.0, xp.asarray(ins[1], np.float64))


def _clip_slope(xp, node, ins, out):
    return (out == ins[0]).astype(np.float64)


def _hard_sigmoid(xp, node, ins, out):
    attrs = attributes(node)
    inner = attrs.get("alpha", 0.2) * ins[0] + attrs.get("beta", 0.5)
    return xp.where((inner > 0) & (inner < 1), attrs.get("alpha", 0.2), 0.0)


def _hard_swish(xp, node, ins, out):
    x = ins[0]
    return xp.where(x < -3, 0.0, xp.where(x > 3, 1.0, x / 3 + 0.5))


def _erf(xp, node, ins, out):
    return 2 / np.sqrt(np.pi) * xp.exp(-ins[0] ** 2)


def _sigmoid(xp, node, ins, out):
    return out * (1 - out)


def _tanh(xp, node, ins, out):
    return 1 - out**2


def _softplus(xp, node, ins, out):
    return 1 / (1 + xp.exp(-ins[0]))


def _elu(xp, node, ins, out):
    return xp.where(ins[0] > 0, 1.0, out + attributes(node).get("alpha", 1.0))


def _selu(xp, node, ins, out):
    attrs = attributes(node)
    alpha, gamma = attrs.get("alpha", 1.67326319217681884765625), attrs.get("gamma", 1.05070102214813232421875)
    return xp.where(ins[0] > 0, gamma, out + gamma * alpha)


def _celu(xp, node, ins, out):
    return xp.where(ins[0] > 0, 1.0, out / attributes(node).get("alpha", 1.0) + 1)


def _gelu(xp, node, ins, out):
    """x * Phi(x): Phi read off the forward value (out / x; NumPy has no erf), or the tanh form's own slope."""
    x = ins[0]
    if attributes(node).get("approximate", "none") == "tanh":
        k = np.sqrt(2 / np.pi)
        t = xp.tanh(k * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * k * (1 + 3 * 0.044715 * x**2)
    small = xp.abs(x) < 1e-6
    phi = xp.where(small, 0.5, out / xp.where(small, 1.0, x))
    return phi + x * xp.exp(-(x**2) / 2) / np.sqrt(2 * np.pi)


def _mish(xp, node, ins, out):
    x = ins[0]
    t = xp.tanh(xp.logaddexp(0, x))  # tanh(softplus(x))
    return t + x * (1 - t**2) / (1 + xp.exp(-x))


def _lrn(node, ins, is_data, out, grad):
    """LRN's linearization at the instance: its Jacobian across the channel window (vector-Jacobian product),
    with the offset ``out - J x`` as the bias it adds, so that the local identity stays exact.

    y_c = x_c d_c^-b with d_c = bias + a/n S_c and S_c the sum of x^2 over channels [c - lo, c + hi]."""
    x = ins[0]
    attrs = attributes(node)
    size, alpha = int(attrs["size"]), attrs.get("alpha", 1e-4)
    beta, bias = attrs.get("beta", 0.75), attrs.get("bias", 1.0)
    lo, hi = (size - 1) // 2, size // 2  # floor and ceil of (size - 1) / 2
    squares = _channel_window_sum(x**2, lo, hi)
    d = bias + alpha / size * squares
    scale = d**-beta  # y = x * scale
    coupling = 2 * alpha * beta / size * x * scale / d  # -dy_c/dx_c' = coupling_c * x_c' for c' in c's window
    gx = grad * scale - x * _channel_window_sum(grad * coupling, hi, lo)  # the window, transposed
    offset = coupling * squares  # out - J x
    return [gx], (grad * offset).reshape(len(grad), -1).sum(axis=1)


def _channel_window_sum(a, lo, hi):
    """``sum(a[:, c - lo : c + hi + 1])`` for every channel c (zeros beyond the edges): one shifted add per offset."""
    xp = array_module(a)
    channels = a.shape[1]
    padded = xp.concatenate([xp.zeros_like(a[:, :lo]), a, xp.zeros_like(a[:, :hi])], axis=1)
    total = padded[:, : channels].copy()
    for t in range(1, lo + hi + 1):
        total += padded[:, t : t + channels]
    return total


def _maxpool(node, ins, is_data, out, grad):
    """The gradient goes to each window's first maximum (onnxruntime's switch: the first tap equal to the
    forward output), found and scattered tap by tap through strided views of the padded input: no [.., k*k]
    stack of windows and no scatter with repeated indices."""
    x, xp = ins[0], array_module(grad)
    window = Window.of(attributes(node), x.shape[2:])
    kernel, begin = window.kernel, window.begin
    m, c, h, w = x.shape
    qh, qw = out.shape[2:]
    padded = xp.full((m, c, *_padded_size((h, w), window, (qh, qw))), -np.inf)
    padded[:, :, begin[0] : begin[0] + h, begin[1] : begin[1] + w] = x
    gpad, claimed = xp.zeros_like(padded), xp.zeros(out.shape, bool)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            hit = _tap(padded, i, j, window, (qh, qw)) == out
            hit &= ~claimed  # ties: the first maximum only
            claimed |= hit
            _tap(gpad, i, j, window, (qh, qw))[...] += grad * hit
    return [gpad[:, :, begin[0] : begin[0] + h, begin[1] : begin[1] + w]], _none_added(grad)


def _global_pool(node, ins, is_data, out, grad):
    x, xp = ins[0], array_module(grad)
    if node.op_type == "GlobalAveragePool":
        return [xp.broadcast_to(grad / np.prod(x.shape[2:]), x.shape).copy()], _none_added(grad)
    flat = x.reshape(*x.shape[:2], -1)
    g = xp.zeros_like(flat)
    m, c = xp.indices(flat.shape[:2])
    g[m, c, xp.argmax(flat, axis=2)] = grad.reshape(*grad.shape[:2])  # the first maximum
    return [g.reshape(x.shape)], _none_added(grad)


def _reduce(node, ins, is_data, out, grad):
    """Mean and Sum spread the gradient evenly over what they reduce; Max gives it to the first maximum."""
    x, xp = ins[0], array_module(grad)
    axes = tuple(sorted(reduce_axes(attributes(node), ins[1] if len(ins) > 1 else None, x.ndim) - {0}))
    kept = list(x.shape)
    for a in axes:
        kept[a] = 1
    g = grad.reshape(kept)
    if node.op_type == "ReduceMax":
        moved = xp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
        flat = moved.reshape(*moved.shape[: x.ndim - len(axes)], -1)
        hit = xp.zeros_like(flat)
        xp.put_along_axis(hit, xp.argmax(flat, axis=-1)[..., None], 1.0, axis=-1)
        mask = xp.moveaxis(hit.reshape(moved.shape), tuple(range(x.ndim - len(axes), x.ndim)), axes)
        return [g * mask] + [None] * (len(ins) - 1), _none_added(grad)
    count = int(np.prod([x.shape[a] for a in axes])) if node.op_type == "ReduceMean" else 1
    return [xp.broadcast_to(g / count, x.shape).copy()] + [None] * (len(ins) - 1), _none_added(grad)


def _layer_norm(node, ins, is_data, out, grad):
    """LayerNormalization over the last axis, linearized at the instance: with x^ = (x - mean) r, r = 1/std,
    g_x = r * (g' - mean(g') - x^ mean(g' x^)) for g' = g * gamma; the offset ``out - J x`` is
    ``beta + gamma x^ (1 - eps r^2)``, so the local identity stays exact."""
    x, xp = ins[0], array_module(grad)
    attrs = attributes(node)
    if int(attrs.get("axis", -1)) % x.ndim != x.ndim - 1:
        raise NotDecodable("only a LayerNormalization over the last axis is supported")
    eps = attrs.get("epsilon", 1e-5)
    gamma = _on(grad, ins[1])
    beta = _on(grad, ins[2]) if len(ins) > 2 and ins[2] is not None else 0.0
    centred = x - x.mean(axis=-1, keepdims=True)
    r = 1 / xp.sqrt((centred**2).mean(axis=-1, keepdims=True) + eps)
    hat = centred * r
    g = grad * gamma
    gx = r * (g - g.mean(axis=-1, keepdims=True) - hat * (g * hat).mean(axis=-1, keepdims=True))
    offset = beta + gamma * hat * (1 - eps * r**2)
    return [gx] + [None] * (len(ins) - 1), (grad * offset).reshape(len(grad), -1).sum(axis=1)


def _batchnorm(node, ins, is_data, out, grad):
    gamma, beta, mean, var = (_on(grad, v) for v in ins[1:5])
    scale = gamma / array_module(grad).sqrt(var + attributes(node).get("epsilon", 1e-5))
    shift = beta - mean * scale
    return [grad * scale[:, None, None]], array_module(grad).einsum("mkhw,k->m", grad, shift)


def _reduce_to(grad, shape):
    """Sum a broadcast gradient back to an input's shape (per instance: the batch axis is kept)."""
    shape = (1,) * (grad.ndim - len(shape)) + tuple(shape)
    axes = tuple(a for a in range(1, grad.ndim) if shape[a] == 1 and grad.shape[a] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def _add_sub(node, ins, is_data, out, grad):
    sign = -1.0 if node.op_type == "Sub" else 1.0
    grads, added = [], _none_added(grad)
    for index, (x, data) in enumerate(zip(ins, is_data)):
        factor = sign if index == 1 else 1.0
        if data:  # a forward value, batched over instances
            grads.append(_reduce_to(factor * grad, x.shape))
        else:  # a constant
            grads.append(None)
            added = added + (factor * grad * _on(grad, x)).reshape(len(grad), -1).sum(axis=1)
    return grads, added


def _mul_div(node, ins, is_data, out, grad):
    a, b = ins
    data = is_data
    if all(data):
        return _product_of_maps(node, a, b, grad)
    const = _on(grad, b if data[0] else a)
    factor = 1.0 / const if node.op_type == "Div" else const
    x = a if data[0] else b
    g = _reduce_to(grad * factor, x.shape)
    return ([g, None] if data[0] else [None, g]), _none_added(grad)


def _product_of_maps(node, a, b, grad):
    """Two data inputs: a gate (the input broadcast over the other, e.g. squeeze-and-excitation) is held at
    its value for the instance; equal shapes (SiLU as x * sigmoid(x)) take the product rule, whose tangent
    plane ``a*b ~ b*da + a*db - a*b`` is exact at the instance."""
    if node.op_type == "Div":
        raise NotDecodable("a division of two feature maps is not supported")
    if a.size != b.size:
        gate_is_b = b.size < a.size
        held = b if gate_is_b else a
        x = a if gate_is_b else b
        g = _reduce_to(grad * held, x.shape)
        return ([g, None] if gate_is_b else [None, g]), _none_added(grad)
    return [grad * b, grad * a], -(grad * a * b).reshape(len(grad), -1).sum(axis=1)


def _reshape_like(node, ins, is_data, out, grad):
    return [grad.reshape(ins[0].shape)] + [None] * (len(ins) - 1), _none_added(grad)


def _transpose(node, ins, is_data, out, grad):
    perm = attributes(node).get("perm", list(range(grad.ndim))[::-1])
    return [array_module(grad).transpose(grad, tuple(np.argsort(perm)))], _none_added(grad)


def _concat(node, ins, is_data, out, grad):
    axis = attributes(node)["axis"] % grad.ndim
    cuts = np.cumsum([x.shape[axis] for x in ins])[:-1]
    return list(array_module(grad).split(grad, cuts.tolist(), axis=axis)), _none_added(grad)


def _gemm(node, ins, is_data, out, grad):
    attrs = attributes(node)
    matrix = _on(grad, ins[1])
    matrix = matrix.T if attrs.get("transB", 0) else matrix
    if node.op_type == "Gemm" and attrs.get("transA", 0):
        raise NotDecodable("Gemm with transA=1 is not supported")
    if node.op_type == "MatMul" and grad.ndim > 2:  # on the last axis of a map (a channels-last pointwise layer)
        return [grad @ matrix.T, None], _none_added(grad)
    alpha = attrs.get("alpha", 1.0) if node.op_type == "Gemm" else 1.0
    g2 = grad.reshape(len(grad), -1)
    added = _none_added(grad)
    if node.op_type == "Gemm" and len(ins) > 2 and ins[2] is not None:
        added = (g2 * attrs.get("beta", 1.0) * _on(grad, ins[2]).reshape(1, -1)).sum(axis=1)
    return [(alpha * g2 @ matrix.T).reshape(ins[0].shape), None, None][: len(ins)], added


def _pad(node, ins, is_data, out, grad):
    x = ins[0]
    attrs = attributes(node)
    pads = np.asarray(attrs["pads"] if "pads" in attrs else ins[1], np.int64)
    if (pads < 0).any() or (len(ins) > 3 and ins[3] is not None) or attrs.get("mode", "constant") != "constant":
        raise NotDecodable("only a constant Pad with non-negative pads on every axis is supported")
    index = tuple(slice(int(pads[a]), int(pads[a]) + x.shape[a]) for a in range(x.ndim))
    value = float(np.asarray(ins[2]).reshape(-1)[0]) if len(ins) > 2 and ins[2] is not None and np.size(ins[2]) else 0.0
    ring = grad.copy()
    ring[index] = 0
    return [grad[index]] + [None] * (len(ins) - 1), value * ring.reshape(len(grad), -1).sum(axis=1)


def _slice(node, ins, is_data, out, grad):
    """The gradient placed back at the positions the slice kept (zeros elsewhere)."""
    x, xp = ins[0], array_module(grad)
    ranges = slice_ranges(attributes(node), *(ins[1:5] + [None] * (5 - len(ins))), x.shape)
    index = tuple(slice(*ranges.get(a, (0, n, 1))) for a, n in enumerate(x.shape))
    gx = xp.zeros(x.shape)
    gx[index] = grad
    return [gx] + [None] * (len(ins) - 1), _none_added(grad)


def _split(node, ins, is_data, out, grads):
    """The outputs' gradients side by side along the split axis."""
    x = ins[0]
    axis, _ = split_ranges(attributes(node), ins[1] if len(ins) > 1 else None, x.shape, len(node.output))
    return [array_module(grads[0]).concatenate(grads, axis=axis)] + [None] * (len(ins) - 1), _none_added(grads[0])


def _gather(node, ins, is_data, out, grad):
    """The gradient added back at the position each index took (a repeated index collects every copy's)."""
    x, xp, m = ins[0], array_module(grad), len(grad)
    if is_data[1]:
        raise NotDecodable("its indices are computed from the image")
    shape = (x.shape[0] // m, *x.shape[1:])  # one image's input (a tensor without batch axis is stacked on axis 0)
    axis = attributes(node).get("axis", 0) % len(shape)
    index = np.asarray(ins[1], np.int64).reshape(-1) % shape[axis]
    pre, post = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
    g, gx = grad.reshape(m, pre, len(index), post), xp.zeros((m, pre, shape[axis], post))
    rest = np.arange(len(index))
    while rest.size:  # one round per copy of the most repeated index (one for a permutation)
        _, first = np.unique(index[rest], return_index=True)
        gx[:, :, xp.asarray(index[rest[first]])] += g[:, :, xp.asarray(rest[first])]
        rest = np.delete(rest, first)
    return [gx.reshape(x.shape), None], _none_added(grad)


def _identity(node, ins, is_data, out, grad):
    return [grad] + [None] * (len(ins) - 1), _none_added(grad)


#: ops decodable in ``weights`` mode that the backward passes refuse, with the reason
NO_LOCAL_RULE = {"QLinearConv": "QOperator convolutions have no backward rule; quantize in QDQ format"}
#: ops whose rule takes the gradients of all their outputs (a list)
MULTI_OUTPUT = ("Split",)
#: ``local``: the exact linearization of each op at the instance (op type -> rule)
LOCAL_RULES = {
    "Conv": _conv, "AveragePool": _avgpool, "Sum": _add_sub, "Relu": _relu, "MaxPool": _maxpool,
    "GlobalAveragePool": _global_pool, "GlobalMaxPool": _global_pool, "BatchNormalization": _batchnorm,
    "Add": _add_sub, "Sub": _add_sub,
    "Mul": _mul_div, "Div": _mul_div, "Reshape": _reshape_like, "Flatten": _reshape_like, "Squeeze": _reshape_like,
    "Unsqueeze": _reshape_like, "Transpose": _transpose, "Concat": _concat, "Gemm": _gemm, "MatMul": _gemm,
    "Pad": _pad, "Identity": _identity, "Dropout": _identity, "Slice": _slice, "Split": _split,
    "Gather": _gather,
    "QuantizeLinear": _slope(_quantization_scale), "DequantizeLinear": _slope(_quantization_scale),
    "LayerNormalization": _layer_norm, "ReduceMean": _reduce, "ReduceMax": _reduce, "ReduceSum": _reduce,
    "Erf": _slope(_erf),
    "LeakyRelu": _slope(_leaky), "PRelu": _slope(_prelu), "Clip": _slope(_clip_slope),
    "HardSigmoid": _slope(_hard_sigmoid), "HardSwish": _slope(_hard_swish), "Elu": _slope(_elu),
    "Sigmoid": _slope(_sigmoid), "Tanh": _slope(_tanh), "Softplus": _slope(_softplus),
    "Selu": _slope(_selu), "Celu": _slope(_celu), "Gelu": _slope(_gelu), "Mish": _slope(_mish), "LRN": _lrn,
}
#: ``deconvnet``: the local rules with the rectifiers overridden (a mode is a table of overrides)
DECONVNET_RULES = LOCAL_RULES | {"Relu": _relu_deconvnet, "Clip": _clip_deconvnet, "LeakyRelu": _leaky_deconvnet,
                                 "PRelu": _leaky_deconvnet}
#: the backward modes and their rule tables
BACKWARD_MODES = {"local": LOCAL_RULES, "deconvnet": DECONVNET_RULES}
