"""Channel gates held in ``weights`` mode: each gate's value on a reference input, from onnxruntime on the model.

A squeeze-and-excitation gate multiplies a map by per-channel values computed from the data; a data-free
decoding needs one value per channel. The default reference is the input that is all zeros, i.e. the
dataset mean once the preset's normalization is applied; a set of images instead holds each gate at its
mean over them. The ``check`` identity runs on a linearized copy with the same held values.
"""

from __future__ import annotations

import numpy as np

from ..compose.ops import RULES
from ..errors import FdsubError
from ..graph.model import Model, ancestors
from ..graph.patterns import Attention, Bilinear, ChannelGate
from ..runtime.session import Forward

REFERENCE = "the input that is all zeros after normalization (the dataset mean)"


def _patterns_below(model: Model, targets, kinds) -> dict:
    """Output -> pattern of the export patterns of ``kinds`` that ``targets`` (tensor names) depend on."""
    outputs = {o for node in ancestors(model, list(targets)) for o in node.output}
    return {out: p for out, p in model.patterns.items() if isinstance(p, kinds) and out in outputs}


def channel_gates(model: Model, targets) -> dict[str, ChannelGate]:
    """The channel gates (Mul output -> ChannelGate) that ``targets`` (tensor names) depend on."""
    return _patterns_below(model, targets, ChannelGate)


def attentions(model: Model, targets) -> dict[str, Attention | Bilinear]:
    """The attention products (MatMul output -> Attention: the matrix is held) and products of two data tensors
    (-> Bilinear: both factors held, the tangent plane) that ``targets`` depend on."""
    return _patterns_below(model, targets, Attention | Bilinear)


def held_names(model: Model, targets) -> list[str]:
    """The names ``reference_gates`` gives values under for ``targets``: a gate's, a norm's, an attention's output;
    a bilinear product's two factors as ``<output>::left`` and ``<output>::right`` (``_factors``)."""
    return [*channel_gates(model, targets), *layer_norms(model, targets),
            *(name for out, p in attentions(model, targets).items() for name in _factors(p, out))]


def _factors(pattern, out: str) -> dict[str, str]:
    """Held name -> the tensor it holds, of an attention product or a bilinear one."""
    if isinstance(pattern, Bilinear):
        return {f"{out}::left": pattern.left, f"{out}::right": pattern.right}
    return {out: pattern.held}


def layer_norms(model: Model, targets) -> dict[str, object]:
    """The layer norms (output -> node; ``OpRule.held_factor``) that ``targets`` depend on: their 1/std is held."""
    return {n.output[0]: n for n in ancestors(model, list(targets))
            if n.op_type in RULES and RULES[n.op_type].held_factor}


def _inverse_std(node, x: np.ndarray) -> np.ndarray:
    """Per image, LayerNormalization's 1/sqrt(var + eps) over the last axis, averaged over the positions."""
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    x = np.asarray(x, np.float64)
    return (1 / np.sqrt(x.var(axis=-1) + eps)).reshape(len(x), -1).mean(axis=1)


def reference_gates(model: Model, targets, reference=None, device="cpu", batch_size: int = 32) -> dict[str, np.ndarray]:
    """Output -> held value of every data-dependent factor below ``targets``: a channel gate's per-channel value [C],
    a layer norm's 1/std [1], an attention matrix (one image's tensor, in its own shape); on the all-zeros input, or
    (``reference``, an image set) the mean over its images."""
    gates, norms, attention = channel_gates(model, targets), layer_norms(model, targets), attentions(model, targets)
    if not gates and not norms and not attention:
        return {}
    factors = {name: tensor for out, p in attention.items() for name, tensor in _factors(p, out).items()}
    forward = Forward(model, [p.gate for p in gates.values()] + [n.input[0] for n in norms.values()]
                      + list(factors.values()), device)

    def held(values, count) -> dict[str, np.ndarray]:  # per image: [count, C] gates, [count, 1] inverse stds
        out = {mul: np.asarray(values[p.gate], np.float64).reshape(count, -1) for mul, p in gates.items()}
        out |= {name: np.asarray(values[tensor], np.float64).reshape(count, *model.shapes[tensor])
                for name, tensor in factors.items()}  # one image's tensor (its batch axis may hold patches)
        return out | {name: _inverse_std(n, values[n.input[0]])[:, None] for name, n in norms.items()}

    if reference is None:
        return {name: v[0] for name, v in held(forward(np.zeros((1, *model.input_shape[1:]), np.float32)), 1).items()}
    sums, count = {name: 0.0 for name in [*gates, *norms, *factors]}, 0
    for _, batch in reference.batches(batch_size):
        for name, v in held(forward(batch), len(batch)).items():
            sums[name] = sums[name] + v.sum(axis=0)
        count += len(batch)
    if count == 0:
        raise FdsubError("the gate reference image set is empty; give at least one image")
    return {mul: total / count for mul, total in sums.items()}
