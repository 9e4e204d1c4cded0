"""Capture with onnxruntime: the streaming top-N instances (image, position) of each neuron of a layer.

The instances of a neuron are ranked by one total order: higher activation first, then lower image
index, then lower position (row-major). Top-N under a total order is associative, so batches,
shards and resumed runs all combine exactly into the result of one uninterrupted scan.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ._backend import CPU, resolve_device
from ._decode import find_layer
from ._errors import FdsubError
from ._io import decoded_files, write_atomically, write_file_atomically
from ._model import Model
from ._neurons import parse_neurons

TOP_NPZ = "top.npz"
TOP_JSON = "top.json"
NPZ_KEYS = ("values", "image_index", "position", "neurons", "layer", "per_image")
CHECKPOINT_SECONDS = 2.0  # at most this long between checkpoint writes (and one more on the way out)
_LAST = np.iinfo(np.int64).max  # tie key of an unfilled slot: after every real instance


@dataclass
class TopN:
    """The best instances of each selected neuron; row k belongs to neuron ``neurons[k]``.

    ``values`` float32 [K, N] descending per row (-inf where unfilled), ``image_index`` int64
    [K, N] (-1 where unfilled), ``position`` int64 [K, N, 2] (row, col in the layer's output map;
    (0, 0) for a rank-2 layer), ``sources`` names every image of the set (image indices refer to
    it), ``images_done`` counts the images scanned, ``per_image`` the instances allowed per image.
    """

    values: np.ndarray
    image_index: np.ndarray
    position: np.ndarray
    neurons: np.ndarray
    layer: str
    sources: list[str]
    images_done: int = 0
    per_image: int = 1
    skipped: list = field(default_factory=list)

    @property
    def top(self) -> int:
        return self.values.shape[1]


def capture_top(model: Model, layer: str, images, top: int = 100, neurons=None, per_image: int = 1,
                batch_size: int = 32, shard: tuple[int, int] | None = None,
                checkpoint: str | os.PathLike | None = None, progress=None, device="cpu") -> TopN:
    """Scan ``images`` with onnxruntime and keep each neuron's ``top`` best instances.

    ``neurons`` is a selector (see ``parse_neurons``). ``per_image`` instances at most per image
    and neuron (default 1: the image's maximum, first position on ties). ``shard=(i, n)`` scans
    only the i-th of n contiguous blocks of images; ``merge_top`` of all n equals one run.
    With ``checkpoint`` the state is saved there as batches complete (and when interrupted); a
    later call with the same path resumes after the last completed batch. ``progress(done,
    total)`` is called before the first batch and after each one, with images scanned in this shard.
    ``device`` ("cpu", "gpu", "auto") picks onnxruntime's execution provider (``resolve_device``).

    >>> top = capture_top(model, "conv3", ArrayImages(x), top=10)     # doctest: +SKIP
    >>> top.values.shape, top.position.shape                          # doctest: +SKIP
    ((64, 10), (64, 10, 2))
    """
    target = find_layer(model, layer).output[0]
    shape = model.shapes.get(target)
    if shape is None or len(shape) not in (2, 4):
        raise FdsubError(f"layer {target!r} has output shape {shape}; top-N capture needs [N, C, H, W] or [N, C]")
    picked = parse_neurons(neurons, shape[1], target)
    for name, value, least in (("top", top, 1), ("per_image", per_image, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise FdsubError(f"{name} must be a positive integer, got {value!r}")
    first, stop = _shard_range(len(images), shard)
    given, wanted = list(_image_shape(images)), list(model.input_shape[1:])
    if given != wanted:
        raise FdsubError(f"images are {given} but input {model.input_name!r} takes {wanted}; pass --input-shape or resize the images")
    run = Forward(model, [target], device)
    width = shape[3] if len(shape) == 4 else 1  # flat position -> (row, col)
    every = np.array_equal(picked, np.arange(shape[1]))  # all neurons in order: no copy of the activations
    signature = {"layer": target, "neurons": picked.tolist(), "top": int(top), "per_image": int(per_image),
                 "range": [first, stop], "sources": len(images), "model": os.path.abspath(model.path)}
    state = start_top(picked, target, images, int(per_image), int(top))
    if checkpoint is not None:
        state = _resume(Path(checkpoint), signature, state)
    total = stop - first
    saved, last_save = state.images_done, time.monotonic()
    if progress is not None:
        progress(state.images_done, total)
    try:
        start = first + state.images_done
        for index, batch in (images.batches(batch_size, start) if start < stop else ()):
            if index >= stop:
                break
            batch = batch[: stop - index]
            acts = np.asarray(run(batch)[target], np.float32).reshape(len(batch), shape[1], -1)
            acts = acts if every else acts[:, picked]
            state = update_top(state, acts, index, width)
            state.images_done = index + len(batch) - first
            if checkpoint is not None and time.monotonic() - last_save >= CHECKPOINT_SECONDS:
                _save_checkpoint(Path(checkpoint), state, signature, images)
                saved, last_save = state.images_done, time.monotonic()
            if progress is not None:
                progress(state.images_done, total)
    finally:
        if checkpoint is not None and state.images_done > saved:
            _save_checkpoint(Path(checkpoint), state, signature, images)
    state.skipped = _union(state.skipped, getattr(images, "skipped", []))
    return state


def merge_top(parts: list[TopN], top: int | None = None) -> TopN:
    """Combine partial results (shards) exactly: the top-N of their union, as one run would give."""
    if not parts:
        raise FdsubError("nothing to merge; give at least one top-N result")
    head = parts[0]
    for part in parts[1:]:
        for what, a, b in (("layer", head.layer, part.layer), ("per_image", head.per_image, part.per_image),
                           ("neurons", head.neurons.tolist(), part.neurons.tolist()),
                           ("image sources", head.sources, part.sources)):
            if a != b:
                shown = f"{len(a)} vs {len(b)} entries" if what == "image sources" and len(a) != len(b) else f"{_short(a)} vs {_short(b)}"
                raise FdsubError(f"cannot merge top-N results with different {what} ({shown}); shards must come from the same command")
    least = min(p.top for p in parts)
    top = least if top is None else top
    if not 1 <= top <= least:
        raise FdsubError(f"cannot merge into top {top}: the parts keep {least} instances per neuron")
    state = start_top(head.neurons, head.layer, head, head.per_image, top)
    state.values = np.concatenate([p.values for p in parts], axis=1)
    state.image_index = np.concatenate([p.image_index for p in parts], axis=1)
    state.position = np.concatenate([p.position for p in parts], axis=1)
    state = _select(state, top)
    state.images_done = sum(p.images_done for p in parts)
    state.skipped = _union(*(p.skipped for p in parts))
    return state


# ---- onnxruntime ---------------------------------------------------------------------------
class Forward:
    """One onnxruntime session computing several tensors of the model at once: batched, unless the graph fixes
    the batch size (then one image at a time)."""

    def __init__(self, model: Model, names: list[str], device="cpu"):
        self.names, self.input = [n for n in dict.fromkeys(names) if n != model.input_name], model.input_name
        self.session, self.batched, self.checked = None, False, False
        providers = resolve_device(device).providers
        if self.names:
            try:
                self.session, self.batched = _session(_pruned(model.proto, self.names, model.input_name, batch="N"), providers), True
            except FdsubError:
                self.session = _session(_pruned(model.proto, self.names, model.input_name, batch=None), providers)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Each tensor for the batch (and the batch itself, under the input's name)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        outs = self._batched(batch) if self.batched and len(batch) > 1 else None
        if outs is None and not self.names:
            outs = []
        elif outs is None:
            runs = [self._run(batch[i : i + 1]) for i in range(len(batch))]
            outs = [np.concatenate([r[j] for r in runs]) for j in range(len(self.names))]
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


def _pruned(proto: onnx.ModelProto, target, input_name: str, batch: str | None) -> onnx.ModelProto:
    """Copy of ``proto`` computing only ``target`` (a tensor name or a list: its outputs); ``batch`` names a
    dynamic batch dim."""
    produced = {out: node for node in proto.graph.node for out in node.output}
    targets = [target] if isinstance(target, str) else list(target)
    needed, stack, seen = [], list(targets), set()
    while stack:
        name = stack.pop()
        node = produced.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        needed.append(node)
        stack.extend(n for n in node.input if n)
        stack.extend(_subgraph_inputs(node))
    used = set().union(*(set(n.input) | set(_subgraph_inputs(n)) for n in needed)) if needed else set()
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    graph = result.graph
    kept = [n for n in proto.graph.node if id(n) in seen]
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in proto.graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in proto.graph.input if i.name == input_name or i.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    for inp in graph.input:
        if inp.name == input_name and batch is not None:
            dim = inp.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = batch
    del graph.value_info[:]
    del graph.output[:]
    graph.output.extend(onnx.ValueInfoProto(name=t) for t in targets)
    return result


def _subgraph_inputs(node) -> list[str]:
    """Outer-scope names read by If/Loop/Scan bodies (rare in CNNs, but keep them computable)."""
    names = []
    for attr in node.attribute:
        for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in graph.node:
                names.extend(n for n in inner.input if n)
    return names


def _session(proto: onnx.ModelProto, providers=CPU.providers):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures come back as one-line errors; a failed batched try is expected
    try:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=list(providers))
    except Exception as exc:
        raise FdsubError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0]}") from None


# ---- the streaming top-N -------------------------------------------------------------------
def _candidates(acts: np.ndarray, first: int, per_image: int, width: int):
    """Each image's best ``per_image`` positions per neuron: values, image [K, B*k] and position [K, B*k, 2]."""
    b, k_neurons, p = acts.shape
    if per_image == 1:
        pos = np.argmax(acts, axis=2)[..., None]  # argmax: the first maximum in row-major order
    else:
        pos = _best(acts, [np.broadcast_to(np.arange(p), acts.shape)], per_image)
    values = np.take_along_axis(acts, pos, axis=2)  # [B, K, k]: selected in the activations' own layout
    if np.isnan(values).any():  # NaN wins argmax; only then pay for a copy ranking it as -inf
        return _candidates(np.where(np.isnan(acts), -np.inf, acts), first, per_image, width)
    image = np.broadcast_to(first + np.arange(b)[:, None, None], pos.shape)
    values, image, pos = (a.transpose(1, 0, 2).reshape(k_neurons, -1) for a in (values, image, pos))
    return values, image, np.stack([pos // width, pos % width], axis=-1)


def update_top(state: TopN, acts: np.ndarray, first: int, width: int) -> TopN:
    """The state after one batch of activations [B, K, H*W] of images ``first``, ``first + 1``, ..."""
    return _merge(state, _candidates(acts, first, state.per_image, width), state.top)


def _merge(state: TopN, candidates, top: int) -> TopN:
    """The state with one batch's candidates merged in (a new object: an interrupt leaves the old intact).

    Only rows where some candidate reaches the row's current last value can change; the others are kept.
    """
    values, image, position = candidates
    rows = np.flatnonzero((values >= state.values[:, -1:]).any(axis=1))
    part = TopN(np.concatenate([state.values[rows], values[rows]], axis=1),
                np.concatenate([state.image_index[rows], image[rows]], axis=1),
                np.concatenate([state.position[rows], position[rows]], axis=1),
                state.neurons, state.layer, state.sources, state.images_done, state.per_image, state.skipped)
    part = _select(part, top)
    merged = TopN(state.values.copy(), state.image_index.copy(), state.position.copy(), state.neurons, state.layer,
                  state.sources, state.images_done, state.per_image, state.skipped)
    merged.values[rows], merged.image_index[rows], merged.position[rows] = part.values, part.image_index, part.position
    return merged


def _select(state: TopN, top: int) -> TopN:
    """Keep the ``top`` best columns of every row under the total order."""
    image_key = np.where(state.image_index < 0, _LAST, state.image_index)
    flat_key = state.position[..., 0] * (1 << 31) + state.position[..., 1]
    keep = _best(state.values, [image_key, flat_key], top)
    state.values = np.take_along_axis(state.values, keep, axis=1)
    state.image_index = np.take_along_axis(state.image_index, keep, axis=1)
    state.position = np.take_along_axis(state.position, keep[..., None], axis=1)
    return state


def _best(values: np.ndarray, ties: list[np.ndarray], k: int) -> np.ndarray:
    """Indices along the last axis of the ``k`` best entries, in order: value descending, then ``ties`` ascending.

    argpartition finds the k-th value; rows where it is tied with entries left out are ranked in
    full with lexsort (rare with real activations), so the choice never depends on argpartition.
    """
    m = values.shape[-1]
    if m <= k:
        chosen = np.broadcast_to(np.arange(m), values.shape)
    else:
        chosen = np.argpartition(-values, k - 1, axis=-1)[..., :k]
        kth = np.take_along_axis(values, chosen, axis=-1).min(axis=-1, keepdims=True)
        tied = (values >= kth).sum(axis=-1) > k
        if tied.any():
            rows = values[tied]
            order = np.lexsort([t[tied] for t in reversed(ties)] + [-rows], axis=-1)[..., :k]
            chosen = chosen.copy()
            chosen[tied] = order
    keys = [np.take_along_axis(np.broadcast_to(t, values.shape), chosen, axis=-1) for t in ties]
    order = np.lexsort([*reversed(keys), -np.take_along_axis(values, chosen, axis=-1)], axis=-1)
    return np.take_along_axis(chosen, order, axis=-1)


def instance_weights(top: TopN) -> np.ndarray:
    """Instance weights for activation-weighted means: w = max(activation, 0) per filled slot (NaN and unfilled: 0); equal weights for a neuron whose are all 0."""
    filled = top.image_index >= 0
    weights = np.where(filled & (top.values > 0), top.values, 0).astype(np.float64)
    zero = weights.sum(axis=1) == 0
    weights[zero] = filled[zero]
    return weights


def start_top(neurons, layer, images, per_image, top) -> TopN:
    """An empty state: every slot unfilled."""
    k = len(neurons)
    return TopN(np.full((k, top), -np.inf, np.float32), np.full((k, top), -1, np.int64),
                 np.zeros((k, top, 2), np.int64), np.asarray(neurons, np.int64), layer,
                 list(images.sources), 0, per_image, [])


def _shard_range(count: int, shard) -> tuple[int, int]:
    """Shard i of n is the contiguous block [i*count//n, (i+1)*count//n) of image indices."""
    if shard is None:
        return 0, count
    i, n = (int(v) for v in shard)
    if not (n >= 1 and 0 <= i < n):
        raise FdsubError(f"shard {i}/{n} does not exist; shards are numbered 0 to n-1, e.g. 0/4 ... 3/4")
    return i * count // n, (i + 1) * count // n


def _image_shape(images) -> tuple[int, ...]:
    """[C, H, W] of the image set (from its array, or its first batch)."""
    array = getattr(images, "array", None)
    if array is not None:
        return tuple(array.shape[1:])
    shape = getattr(images, "image_shape", None)
    if shape is not None:
        return tuple(shape)
    for _, batch in images.batches(1):
        return tuple(batch.shape[1:])
    raise FdsubError("the image set is empty; give at least one image")


def _union(*lists) -> list:
    """Concatenation without repeats, order kept (skipped-image notes from several runs)."""
    seen, out = set(), []
    for items in lists:
        for item in items:
            item = list(item) if isinstance(item, (list, tuple)) else item
            key = json.dumps(item)
            if key not in seen:
                seen.add(key)
                out.append(item)
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- files ---------------------------------------------------------------------------------
def top_arrays(top: TopN) -> dict[str, np.ndarray]:
    """The top.npz contract's arrays, keyed by name."""
    return {
        "values": np.ascontiguousarray(top.values, dtype=np.float32),
        "image_index": np.ascontiguousarray(top.image_index, dtype=np.int64),
        "position": np.ascontiguousarray(top.position, dtype=np.int64),
        "neurons": np.asarray(top.neurons, dtype=np.int64),
        "layer": np.asarray(str(top.layer)),
        "per_image": np.asarray(int(top.per_image), dtype=np.int64),
    }


def top_sidecar(top: TopN) -> dict:
    """The top.json contract: what the arrays do not hold."""
    return {"layer": top.layer, "sources": list(top.sources), "images_done": int(top.images_done),
            "skipped": [list(s) if isinstance(s, (list, tuple)) else s for s in top.skipped]}


def save_top(top: TopN, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``out_dir/top.npz`` and ``out_dir/top.json`` atomically; return their paths."""
    return write_atomically(out_dir, *top_files(top))


def top_files(top: TopN):
    """The names ``save_top`` writes and the writer that makes them in a folder (to combine with other results)."""
    def write(folder: Path) -> None:
        with open(folder / TOP_NPZ, "wb") as f:
            np.savez(f, **top_arrays(top))
        (folder / TOP_JSON).write_text(json.dumps(top_sidecar(top)))

    return [TOP_NPZ, TOP_JSON], write


def load_top(path: str | os.PathLike) -> TopN:
    """Read a result written by ``save_top``: its folder, or the top.npz inside it (top.json beside it)."""
    path = Path(path)
    npz_path = path / TOP_NPZ if path.is_dir() else path
    json_path = npz_path.with_name(TOP_JSON)
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            missing = [k for k in NPZ_KEYS if k not in data.files]
            if missing:
                raise FdsubError(f"{npz_path} is not a top-N result: it lacks {', '.join(missing)}")
            arrays = {k: data[k] for k in NPZ_KEYS}
        sidecar = json.loads(json_path.read_text())
    except FdsubError:
        raise
    except FileNotFoundError as exc:
        raise FdsubError(f"no top-N result at {path}: {exc.filename} is missing; give a folder written by `fdsub top`") from None
    except (OSError, ValueError, EOFError) as exc:
        raise FdsubError(f"cannot read the top-N result at {path} ({type(exc).__name__}); give a folder written by `fdsub top`") from None
    return _checked(arrays, sidecar, path)


def _checked(arrays: dict, sidecar, path) -> TopN:
    """A TopN from the contract's arrays and sidecar, after checking shapes and types."""
    values, image, position, neurons = (arrays[k] for k in ("values", "image_index", "position", "neurons"))
    k, n = values.shape if values.ndim == 2 else (-1, -1)
    good = (values.ndim == 2 and image.shape == (k, n) and position.shape == (k, n, 2) and neurons.shape == (k,)
            and values.dtype.kind == "f" and all(a.dtype.kind in "iu" for a in (image, position, neurons)))
    if not good or not isinstance(sidecar, dict) or not isinstance(sidecar.get("sources"), list):
        raise FdsubError(f"{path} holds a malformed top-N result (shapes values {values.shape}, image_index {image.shape}, position {position.shape}, neurons {neurons.shape})")
    layer = str(arrays["layer"])
    if sidecar.get("layer", layer) != layer:
        raise FdsubError(f"{path}: top.npz is for layer {layer!r} but top.json for {sidecar.get('layer')!r}")
    return TopN(values.astype(np.float32), image.astype(np.int64), position.astype(np.int64), neurons.astype(np.int64),
                layer, [str(s) for s in sidecar["sources"]], int(sidecar.get("images_done", 0)),
                int(arrays["per_image"]), list(sidecar.get("skipped", [])))


# ---- checkpoints ---------------------------------------------------------------------------
def _save_checkpoint(path: Path, state: TopN, signature: dict, images) -> None:
    """The state and what run it belongs to, as one npz replaced atomically."""
    sidecar = top_sidecar(state)
    sidecar["skipped"] = _union(state.skipped, getattr(images, "skipped", []))
    del sidecar["sources"]  # the image set gives them back; the signature checks their count
    meta = json.dumps({"signature": signature, "sidecar": sidecar})
    write_file_atomically(path, lambda f: np.savez(f, meta=np.asarray(meta), **top_arrays(state)),
                          label="checkpoint ", hint="; check the folder and free space")


def _resume(path: Path, signature: dict, fresh: TopN) -> TopN:
    """The state saved at ``path`` when it belongs to this run; ``fresh`` when there is none."""
    if not path.exists():
        return fresh
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in NPZ_KEYS}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise FdsubError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to start over") from None
    if meta.get("signature") != signature:
        raise FdsubError(f"checkpoint {path} belongs to a different run (other model, layer, neurons, images or options); delete it to start over")
    sidecar = dict(meta["sidecar"], sources=fresh.sources)
    return _checked(arrays, sidecar, path)


def save_with_top(decoded, top: TopN, out_dir: str | os.PathLike) -> list[Path]:
    """Write a data-driven result (decoded.npz, filters.png) with its instances (top.npz, top.json), atomically."""
    decoded_names, write_decoded = decoded_files(decoded)
    top_names, write_top = top_files(top)

    def write(folder: Path) -> None:
        write_decoded(folder)
        write_top(folder)

    return write_atomically(out_dir, decoded_names + top_names, write)


def rows_of(top: TopN, neurons) -> TopN:
    """The instances of ``neurons`` only, in that order."""
    index = [int(np.flatnonzero(top.neurons == n)[0]) for n in neurons]
    return dataclasses.replace(top, values=top.values[index], image_index=top.image_index[index],
                               position=top.position[index], neurons=np.asarray(neurons, np.int64))
