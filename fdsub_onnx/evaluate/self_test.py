"""The `weights` identity of docs/method.md as a self-test: the identity's error against a linearized copy.

``linearized`` (``compose.linear_model``) builds the ONNX model that ``weights`` mode decodes, so onnxruntime
can compute the activations the decoded filters must predict exactly: for a neuron at output position q
whose receptive field lies in the image, ``activation == sum(filters[k] * patch(q)) + bias[k]``
(``identity_error``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..compose.linear_model import linearized
from ..errors import FdsubError
from .predict import predict

__all__ = ["IdentityError", "identity_error", "linearized"]


@dataclass
class IdentityError:
    """How far ``sum(filters * patch) + bias`` is from the activation on the interior positions of a layer.

    ``relative`` is ``max_abs / scale`` (``max_abs`` when ``scale`` is 0, NaN when a value is not finite);
    ``worst`` is (image, neuron, predicted, actual) at the largest error.
    """

    layer: str
    relative: float
    max_abs: float
    scale: float
    positions: int
    worst: tuple[int, int, float, float] | None

    def within(self, rtol: float, atol: float = 0.0) -> bool:
        """Whether the error is at most ``rtol * scale + atol`` (False for non-finite values or no position)."""
        return self.positions > 0 and np.isfinite(self.max_abs) and self.max_abs <= rtol * self.scale + atol


def identity_error(decoded, activation: np.ndarray, images: np.ndarray) -> IdentityError:
    """Compare ``decoded`` (filters of some neurons of a layer) with the layer's ``activation``.

    ``activation`` is the whole layer's output [N, C, H, W] (or [N, C] for a fully connected layer) on
    ``images`` [N, C_image, H, W]; its channels ``decoded.neurons`` are compared, in float64, on every
    output position whose receptive field lies in the image (``positions`` of them; 0 compares nothing).
    """
    act = np.asarray(activation, dtype=np.float64)
    if act.ndim == 2:
        act = act[:, :, None, None]
    if act.ndim != 4 or act.shape[0] != len(images):
        raise FdsubError(f"{decoded.layer}: activation of shape {list(act.shape)} for {len(images)} images")
    if not (len(decoded.neurons) == decoded.filters.shape[0] == len(decoded.bias)):
        raise FdsubError(f"{decoded.layer}: {len(decoded.neurons)} neurons, filters {list(decoded.filters.shape)}, "
                         f"bias {list(np.shape(decoded.bias))}")
    act = act[:, np.asarray(decoded.neurons)]
    mask = decoded.interior(images.shape[2:], act.shape[2:])
    if not mask.any() or len(decoded.neurons) == 0:
        return IdentityError(decoded.layer, float("nan"), float("nan"), 0.0, 0, None)
    got, want = predict(decoded, images, act.shape[2:], mask), act[:, :, mask]
    err = np.abs(got - want)
    scale = float(np.abs(want).max())
    if not np.isfinite(err).all():
        return IdentityError(decoded.layer, float("nan"), float("nan"), scale, int(mask.sum()), None)
    i, k, p = np.unravel_index(int(np.argmax(err)), err.shape)
    max_abs = float(err[i, k, p])
    return IdentityError(decoded.layer, max_abs / scale if scale else max_abs, max_abs, scale, int(mask.sum()),
                         (int(i), int(decoded.neurons[k]), float(got[i, k, p]), float(want[i, k, p])))

