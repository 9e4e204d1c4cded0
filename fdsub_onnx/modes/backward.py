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

import sys

import numpy as np

from ..compose.backend import array_module, get_backend, resolve_device
from ..compose.ops.op_batchnorm import scale_shift
from ..errors import FdsubError, NotDecodable
from ..graph.geometry import Window
from ..graph.model import ancestors, attributes
from ..graph.ranges import reduce_axes, slice_ranges, split_ranges
from ..runtime.session import Forward, session


def instance_gradients(model, target: str, images: np.ndarray, neurons, positions, rule: str = "local",
                       forward: Forward | None = None, device="cpu", dtype="float64"):
    """Input gradients [M, C, H, W] and local biases [M] of neuron ``neurons[m]`` at ``positions[m]`` on ``images[m]``.

    ``forward`` (from ``forward_for``) reuses one onnxruntime session across calls. On ``device="gpu"``
    the pass runs in CuPy and returns CuPy arrays. ``dtype`` is that of the pass (float64 or float32).
    """
    if rule not in BACKWARD_MODES:
        raise FdsubError(f"backward rule must be one of {', '.join(BACKWARD_MODES)}, got {rule!r}")
    device = resolve_device(device)
    backend = get_backend(device.backend)
    forward = forward if forward is not None else forward_for(model, target, device)
    values = {name: backend.asarray(value, dtype) for name, value in forward(images).items()}
    seed = one_hot(backend, values[target].shape, neurons, positions, dtype)
    grads, bias = backward(model, ancestors(model, [target]), values, {target: seed}, BACKWARD_MODES[rule], rule)
    if model.input_name not in grads:
        raise FdsubError(f"layer {target!r} does not depend on the image input")
    return grads[model.input_name], bias


def image_gradients(model, target: str, values: dict, neurons, positions, rule: str = "local", nodes=None):
    """As ``instance_gradients`` for M instances of one image, whose forward ``values`` (tensor -> [1, ...], on
    the backend, in the pass's dtype) they share: the masks and switches are read once, broadcast over them."""
    first = values[target]
    seed = one_hot(get_backend("cupy" if type(first).__module__.startswith("cupy") else "numpy"),
                   (len(neurons), *first.shape[1:]), neurons, positions, first.dtype)
    nodes = nodes if nodes is not None else ancestors(model, [target])
    grads, bias = backward(model, nodes, values, {target: seed}, BACKWARD_MODES[rule], rule)
    if model.input_name not in grads:
        raise FdsubError(f"layer {target!r} does not depend on the image input")
    return grads[model.input_name], bias


def one_hot(backend, shape, neurons, positions, dtype):
    """Seeds [M, C, H, W] (or [M, C]): a 1 at channel ``neurons[m]`` and position ``positions[m]`` of row m."""
    seed = backend.zeros(shape, dtype)
    m = np.arange(shape[0])
    if seed.ndim == 4:
        positions = np.asarray(positions, np.int64).reshape(-1, 2)
        seed[m, np.asarray(neurons), positions[:, 0], positions[:, 1]] = 1.0
    else:
        seed.reshape(shape[0], -1)[m, np.asarray(neurons)] = 1.0
    return seed


def backward(model, nodes: list, values, grads: dict, rules: dict, label: str):
    """Run ``rules`` backwards over ``nodes`` (graph order), from the seeded ``grads`` (tensor -> [M, ...]).

    ``values`` maps a tensor to its forward value [M, ...] (read through ``values[name]``, so a mapping that
    makes them on demand works). Returns the gradients left, those of the tensors the nodes read but do
    not produce (the image, or the tensor a pass stops at), and the bias [M] the nodes add.
    """
    first = next(iter(grads.values()))
    xp = array_module(first)
    bias = xp.zeros((len(first),), first.dtype)
    for node in reversed(nodes):
        outs = [grads.pop(name, None) if name else None for name in node.output]
        if all(g is None for g in outs):
            continue
        grad = outs[0]
        if node.op_type in MULTI_OUTPUT:  # one gradient per output (zeros for an output nothing reads)
            grad = [g if g is not None else xp.zeros(_batched(values[name], first), first.dtype)
                    for name, g in zip(node.output, outs)]
        elif grad is None:
            raise FdsubError(f"{label} mode: {node.op_type} node {model.node_name(node)!r}: only its first output "
                             "can be followed")
        step = rules.get(node.op_type)
        if node.op_type in NO_LOCAL_RULE:
            raise FdsubError(f"{label} mode: {node.op_type} node {model.node_name(node)!r}: "
                             f"{NO_LOCAL_RULE[node.op_type]}")
        if step is None:
            raise FdsubError(f"{label} mode does not support op {node.op_type} (node {model.node_name(node)!r}) yet")
        is_data = [bool(name) and name not in model.constants for name in node.input]
        ins = [(values[name] if data else model.constants.get(name)) if name else None
               for name, data in zip(node.input, is_data)]
        try:
            in_grads, added = step(node, ins, is_data, values[node.output[0]], grad)
        except NotDecodable as exc:
            raise FdsubError(f"{label} mode: {node.op_type} node {model.node_name(node)!r}: {exc}") from None
        bias += added
        for name, g in zip(node.input, in_grads):
            if g is not None and name and name not in model.constants:
                _accumulate(grads, name, g)
    return grads, bias


def _accumulate(grads: dict, name: str, g) -> None:
    """``grads[name] += g``: in place when nothing else can see ``grads[name]``'s memory (no other reference to
    it or to a view of its buffer; a rule may hand one gradient to several inputs), else into a new array. In
    place, a sum over a wide map makes no new map (whose pages the system would fault in again)."""
    have = grads.get(name)
    if have is None:
        grads[name] = g
    elif (have.shape == g.shape and have.dtype == g.dtype and getattr(have.flags, "writeable", True)
          and sys.getrefcount(have) == 3 and (have.base is None or sys.getrefcount(have.base) == 2)):
        have += g  # the references: the dict, ``have``, getrefcount's argument; the base's: have's, the argument
    else:
        grads[name] = have + g


def deconvnet_is_local(model, target: str) -> bool:
    """Whether every op below ``target`` has one rule in both tables (no rectifier): deconvnet then projects what
    ``local`` does, with bias 0, and one backward pass serves both."""
    return all(DECONVNET_RULES.get(n.op_type) is LOCAL_RULES.get(n.op_type) for n in ancestors(model, [target]))


def forward_for(model, target: str, device="cpu") -> Forward:
    """The onnxruntime session computing every tensor below ``target`` (the forward values a backward pass reads)."""
    return Forward(model, [o for n in ancestors(model, [target]) for o in n.output if o], device)


def per_image_bytes(model, target: str, itemsize: int, largest: int | None = None) -> tuple[int, int]:
    """(bytes of one image's forward values below ``target``: float32 from onnxruntime plus their copy in the pass's
    dtype, bytes of one instance's backward pass: about four of its largest gradients alive with temporaries).
    ``largest``: values of the largest gradient one instance holds (its cone's cut, which for a field wider than the
    image reaches into the padding: 4 x 4 x 14 M on EfficientNet-Lite2's blocks.16, 236 MB measured); default the
    largest map."""
    sizes = [int(np.prod(model.shapes[o][1:])) for n in ancestors(model, [target]) for o in n.output
             if o and o in model.shapes]
    return (4 + itemsize) * sum(sizes), 4 * itemsize * (largest or max(sizes, default=1))


def pass_sizes(model, target: str, most: int, backend, itemsize: int, workers: int = 1,
               largest: int | None = None) -> tuple[int, int]:
    """(instances per backward pass, images per onnxruntime run) of a decode whose passes each carry their own
    cut of the forward values: at most ``most`` instances and 8 images, fewer where a quarter of the memory left
    (``backend.free_bytes``), shared by the ``workers`` passes that run at once, cannot hold them. VGG19 at 224
    needs about 700 MB per instance in float64. ``largest``: as for ``per_image_bytes``."""
    image, instance = per_image_bytes(model, target, itemsize, largest)
    room = backend.free_bytes() // 4 // max(workers, 1)
    return (int(max(1, min(most, (room - image) // max(instance, 1)))),
            int(max(1, min(8, room // 2 // max(image, 1)))))


def _batched(x, grad) -> tuple:
    """``x``'s shape for the batch of ``grad``: forward values may be one image's, shared by its instances."""
    return (len(grad), *x.shape[1:])


def _none_added(grad):
    return array_module(grad).zeros(len(grad), grad.dtype)


def _on(grad, constant):
    """A constant (NumPy, from the model) in the dtype and on the array module of ``grad``."""
    return array_module(grad).asarray(constant, dtype=grad.dtype)


# ---- the rules: (node, inputs, is_data, output, grad) -> ([input grads], bias added [M]) -------------
def _conv(node, ins, is_data, out, grad):
    x, w = ins[0], _on(grad, ins[1])
    attrs = attributes(node)
    gx = _transposed(grad, w, int(attrs.get("group", 1)), Window.of(attrs, x.shape[2:], w.shape[2:]),
                     _batched(x, grad))
    has_bias = len(ins) > 2 and ins[2] is not None
    added = array_module(grad).einsum("mkhw,k->m", grad, _on(grad, ins[2])) if has_bias else _none_added(grad)
    return [gx, None, None][: len(ins)], added


def _avgpool(node, ins, is_data, out, grad):
    """Each window's gradient spread evenly over its taps: over all k*k of them, or (``count_include_pad=0``, the
    default) over those inside the input, as onnxruntime divides border windows."""
    x, xp = ins[0], array_module(grad)
    attrs = attributes(node)
    window = Window.of(attrs, x.shape[2:])
    counts = window_counts(window, x.shape[2:], grad.shape[2:], bool(attrs.get("count_include_pad", 0)))
    even = bool((counts == counts.flat[0]).all())  # one divisor: it goes into the weight, not a pass over the map
    weight = xp.full((x.shape[1], 1, *window.kernel), 1.0 / counts.flat[0] if even else 1.0, grad.dtype)
    scaled = grad if even else grad * xp.asarray(1.0 / counts, grad.dtype)
    return [_transposed(scaled, weight, x.shape[1], window, _batched(x, grad))], _none_added(grad)


def window_counts(window: Window, in_size, out_size, include_pad: bool) -> np.ndarray:
    """[Q_y, Q_x]: how many taps of each window an average divides by (those inside the input, or inside the
    padded input with ``include_pad``; a ceil_mode window's taps beyond the end pad never count)."""
    per_axis = []
    for n, q, k, s, d, b, e in zip(in_size, out_size, window.kernel, window.strides, window.dilations, window.begin,
                                   window.end):
        lo, hi = (-b, n + e) if include_pad else (0, n)
        taps = np.arange(q)[:, None] * s - b + np.arange(k)[None, :] * d
        per_axis.append(((taps >= lo) & (taps < hi)).sum(axis=1))
    return np.maximum(np.outer(*per_axis), 1)


TEMP_BYTES = 256 << 20  # bound on the tap products one GEMM of ``_transposed`` makes
CACHE_BYTES = 2 << 20  # the tap products ``_transposed`` keeps in a core's L2 cache between its GEMM and adds


def _transposed(grad, w, groups, window: Window, x_shape):
    """The gradient of a (grouped) convolution with ``w`` with respect to its input: the transposed convolution.

    Per group and run of instances, one GEMM over their positions and every kernel tap
    (``[taps*C_in/g, K/g] x [K/g, m*Q]``: per instance alone the products would be too small for BLAS; the run
    is as long as keeps its products in a core's L2 cache, ``CACHE_BYTES``: on 224-px maps twice as fast as all
    at once, on the demo's cones 1.3-1.6x faster than runs of 8 MB); each tap's product is then added at its
    strided place. The work runs channel-major ([C, M, H, W] in memory) and the result is that memory seen as
    [M, C, H, W]: the next convolution's GEMM reads it without a copy, and elementwise rules keep its layout.
    Depthwise windows (pooling) are scaled strided adds.
    """
    kernel, begin = window.kernel, window.begin
    xp = array_module(grad)
    m, c_in, h, wd = x_shape
    qh, qw = grad.shape[2:]
    k_out, cig = w.shape[:2]
    kog = k_out // groups
    taps = [(i, j) for i in range(kernel[0]) for j in range(kernel[1])]
    if cig == 1 and kog == 1 and _tiles(window, (h, wd), (qh, qw)):  # windows side by side: one broadcast product
        tiled = grad[:, :, :, None, :, None] * w[None, :, 0, None, :, None, :]  # [M, C, Q_y, k_y, Q_x, k_x]
        return tiled.reshape(x_shape)
    if cig == 1 and kog == 1:
        size = _padded_size((h, wd), window, (qh, qw))
        padded = _zeros_as(grad, (m, c_in, *size))
        one = w.ravel()[0]
        if bool((w == one).all()):  # pooling, one weight for every tap: spread along x, then whole rows along y
            (sy, sx), (dy, dx) = window.strides, window.dilations
            rows = _zeros_as(grad, (m, c_in, qh, size[1]))
            scaled = grad if one == 1 else grad * one
            for j in range(kernel[1]):
                rows[..., j * dx : j * dx + sx * (qw - 1) + 1 : sx] += scaled
            for i in range(kernel[0]):
                padded[:, :, i * dy : i * dy + sy * (qh - 1) + 1 : sy] += rows
        else:
            for i, j in taps:
                _tap(padded, i, j, window, (qh, qw))[...] += grad * w[None, :, 0, i, j, None, None]
        return padded[:, :, begin[0] : begin[0] + h, begin[1] : begin[1] + wd]
    pointwise = (len(taps) == 1 and groups == 1 and window.strides == (1, 1) and (qh, qw) == (h, wd)
                 and tuple(begin) == (0, 0))
    if not pointwise and window.strides == (1, 1) and kog < cig:
        return _transposed_gather(grad, w, groups, window, x_shape, taps)
    padded = None if pointwise else xp.zeros((c_in, m, *_padded_size((h, wd), window, (qh, qw))), grad.dtype)
    q = qh * qw
    images = max(1, CACHE_BYTES // max(1, len(taps) * cig * q * grad.itemsize))  # per GEMM, its products in cache
    block = max(1, TEMP_BYTES // max(1, cig * min(images, m) * q * grad.itemsize))
    for g in range(groups):
        gout = xp.ascontiguousarray(grad[:, g * kog : (g + 1) * kog].transpose(1, 0, 2, 3)).reshape(kog, -1)
        wg = w[g * kog : (g + 1) * kog]
        if pointwise:  # a 1x1 convolution: the product is the gradient
            return xp.matmul(wg[:, :, 0, 0].T, gout).reshape(c_in, m, h, wd).transpose(1, 0, 2, 3)
        target = padded[g * cig : (g + 1) * cig]
        blocks = [taps[start : start + block] for start in range(0, len(taps), block)]
        lefts = [(chosen, xp.concatenate([wg[:, :, i, j].T for i, j in chosen])) for chosen in blocks]
        for m0 in range(0, m, images):
            m1 = min(m, m0 + images)
            part = target[:, m0:m1]
            for chosen, left in lefts:
                contrib = xp.matmul(left, gout[:, m0 * q : m1 * q]).reshape(len(chosen), cig, m1 - m0, qh, qw)
                for t, (i, j) in enumerate(chosen):
                    _tap(part, i, j, window, (qh, qw))[...] += contrib[t]
    if padded is None:
        padded = xp.zeros((c_in, m, h, wd), grad.dtype)
    return padded[:, :, begin[0] : begin[0] + h, begin[1] : begin[1] + wd].transpose(1, 0, 2, 3)


def _transposed_gather(grad, w, groups, window: Window, x_shape, taps):
    """``_transposed`` for stride 1 when a layer widens (K/g < C_in/g, e.g. DenseNet's 3x3 convs): each input
    position gathers its taps from the zero-padded gradient, ``dx[u] = sum_t w[t] g[u + begin - t*d]``, one GEMM
    ``[C_in/g, taps*K/g] x [taps*K/g, M*H*W]`` per block of taps on shifted views of the (narrower) gradient,
    instead of a product per tap the width of the input scattered back with strided adds."""
    xp = array_module(grad)
    m, c_in, h, wd = x_shape
    qh, qw = grad.shape[2:]
    k_out, cig = w.shape[:2]
    kog = k_out // groups
    (sy, sx), (by, bx), (dy, dx) = window.span, window.begin, window.dilations
    out = xp.empty((c_in, m, h, wd), grad.dtype)
    block = max(1, TEMP_BYTES // max(1, kog * m * h * wd * grad.itemsize))
    for g in range(groups):
        gpad = xp.zeros((kog, m, sy - 1 + max(qh, h + by), sx - 1 + max(qw, wd + bx)), grad.dtype)
        gpad[:, :, sy - 1 : sy - 1 + qh, sx - 1 : sx - 1 + qw] = grad[:, g * kog : (g + 1) * kog].transpose(1, 0, 2, 3)
        wg, target = w[g * kog : (g + 1) * kog], out[g * cig : (g + 1) * cig].reshape(cig, -1)
        for start in range(0, len(taps), block):
            chosen = taps[start : start + block]
            views = [gpad[:, :, by + sy - 1 - i * dy : by + sy - 1 - i * dy + h,
                          bx + sx - 1 - j * dx : bx + sx - 1 - j * dx + wd] for i, j in chosen]
            right = xp.stack(views).reshape(len(chosen) * kog, -1)  # [taps*K/g, M*H*W]
            left = xp.concatenate([wg[:, :, i, j].T for i, j in chosen], axis=1)  # [C_in/g, taps*K/g]
            if start == 0:
                xp.matmul(left, right, out=target)
            else:
                target += xp.matmul(left, right)
    return out.transpose(1, 0, 2, 3)


def _zeros_as(grad, shape):
    """Zeros [M, C, ...] laid out in memory as ``grad`` is (channel-major after a GEMM, ``_transposed``), so that
    elementwise passes between the two walk both in memory order."""
    xp = array_module(grad)
    if grad.ndim == 4 and grad.strides[1] > grad.strides[0]:
        return xp.zeros((shape[1], shape[0], *shape[2:]), grad.dtype).transpose(1, 0, 2, 3)
    return xp.zeros(shape, grad.dtype)


def _tiles(window: Window, size, out_size) -> bool:
    """Whether the windows tile the input exactly: stride = kernel, no dilation, no padding, no input left over."""
    return (window.strides == window.kernel and window.dilations == (1, 1) and not any(window.begin)
            and all(q * k == n for q, k, n in zip(out_size, window.kernel, size)))


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
    alpha = xp.asarray(ins[1], grad.dtype) if node.op_type == "PRelu" else attributes(node).get("alpha", 0.01)
    return [xp.where(grad > 0, grad, alpha * grad)] + [None] * (len(ins) - 1), _none_added(grad)


def _clip_deconvnet(node, ins, is_data, out, grad):
    """A Clip whose lower bound is 0 (ReLU6) is a rectifier: the backward signal rectified; any other Clip keeps
    its forward slope (``local``)."""
    low = attributes(node).get("min") if len(ins) < 2 or ins[1] is None else float(ins[1].reshape(-1)[0])
    if low is not None and float(low) == 0.0:
        return _relu_deconvnet(node, ins, is_data, out, grad)
    return LOCAL_RULES["Clip"](node, ins, is_data, out, grad)


def _slope(derivative):
    """An elementwise op whose local linearization is its slope at the forward value (bias: the offset)."""

    def step(node, ins, is_data, out, grad):
        d = array_module(grad).broadcast_to(derivative(array_module(grad), node, ins, out), out.shape)
        offset = out - d * ins[0]  # f(x) = d*x + offset around the instance
        return [grad * d] + [None] * (len(ins) - 1), (grad * offset).reshape(len(grad), -1).sum(axis=1)

    step.derivative = derivative  # the slope alone, for those who need no offset (fds's gates)
    return step


def _quantization_scale(xp, node, ins, out):
    """Q/DQ's scale broadcast along its axis (the offset ``out - d x`` then holds zero point and rounding)."""
    scale = xp.asarray(ins[1], dtype=out.dtype).reshape(-1)
    if scale.size > 1:
        shape = [1] * ins[0].ndim
        shape[int(attributes(node).get("axis", 1)) % ins[0].ndim] = scale.size
        scale = scale.reshape(shape)
    return 1 / scale if node.op_type == "QuantizeLinear" else scale


def _leaky(xp, node, ins, out):
    return xp.where(ins[0] > 0, 1.0, attributes(node).get("alpha", 0.01))


def _prelu(xp, node, ins, out):
    return xp.where(ins[0] > 0, 1.0, xp.asarray(ins[1], out.dtype))


def _clip_slope(xp, node, ins, out):
    return (out == ins[0]).astype(out.dtype)


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
    forward output). The switches are found once on the forward values (``maxpool_switches``); one
    ``scatter_sum`` then puts every instance's gradient there, repeated indices (overlapping windows) adding up."""
    x, xp = ins[0], array_module(grad)
    window = Window.of(attributes(node), x.shape[2:])
    c, h, w = x.shape[1:]
    qh, qw = out.shape[2:]
    size = _padded_size((h, w), window, (qh, qw))
    switch = maxpool_switches(x, out, window)
    m, plane = len(grad), size[0] * size[1]
    base = (xp.arange(m)[:, None] * c + xp.arange(c)[None, :]) * plane  # [M, C]: where each instance's plane starts
    index = xp.broadcast_to(switch, (m, c, qh, qw)) + base[:, :, None, None]
    gpad = scatter_sum(index, grad, m * c * plane).reshape(m, c, *size)
    begin = window.begin
    return [gpad[:, :, begin[0] : begin[0] + h, begin[1] : begin[1] + w]], _none_added(grad)


def scatter_sum(index, weights, size: int):
    """[size] of ``weights`` summed at their flat ``index`` (repeats add up), in the weights' dtype: ``add.at``
    on NumPy (float32 stays float32, three times as fast as ``bincount``'s float64), ``bincount`` on CuPy."""
    xp = array_module(weights)
    if xp is not np:
        return xp.bincount(index.reshape(-1), weights=weights.reshape(-1), minlength=size).astype(weights.dtype)
    total = np.zeros(size, weights.dtype)
    np.add.at(total, index.reshape(-1), weights.reshape(-1))
    return total


def maxpool_switches(x, out, window: Window):
    """[B, C, Q_y, Q_x]: the flat index, in the padded input plane (``_padded_size``), of each window's first
    maximum (onnxruntime's switch: the first tap equal to the output), tap by tap through strided views."""
    xp = array_module(x)
    (h, w), (qh, qw), begin = x.shape[2:], out.shape[2:], window.begin
    size = _padded_size((h, w), window, (qh, qw))
    padded = xp.full((len(x), x.shape[1], *size), -np.inf, x.dtype)
    padded[:, :, begin[0] : begin[0] + h, begin[1] : begin[1] + w] = x
    flat = xp.arange(size[0] * size[1]).reshape(size)
    switch = xp.full(out.shape, -1, np.int64)
    for i in range(window.kernel[0]):
        for j in range(window.kernel[1]):
            hit = (_tap(padded, i, j, window, (qh, qw)) == out) & (switch < 0)  # ties: the first maximum only
            switch = xp.where(hit, _tap(flat, i, j, window, (qh, qw)), switch)
    return xp.maximum(switch, 0)  # none only where no gradient flows (a NaN window)


def _global_pool(node, ins, is_data, out, grad):
    x, xp = ins[0], array_module(grad)
    if node.op_type == "GlobalAveragePool":
        return [xp.broadcast_to(grad / int(np.prod(x.shape[2:])), _batched(x, grad)).copy()], _none_added(grad)
    flat = x.reshape(*x.shape[:2], -1)
    g = xp.zeros((len(grad), *flat.shape[1:]), grad.dtype)
    m, c = xp.indices(g.shape[:2])
    g[m, c, xp.broadcast_to(xp.argmax(flat, axis=2), g.shape[:2])] = grad.reshape(*grad.shape[:2])  # first maximum
    return [g.reshape(_batched(x, grad))], _none_added(grad)


def _reduce(node, ins, is_data, out, grad):
    """Mean and Sum spread the gradient evenly over what they reduce; Max gives it to the first maximum."""
    x, xp = ins[0], array_module(grad)
    axes = tuple(sorted(reduce_axes(attributes(node), ins[1] if len(ins) > 1 else None, x.ndim) - {0}))
    kept = list(_batched(x, grad))
    for a in axes:
        kept[a] = 1
    g = grad.reshape(kept)
    if node.op_type == "ReduceMax":
        moved = xp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
        flat = moved.reshape(*moved.shape[: x.ndim - len(axes)], -1)
        hit = xp.zeros(flat.shape, grad.dtype)
        xp.put_along_axis(hit, xp.argmax(flat, axis=-1)[..., None], 1.0, axis=-1)
        mask = xp.moveaxis(hit.reshape(moved.shape), tuple(range(x.ndim - len(axes), x.ndim)), axes)
        return [g * mask] + [None] * (len(ins) - 1), _none_added(grad)
    count = int(np.prod([x.shape[a] for a in axes])) if node.op_type == "ReduceMean" else 1
    return [xp.broadcast_to(g / count, _batched(x, grad)).copy()] + [None] * (len(ins) - 1), _none_added(grad)


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
    scale, shift = scale_shift(node, *(_on(grad, v) for v in ins[1:5]), xp=array_module(grad))
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
            grads.append(_reduce_to(grad if factor == 1.0 else -grad, x.shape))
        else:  # a constant: the gradient summed over the axes it is broadcast on first (one read of the map)
            grads.append(None)
            summed = _reduce_to(grad, x.shape)
            added = added + factor * (summed * _on(grad, x)).reshape(len(grad), -1).sum(axis=1)
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
    return [grad.reshape(_batched(ins[0], grad))] + [None] * (len(ins) - 1), _none_added(grad)


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
    return [(alpha * g2 @ matrix.T).reshape(_batched(ins[0], grad)), None, None][: len(ins)], added


def _pad(node, ins, is_data, out, grad):
    x = ins[0]
    attrs = attributes(node)
    pads = np.asarray(attrs["pads"] if "pads" in attrs else ins[1], np.int64)
    if (pads < 0).any() or (len(ins) > 3 and ins[3] is not None) or attrs.get("mode", "constant") != "constant":
        raise NotDecodable("only a constant Pad with non-negative pads on every axis is supported")
    index = (slice(None),) + tuple(slice(int(pads[a]), int(pads[a]) + x.shape[a]) for a in range(1, x.ndim))
    value = float(np.asarray(ins[2]).reshape(-1)[0]) if len(ins) > 2 and ins[2] is not None and np.size(ins[2]) else 0.0
    ring = grad.copy()
    ring[index] = 0
    return [grad[index]] + [None] * (len(ins) - 1), value * ring.reshape(len(grad), -1).sum(axis=1)


def _slice(node, ins, is_data, out, grad):
    """The gradient placed back at the positions the slice kept (zeros elsewhere)."""
    x, xp = ins[0], array_module(grad)
    ranges = slice_ranges(attributes(node), *(ins[1:5] + [None] * (5 - len(ins))), x.shape)
    index = (slice(None),) + tuple(slice(*ranges.get(a, (0, n, 1))) for a, n in enumerate(x.shape) if a)
    gx = xp.zeros(_batched(x, grad), grad.dtype)
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
    axis = attributes(node).get("axis", 0) % x.ndim
    if axis == 0 or x.shape[0] not in (1, m):
        raise NotDecodable("a Gather over a tensor without its batch axis has no backward rule yet")
    shape = x.shape[1:]  # one instance's input; the forward value may be one image's, shared by its instances
    axis -= 1
    index = np.asarray(ins[1], np.int64).reshape(-1) % shape[axis]
    pre, post = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
    g, gx = grad.reshape(m, pre, len(index), post), xp.zeros((m, pre, shape[axis], post), grad.dtype)
    rest = np.arange(len(index))
    while rest.size:  # one round per copy of the most repeated index (one for a permutation)
        _, first = np.unique(index[rest], return_index=True)
        gx[:, :, xp.asarray(index[rest[first]])] += g[:, :, xp.asarray(rest[first])]
        rest = np.delete(rest, first)
    return [gx.reshape(_batched(x, grad)), None], _none_added(grad)


def _identity(node, ins, is_data, out, grad):
    return [grad] + [None] * (len(ins) - 1), _none_added(grad)


def _conv_transpose(node, ins, is_data, out, grad):
    """The gradient of a transposed convolution is the convolution of the output gradient with the same kernel."""
    x, w = ins[0], _on(grad, ins[1])  # w [C_in, C_out/g, k_y, k_x]
    attrs = attributes(node)
    window = transposed_window(attrs, x.shape[2:], out.shape[2:], w.shape[2:])
    gx = _correlated(grad, w, int(attrs.get("group", 1)), window, x.shape[2:])
    has_bias = len(ins) > 2 and ins[2] is not None
    added = array_module(grad).einsum("mkhw,k->m", grad, _on(grad, ins[2])) if has_bias else _none_added(grad)
    return [gx, None, None][: len(ins)], added


def transposed_window(attrs: dict, in_size, out_size, kernel) -> Window:
    """A ConvTranspose's window as seen from its output: input position i, tap t writes output i*s - p + t*d. The
    leading pad p is ``pads`` or, with ``output_shape`` or ``auto_pad`` SAME_*, the total padding
    ``(n_in - 1)*s + output_padding + (k - 1)*d + 1 - n_out`` split as onnxruntime does (the larger half last for
    SAME_UPPER, first otherwise)."""
    kernel = tuple(int(k) for k in kernel)
    strides, dilations = tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("dilations", (1, 1)))
    extra = tuple(attrs.get("output_padding", (0, 0)))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
    begin = tuple(int(p) for p in pads[:2])
    if "output_shape" in attrs or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = [max(0, (n - 1) * s + op + (k - 1) * d + 1 - q)
                 for n, s, op, k, d, q in zip(in_size, strides, extra, kernel, dilations, out_size)]
        begin = tuple(t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total)
    elif auto_pad == "VALID":
        begin = (0, 0)
    end = tuple(max(0, (n - 1) * s + (k - 1) * d + 1 - b - q)
                for n, s, k, d, b, q in zip(in_size, strides, kernel, dilations, begin, out_size))
    return Window(kernel, strides, dilations, begin, end)


def _correlated(grad, w, groups, window: Window, out_size):
    """``out[m, c, i, j] = sum_{o, ki, kj} w[c, o, ki, kj] * grad_pad[m, o, i*s + ki*d, j*s + kj*d]``: the
    convolution (no flip) of ``grad`` [M, K, Q_y, Q_x], padded by ``window.begin``/``end``, with ``w``
    [C, K/g, k_y, k_x]; one GEMM per group and block of taps over all instances and positions."""
    xp = array_module(grad)
    m, k_out, qh, qw = grad.shape
    begin = window.begin
    size = [max(b + q + e, s * (n - 1) + span)
            for b, q, e, s, n, span in zip(begin, (qh, qw), window.end, window.strides, out_size, window.span)]
    padded = xp.zeros((m, k_out, *size), grad.dtype)
    padded[:, :, begin[0] : begin[0] + qh, begin[1] : begin[1] + qw] = grad
    c, kog = w.shape[:2]
    cig = c // groups
    taps = [(i, j) for i in range(window.kernel[0]) for j in range(window.kernel[1])]
    result = xp.zeros((m, c, *out_size), grad.dtype)
    block = max(1, TEMP_BYTES // max(1, kog * m * out_size[0] * out_size[1] * grad.itemsize))
    for g in range(groups):
        source = padded[:, g * kog : (g + 1) * kog]
        wg = w[g * cig : (g + 1) * cig]
        total = 0
        for start in range(0, len(taps), block):
            chosen = taps[start : start + block]
            cols = xp.concatenate([_tap(source, i, j, window, out_size).transpose(1, 0, 2, 3).reshape(kog, -1)
                                   for i, j in chosen])  # [taps*K/g, M*H*W]
            left = xp.concatenate([wg[:, :, i, j] for i, j in chosen], axis=1)  # [C/g, taps*K/g]
            total = total + xp.matmul(left, cols)
        result[:, g * cig : (g + 1) * cig] = total.reshape(cig, m, *out_size).transpose(1, 0, 2, 3)
    return result


def _resize(node, ins, is_data, out, grad):
    """Resize and Upsample are linear in their input, one interpolation matrix per spatial axis (nearest, linear
    and cubic are separable): the gradient is ``A_y^T grad A_x``. The matrices are onnxruntime's own, read off
    impulses (``resize_matrices``), so every mode and phase is onnxruntime's."""
    x, xp = ins[0], array_module(grad)
    if tuple(out.shape[:2]) != tuple(x.shape[:2]):
        raise NotDecodable("it resizes the batch or channel axis")
    a_y, a_x = resize_matrices(node, [None if v is None or d else np.asarray(v) for v, d in zip(ins, is_data)],
                               tuple(x.shape[2:]), tuple(out.shape[2:]))
    g = xp.matmul(xp.asarray(a_y.T, grad.dtype), grad)  # [M, C, H_in, W_out]
    return [xp.matmul(g, xp.asarray(a_x, grad.dtype))] + [None] * (len(ins) - 1), _none_added(grad)


def resize_matrices(node, constants: list, in_size, out_size) -> tuple[np.ndarray, np.ndarray]:
    """``(A_y [H_out, H_in], A_x [W_out, W_in])`` of a Resize/Upsample node: onnxruntime run once on row and
    column impulses (an input [H_in + W_in, 1, H_in, W_in]), cached per node and size."""
    key = (node.SerializeToString(), tuple(None if c is None else (c.tobytes(), c.shape, str(c.dtype))
                                            for c in constants[1:]), in_size, out_size)
    if key not in _RESIZE_CACHE:
        _RESIZE_CACHE[key] = _resize_impulses(node, constants, in_size, out_size)
    return _RESIZE_CACHE[key]


_RESIZE_CACHE: dict = {}


def _resize_impulses(node, constants, in_size, out_size):
    from onnx import TensorProto, helper, numpy_helper

    (h, w), (qh, qw) = in_size, out_size
    batch = h + w
    inputs, inits = ["x"], []
    for index, (name, value) in enumerate(zip(node.input[1:], constants[1:]), start=1):
        if not name:
            inputs.append("")
            continue
        value = np.asarray(value)
        if node.op_type == "Resize" and index == 3 and value.size == 4:  # sizes [N, C, H, W]: this batch
            value = np.asarray([batch, 1, *value[2:]], value.dtype)
        inits.append(numpy_helper.from_array(value, f"c{index}"))
        inputs.append(f"c{index}")
    one = helper.make_node(node.op_type, inputs, ["y"], **{a.name: helper.get_attribute_value(a)
                                                          for a in node.attribute})
    graph = helper.make_graph([one], "impulses", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    attrs = attributes(node)
    opset = 9 if node.op_type == "Upsample" else 10 if len(node.input) == 2 else (
        11 if attrs.get("coordinate_transformation_mode") == "tf_half_pixel_for_nn" else 19)
    impulses = np.zeros((batch, 1, h, w), np.float32)
    impulses[np.arange(h), 0, np.arange(h), :] = 1.0
    impulses[h + np.arange(w), 0, :, np.arange(w)] = 1.0
    try:
        y = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])).run(
            None, {"x": impulses})[0]
    except FdsubError as exc:
        raise NotDecodable(str(exc)) from None
    if y.shape != (batch, 1, qh, qw):
        raise NotDecodable(f"resizing impulses gave shape {list(y.shape)}, not [{batch}, 1, {qh}, {qw}]")
    a_y, a_x = y[:h, 0, :, 0].T.astype(np.float64), y[h:, 0, 0, :].T.astype(np.float64)
    if not (np.allclose(a_y.sum(axis=1), 1, atol=1e-5) and np.allclose(a_x.sum(axis=1), 1, atol=1e-5)):
        raise NotDecodable("its interpolation weights do not sum to 1 (an extrapolation value or crop-and-resize)")
    return a_y, a_x


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
    "Resize": _resize, "Upsample": _resize, "ConvTranspose": _conv_transpose,
}
#: ``deconvnet``: the local rules with the rectifiers overridden (a mode is a table of overrides)
DECONVNET_RULES = LOCAL_RULES | {"Relu": _relu_deconvnet, "Clip": _clip_deconvnet, "LeakyRelu": _leaky_deconvnet,
                                 "PRelu": _leaky_deconvnet}
#: the backward modes and their rule tables
BACKWARD_MODES = {"local": LOCAL_RULES, "deconvnet": DECONVNET_RULES}
