"""Resize, Upsample, ConvTranspose (FPN necks, U-Nets, segmentation heads): decoded per position, not bottom-up.

After an upsampling by s, neighbouring output positions read the same input positions in a pattern that
repeats every s steps: a neuron's filter depends on the phase of its output position. Bottom-up composition
holds one filter per channel, so it cannot represent that (``PhaseDependent``); the adjoint route decodes
these layers at one position at a time (``modes.adjoint``) with their backward rules, and the layers below still
decode bottom-up.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ...errors import FdsubError, NotDecodable, PhaseDependent
from ..backend import array_module, session
from ..kernels import correlated, transposed_window
from ._rule import OpRule, attributes, constant_weight, no_bias, on
from .op_conv import conv_bias

PHASE = ("a neuron's filter after it depends on the phase of its output position (upsampling repeats input "
         "positions every scale steps), which one filter per channel cannot hold; the layers before it decode")


class Resize(OpRule):
    linear = True

    def apply(self, node, inputs, ctx):
        raise PhaseDependent(f"it upsamples: {PHASE}")

    def backward(self, node, ins, is_data, out, grad):
        """Resize and Upsample are linear in their input, one interpolation matrix per spatial axis (nearest, linear
        and cubic are separable): the gradient is ``A_y^T grad A_x``. The matrices are onnxruntime's own, read off
        impulses (``resize_matrices``), so every mode and phase is onnxruntime's."""
        x, xp = ins[0], array_module(grad)
        if tuple(out.shape[:2]) != tuple(x.shape[:2]):
            raise NotDecodable("it resizes the batch or channel axis")
        a_y, a_x = resize_matrices(node, [None if v is None or d else np.asarray(v) for v, d in zip(ins, is_data)],
                                   tuple(x.shape[2:]), tuple(out.shape[2:]))
        g = xp.matmul(xp.asarray(a_y.T, grad.dtype), grad)  # [M, C, H_in, W_out]
        return [xp.matmul(g, xp.asarray(a_x, grad.dtype))] + [None] * (len(ins) - 1), no_bias(grad)

    def flops(self, model, node, size):
        x = model.shapes.get(node.input[0])
        return 2.0 * size * (sum(x[2:]) if x else 1)


class Upsample(Resize): ...


class ConvTranspose(OpRule):
    linear = True

    def apply(self, node, inputs, ctx):
        raise PhaseDependent(f"a transposed convolution upsamples: {PHASE}")

    def backward(self, node, ins, is_data, out, grad):
        """The gradient of a transposed convolution is the convolution of the output gradient with the same kernel."""
        x, w = ins[0], on(grad, ins[1])  # w [C_in, C_out/g, k_y, k_x]
        attrs = attributes(node)
        window = transposed_window(attrs, x.shape[2:], out.shape[2:], w.shape[2:])
        gx = correlated(grad, w, int(attrs.get("group", 1)), window, x.shape[2:])
        return [gx, None, None][: len(ins)], conv_bias(grad, ins)

    def flops(self, model, node, size):
        weight = constant_weight(model, node)
        if weight is None:
            return size
        x = model.shapes.get(node.input[0])
        return 2.0 * np.prod(x[1:] if x else 1) * np.prod(weight.shape[1:])

    def forward_product(self, model, node):
        """onnxruntime's GEMM, then its scatter of the columns: ~60 GFLOP/s a core where a convolution runs ~110
        (a decoder's 4x4 stride-2 layers, 256 -> 128 channels)."""
        weight = constant_weight(model, node)  # [C_in, C_out / group, k_y, k_x]
        if weight is None or np.ndim(weight) < 3:
            return None
        inputs_per_group = np.shape(weight)[0] // int(attributes(node).get("group", 1))
        return "slow" if inputs_per_group * np.shape(weight)[1] > 1 else None  # depthwise: its tensors' time


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
    (h, w), (qh, qw) = in_size, out_size
    batch = h + w
    inputs, inits = ["x"], []
    for index, (name, value) in enumerate(zip(node.input[1:], constants[1:]), start=1):
        if not name:
            inputs.append("")
            continue
        value = np.asarray(value)
        if node.op_type == Resize.__name__ and index == 3 and value.size == 4:  # sizes [N, C, H, W]: this batch
            value = np.asarray([batch, 1, *value[2:]], value.dtype)
        inits.append(numpy_helper.from_array(value, f"c{index}"))
        inputs.append(f"c{index}")
    one = helper.make_node(node.op_type, inputs, ["y"], **{a.name: helper.get_attribute_value(a)
                                                          for a in node.attribute})
    graph = helper.make_graph([one], "impulses", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    attrs = attributes(node)
    opset = 9 if node.op_type == Upsample.__name__ else 10 if len(node.input) == 2 else (
        11 if attrs.get("coordinate_transformation_mode") == "tf_half_pixel_for_nn" else 19)
    impulses = np.zeros((batch, 1, h, w), np.float32)
    impulses[np.arange(h), 0, np.arange(h), :] = 1.0
    impulses[h + np.arange(w), 0, :, np.arange(w)] = 1.0
    y = _run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), impulses)
    if y.shape != (batch, 1, qh, qw):
        raise NotDecodable(f"resizing impulses gave shape {list(y.shape)}, not [{batch}, 1, {qh}, {qw}]")
    a_y, a_x = y[:h, 0, :, 0].T.astype(np.float64), y[h:, 0, 0, :].T.astype(np.float64)
    if not (np.allclose(a_y.sum(axis=1), 1, atol=1e-5) and np.allclose(a_x.sum(axis=1), 1, atol=1e-5)):
        raise NotDecodable("its interpolation weights do not sum to 1 (an extrapolation value or crop-and-resize)")
    return a_y, a_x


def _run(proto, impulses):
    """onnxruntime on ``proto`` (one node) with the impulses: its own interpolation, every mode and phase."""
    try:
        runner = session(proto)
    except FdsubError as exc:  # onnxruntime's own error: this node has no impulse response here
        raise NotDecodable(str(exc)) from None
    return runner.run(None, {"x": impulses})[0]
