"""The onnxruntime wrapper every data path shares: one session computing several tensors at once."""

from __future__ import annotations

import numpy as np

from ..compose.backend import resolve_device, session
from ..defaults import budget_text, memory_budget, require_memory
from ..errors import FdsubError
from ..graph.model import Model, ancestors
from ..graph.prune import pruned

PEAK_TENSORS = 3  # tensors of one image alive at once in onnxruntime, at most (input, output, one held for a sum)
FETCHED_BYTES = 8  # per value of a tensor a pass asks for: onnxruntime's float32 output and NumPy's copy of it
#: a session fetching at most this many tensors keeps onnxruntime's CPU memory arena: 1.03-1.07x plain onnxruntime
#: for a top-N capture on EfficientNet-Lite2 instead of 1.19-1.26x without it, and what the arena keeps is about the
#: batch the estimates count. A session fetching many (the fds passes, local's forward values) goes without: there
#: the arena kept its largest batch's tensors in chunks grown by powers of two for the session's life (5.8 GB
#: instead of 4.0 GB on an fds pass over EfficientNet-B0)
ARENA_TENSORS = 1
PASS_SHARE = 0.75  # of the memory budget, what one batch of a pass over images may hold (the rest: the process,
#                    the model, onnxruntime's session, the state kept across batches)


class Forward:
    """One onnxruntime session computing several tensors of the model at once: batched, unless the graph fixes
    the batch size (then one image at a time). ``threads``: onnxruntime's intra-op threads (default: its own
    choice, every core), set on cluster workers that share a machine."""

    def __init__(self, model: Model, names: list[str], device="cpu", threads: int | None = None):
        self.names, self.input = [n for n in dict.fromkeys(names) if n != model.input_name], model.input_name
        self.session, self.batched, self.checked = None, False, False
        self.image_bytes = image_bytes(model, self.names)
        providers = resolve_device(device).providers
        arena = len(self.names) <= ARENA_TENSORS
        if self.names:
            try:
                self.session, self.batched = (
                    session(pruned(model.proto, self.names, model.input_name, batch="N"), providers, threads, arena),
                    True)
            except FdsubError:
                self.session = session(pruned(model.proto, self.names, model.input_name, batch=None), providers,
                                       threads, arena)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Each tensor for the batch (and the batch itself, under the input's name)."""
        require_memory(len(batch) * self.image_bytes, f"running {len(batch)} image(s) through the model",
                       "use a smaller --batch-size, a smaller --input-shape or an earlier layer")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        outs = self._batched(batch) if self.batched and len(batch) > 1 else None
        if outs is None and not self.names:
            outs = []
        elif outs is None:
            runs = [self._run(batch[i : i + 1]) for i in range(len(batch))]
            outs = runs[0] if len(runs) == 1 else [np.concatenate([r[j] for r in runs]) for j in range(len(self.names))]
        values = dict(zip(self.names, outs))
        values[self.input] = batch
        return values

    def _batched(self, batch):
        """A batched run, checked once against a run of its first image alone; None (and one image at a time
        from then on) where the graph fixes the batch size, e.g. a Reshape to [1, -1]."""
        try:
            outs = self._run(batch)
        except FdsubError:
            outs = None
        if outs is not None and all(o.shape[:1] == (len(batch),) for o in outs):
            if self.checked or all(np.allclose(o[:1], one, rtol=1e-4, atol=1e-5)
                                   for o, one in zip(outs, self._run(batch[:1]))):
                self.checked = True
                return outs
        self.batched = False
        return None

    def _run(self, batch):
        try:
            return self.session.run(self.names, {self.input: batch})
        except Exception as exc:
            raise FdsubError(f"onnxruntime failed on {', '.join(map(repr, self.names[:3]))}: "
                             f"{str(exc).splitlines()[0]}") from None


def image_bytes(model: Model, names: list[str]) -> int:
    """Memory onnxruntime needs per image to compute ``names``: its largest tensors (float32), before it runs."""
    sizes = sorted((int(np.prod(model.shapes[t][1:], dtype=np.float64)) for node in ancestors(model, names)
                    for t in node.output if t in model.shapes), reverse=True)
    return 4 * (int(np.prod(model.input_shape[1:], dtype=np.float64)) + sum(sizes[:PEAK_TENSORS]))


def tensor_values(model: Model, names) -> int:
    """Values per image of the tensors ``names`` (those of unknown shape count 0)."""
    return sum(int(np.prod(model.shapes[t][1:], dtype=np.float64)) for t in dict.fromkeys(names)
               if t in model.shapes)


def fitting_batch(per_image: float, batch_size: int, what: str, fix: str) -> int:
    """The largest batch up to ``batch_size`` whose working set (``per_image`` bytes each) fits in PASS_SHARE of
    the memory budget: the peak of a pass over images is one batch's, whatever the number of images. A FdsubError
    when one image does not fit."""
    room = PASS_SHARE * memory_budget()
    if per_image > room:
        raise FdsubError(f"{what} needs about {per_image / 2**30:,.2f} GiB per image, over the "
                         f"{room / 2**30:,.2f} GiB a pass over images may take ({PASS_SHARE:.0%} of {budget_text()}); "
                         f"{fix}")
    return int(max(1, min(batch_size, room // max(per_image, 1))))
