"""Channel gates held in ``weights`` mode: each gate's value on a reference input, from onnxruntime on the model.

A squeeze-and-excitation gate multiplies a map by per-channel values computed from the data; a data-free
decoding needs one value per channel. The default reference is the input that is all zeros, i.e. the
dataset mean once the preset's normalization is applied; a set of images instead holds each gate at its
mean over them. The ``check`` identity runs on a linearized copy with the same held values.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..compose.ops import RULES
from ..data.images import read_indices
from ..data.topn import instance_weights
from ..errors import FdsubError
from ..graph.model import Model, ancestors
from ..graph.patterns import Attention, Bilinear, ChannelGate, TokenScale
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
    return [*channel_gates(model, targets), *layer_norms(model, targets), *token_scales(model, targets),
            *(name for out, p in attentions(model, targets).items() for name in _factors(p, out))]


def _factors(pattern, out: str) -> dict[str, str]:
    """Held name -> the tensor it holds, of an attention product or a bilinear one."""
    if isinstance(pattern, Bilinear):
        return {f"{out}::left": pattern.left, f"{out}::right": pattern.right}
    return {out: pattern.held}


def token_scales(model: Model, targets) -> dict[str, TokenScale]:
    """The normalizations written out (Mul/Div output -> TokenScale: RMSNorm, a legacy LayerNorm) below ``targets``:
    their factor is held at its mean over the positions, as LayerNormalization's 1/std."""
    return _patterns_below(model, targets, TokenScale)


def layer_norms(model: Model, targets) -> dict[str, object]:
    """The layer norms (output -> node; ``OpRule.held_factor``) that ``targets`` depend on: their 1/std is held."""
    return {n.output[0]: n for n in ancestors(model, list(targets))
            if n.op_type in RULES and RULES[n.op_type].held_factor}


def _inverse_std(node, x: np.ndarray) -> np.ndarray:
    """Per image, the norm's held 1/std (``OpRule.inverse_std``: a LayerNormalization's mean over the positions [1],
    an InstanceNormalization's per channel [C])."""
    return RULES[node.op_type].inverse_std(node, np.asarray(x, np.float64))


class HeldFactors:
    """Reads, per image, the value each data-dependent factor below ``targets`` is held at: a channel gate's
    per-channel value [C], a layer norm's 1/std [1], an attention matrix or a bilinear product's factor (one image's
    tensor, in its own shape). ``kinds``: "all", or "tokens" for revision 3's factors alone (layer norms, attention
    and bilinear products: fds holds them per decoded neuron, its channel gates over all images)."""

    def __init__(self, model: Model, targets, device="cpu", kinds: str = "all"):
        self.model, self.device, self._forward = model, device, None
        self.gates = channel_gates(model, targets) if kinds == "all" else {}
        self.norms, attention = layer_norms(model, targets), attentions(model, targets)
        self.scales = token_scales(model, targets)
        self.factors = {name: tensor for out, p in attention.items() for name, tensor in _factors(p, out).items()}
        self.names = [*self.gates, *self.norms, *self.scales, *self.factors]
        self._reads = ([p.gate for p in self.gates.values()] + [n.input[0] for n in self.norms.values()]
                       + [p.scale for p in self.scales.values()] + list(self.factors.values()))

    def per_image(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Held name -> its value on each image of ``batch`` [count, ...] (float64). The onnxruntime session is
        made on the first call (asking which factors there are costs none)."""
        if self._forward is None:
            self._forward = Forward(self.model, self._reads, self.device)
        values, count, model = self._forward(batch), len(batch), self.model
        out = {mul: np.asarray(values[p.gate], np.float64).reshape(count, -1) for mul, p in self.gates.items()}
        out |= {name: np.asarray(values[tensor], np.float64).reshape(count, *model.shapes[tensor])
                for name, tensor in self.factors.items()}  # one image's tensor (its batch axis may hold patches)
        out |= {name: _mean_factor(p, values[p.scale], count)[:, None] for name, p in self.scales.items()}
        return out | {name: _inverse_std(n, values[n.input[0]]) for name, n in self.norms.items()}

    def image_bytes(self) -> int:
        """Bytes of one image's held values (float64)."""
        return 8 * sum(int(np.prod(self.model.shapes.get(t) or (1,))) for t in self._reads)


def _mean_factor(pattern: TokenScale, scale, count: int) -> np.ndarray:
    """Per image, a written-out normalization's factor (the scale, or 1 over it for a division) averaged over the
    positions."""
    scale = np.asarray(scale, np.float64).reshape(count, -1)
    return (1 / scale if pattern.divide else scale).mean(axis=1)


def reference_gates(model: Model, targets, reference=None, device="cpu", batch_size: int = 32) -> dict[str, np.ndarray]:
    """Output -> held value of every data-dependent factor below ``targets`` (``HeldFactors``); on the all-zeros
    input, or (``reference``, an image set) the mean over its images."""
    if reference is None:  # the same for every decode of the model: computed once (a session costs 0.3 s on ViT-S)
        key = ("reference", id(model.nodes), tuple(held_names(model, targets)))
        if key not in model.cache:
            held = HeldFactors(model, targets, device)
            zeros = np.zeros((1, *model.input_shape[1:]), np.float32)
            model.cache.clear()  # one entry: a ViT-S's attention matrices alone are 22 MB
            model.cache[key] = {name: v[0] for name, v in held.per_image(zeros).items()} if held.names else {}
        return dict(model.cache[key])
    held = HeldFactors(model, targets, device)
    if not held.names:
        return {}
    sums, count = dict.fromkeys(held.names, 0.0), 0
    for _, batch in reference.batches(batch_size):
        for name, v in held.per_image(batch).items():
            sums[name] = sums[name] + v.sum(axis=0)
        count += len(batch)
    if count == 0:
        raise FdsubError("the gate reference image set is empty; give at least one image")
    return {mul: total / count for mul, total in sums.items()}


def token_factor_values(model: Model, target: str) -> int:
    """Values per image of the factors fds holds per neuron below ``target`` (``HeldFactors`` "tokens": attention
    matrices, bilinear factors, written-out normalizations' scales, layer norms' inputs), from shapes alone."""
    return HeldFactors(model, [target], kinds="tokens").image_bytes() // 8


#: bytes the per-neuron sums of ``neuron_means`` may hold at once (a group of neurons per pass over the images), and
#: the images of one onnxruntime run there
NEURON_MEANS_BUDGET, NEURON_MEANS_BATCH = 2**29, 8


def neuron_means(model: Model, target: str, top, images, device="cpu", batch_size: int = NEURON_MEANS_BATCH,
                 budget: int = NEURON_MEANS_BUDGET) -> Iterator[dict[str, np.ndarray]]:
    """fds's held factors (revision 3: layer norms, attention and bilinear products) below ``target``, per neuron of
    ``top`` (its ``TopN``): their activation-weighted mean over the neuron's top instances (an image holding several
    of them counts as often). One pass over the images those instances lie in per group of neurons whose sums fit
    in ``budget`` bytes, yielded neuron by neuron (no more than a group's sums alive)."""
    held = HeldFactors(model, [target], device, kinds="tokens")
    weights = instance_weights(top)
    weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)
    if not held.names:
        yield from ({} for _ in range(len(weights)))
        return
    group = max(1, budget // max(held.image_bytes(), 1))
    for lo in range(0, len(weights), group):
        rows = np.arange(lo, min(lo + group, len(weights)))
        per_image = np.zeros((len(rows), len(images)))
        for i, k in enumerate(rows):
            filled = top.image_index[k] >= 0
            np.add.at(per_image[i], top.image_index[k][filled], weights[k][filled])
        used = np.flatnonzero(per_image.any(axis=0))
        sums = {name: None for name in held.names}
        for first, batch in read_indices(images, used, batch_size):
            index = np.arange(first, first + len(batch))
            for name, v in held.per_image(batch).items():
                part = np.tensordot(per_image[:, index], v, axes=(1, 0))
                sums[name] = part if sums[name] is None else sums[name] + part
        for i in range(len(rows)):
            yield {name: total[i] for name, total in sums.items()}
