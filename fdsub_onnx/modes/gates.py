"""Channel gates held in ``weights`` mode: each gate's value on a reference input, from onnxruntime on the model.

A squeeze-and-excitation gate multiplies a map by per-channel values computed from the data; a data-free
decoding needs one value per channel. The default reference is the input that is all zeros, i.e. the
dataset mean once the preset's normalization is applied; a set of images instead holds each gate at its
mean over them. The ``check`` identity runs on a linearized copy with the same held values.
"""

from __future__ import annotations

import numpy as np

from ..errors import FdsubError
from ..graph.model import Model, ancestors
from ..graph.patterns import ChannelGate
from ..runtime.session import Forward

REFERENCE = "the input that is all zeros after normalization (the dataset mean)"


def channel_gates(model: Model, targets) -> dict[str, ChannelGate]:
    """The channel gates (Mul output -> ChannelGate) that ``targets`` (tensor names) depend on."""
    outputs = {o for node in ancestors(model, list(targets)) for o in node.output}
    return {mul: p for mul, p in model.patterns.items() if isinstance(p, ChannelGate) and mul in outputs}


def reference_gates(model: Model, targets, reference=None, device="cpu", batch_size: int = 32) -> dict[str, np.ndarray]:
    """Mul output -> per-channel value [C] of every channel gate below ``targets``: on the all-zeros input, or
    (``reference``, an image set) the mean over its images."""
    gates = channel_gates(model, targets)
    if not gates:
        return {}
    forward = Forward(model, [p.gate for p in gates.values()], device)
    if reference is None:
        values = forward(np.zeros((1, *model.input_shape[1:]), np.float32))
        return {mul: np.asarray(values[p.gate], np.float64).reshape(-1) for mul, p in gates.items()}
    sums, count = {mul: 0.0 for mul in gates}, 0
    for _, batch in reference.batches(batch_size):
        values = forward(batch)
        for mul, p in gates.items():
            sums[mul] = sums[mul] + np.asarray(values[p.gate], np.float64).reshape(len(batch), -1).sum(axis=0)
        count += len(batch)
    if count == 0:
        raise FdsubError("the gate reference image set is empty; give at least one image")
    return {mul: total / count for mul, total in sums.items()}
