"""The op-rule base class and the helpers every rule shares."""

from __future__ import annotations

import numpy as np

from ...errors import NotDecodable
from ...graph.model import attributes
from ..values import Const, Layout, Tensor

__all__ = ["OpRule", "attributes", "constant", "data", "optional", "per_channel"]


class OpRule:
    """One ONNX op: ``apply`` maps input values to the output value.

    The same call serves the geometry pass (banks are None) and decoding; rules do
    array work only through ``ctx.engine``, whose methods skip None banks.
    """

    def apply(self, node, inputs: list, ctx):
        raise NotImplementedError


def constant(value, what: str) -> np.ndarray:
    """The array of a constant input; data-dependent inputs are not decodable here."""
    if not isinstance(value, Const):
        raise NotDecodable(f"its {what} is computed from the image, not a constant")
    return value.value


def data(value) -> Tensor:
    """A data input as a Tensor (a pending layout that is not a plain tensor is refused)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Layout):
        raise NotDecodable("its input is a reshaped tensor that is not a channel permutation of a feature map")
    raise NotDecodable("expected a feature map input, got a constant")


def known_shape(ctx, name: str) -> tuple:
    """The shape of tensor ``name``; a rule that needs it cannot go on without it."""
    shape = ctx.shape(name)
    if shape is None:
        raise NotDecodable("the shape of its input is unknown")
    return shape


def optional(inputs: list, i: int):
    """Input i, or None when it is absent or empty."""
    return inputs[i] if len(inputs) > i else None


def per_channel(array: np.ndarray, channels: int, rank: int) -> np.ndarray:
    """A constant broadcast against [1, C, ...] as one value per channel [C]."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim > rank:
        raise NotDecodable(f"constant of shape {list(array.shape)} has more axes than the feature map")
    shape = (1,) * (rank - array.ndim) + array.shape
    flat = array.reshape(shape)
    others = [n for a, n in enumerate(shape) if a != 1]
    if any(n != 1 for n in others) or shape[1] not in (1, channels):
        raise NotDecodable(f"constant of shape {list(array.shape)} varies over space or batch, not only over channels")
    return np.broadcast_to(flat.reshape(-1), (channels,)).copy()
