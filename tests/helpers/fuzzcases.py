"""The fuzz generator: hostile `fdsub` command lines, run in a capped worker process, and the checks every run must
pass. Shared by tests/cli/test_fuzz.py (a few hundred cases) and tools/fuzz.py (thousands, with a summary).

A *case* is plain data (JSON): a command, the model file it gets (good, mutated by ``mutations``, byte-flipped,
truncated, or not a file at all), the images (arrays of every wrong kind, one PNG, a folder, builtins of any
count, a FIFO), result folders to read back (good, tampered field by field, garbage), where ``--out`` points
(new, taken by another command's result, a file, a folder in the way, odd names) and options drawn from every
value class (huge, negative, fractional, NaN, text, unicode). ``Worker`` materializes each case in its own
folder and runs it in process with typer's CliRunner, inside a child process whose address space is capped, so
a run that would allocate without bound fails there instead of taking the machine; a run past its time limit
is a hang. ``problems(case, outcome)`` lists what the run got wrong:

- an exit other than 0 or 2 (1 is `check`'s and `zoo`'s "a check failed");
- on exit 2, anything but exactly one line, ``error: ...`` (`zoo` reports a model it could not check in its
  table, exit 2, and goes on with the others);
- a traceback, ``internal error``, or a hang;
- on failure, any file created, changed or removed in the case folder (in or beside --out: checkpoints too);
- on success, NaN in a result file without a ``warning:`` line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
MEMORY_CAP = 6 << 30  # bytes of address space for the worker
CASE_SECONDS = 60.0  # a case running longer is a hang
COMMANDS = ("inspect", "decode", "top", "merge", "nf", "fidelity", "check", "report", "zoo")
WEIGHTS = (10, 22, 16, 8, 10, 8, 6, 3, 4)  # report and fidelity are the slow ones
LAYERS = ("c2", "p1", "feat_one", "conv_b", "[/]", "nope", "../..", "c\u00e9", "", "c2 ", "\udcff")


# ---- values -----------------------------------------------------------------------------------------------
def _texts():
    return st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=12)


INTS = st.one_of(st.integers(-3, 12).map(str), st.sampled_from(
    ["0", "-1", "1000000000000", "99999999999999999999", "2.5", "abc", "", "1e3", "0x10", " 3", "\u0663", "+4"]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr), st.sampled_from(
    ["nan", "inf", "-inf", "1e400", "0", "-0", "abc", "", "0.5,0.5,0.5", "1,2", "0.5,nan,0.5", ",,,"]))
NEURONS = st.one_of(st.text(st.sampled_from("0123456789,- "), max_size=10), st.sampled_from(
    ["0", "0-5", "5-0", "0-1000000000000", "-1", "99", "a", "0,0,1", "3-3", ",", "1-"]))
SHAPES = st.one_of(st.sampled_from(["1,3,16,16", "1,3,32,32", "1,3,16", "0,3,16,16", "1,3,100000,100000", "a,b,c,d",
                                    "1,1,16,16", "2,3,16,16", "1,3,-16,16", ""]), _texts())
CHOICE = {
    "--mode": ["weights", "fds", "local", "deconvnet", "", "Local", "nf", "all"],
    "--select": ["all", "positive", "max", "topk:1", "topk:0", "topk:x", "topk:-2", "none", ""],
    "--preset": ["raw", "torchvision", "caffe", "tf", "imagenet", ""],
    "--dtype": ["float32", "float64", "float16", "int8", ""],
    "--device": ["cpu", "auto", "gpu", "tpu", ""],
    "--shard": ["0/2", "1/2", "2/2", "0/0", "1of2", "-1/2", "0/1000000000000", "a/b", "0/3", "/"],
    "--modes": ["weights", "weights,nf", "nf", "weights,fds", "local", "", "bogus", "weights,weights"],
    "--layers": ["c2", "feat_one,c2", "p1", "nope", "", ",", "[/]"],
}
#: values a careful user gives, drawn most of the time so that runs also succeed (and results get checked)
VALID = {
    "--neurons": ["0", "0-2", "1,3", "5"], "--top": ["1", "2", "3"], "--batch-size": ["1", "4"],
    "--per-image": ["1", "2"], "--scale": ["1", "0.5"], "--mean": ["0", "0.5,0.5,0.5"], "--std": ["1", "0.5"],
    "--input-shape": ["1,3,16,16"], "--sample": ["1", "2"], "--neurons-per-layer": ["1", "2"], "--max-rf": ["10"],
    "--tolerance": ["1e-4"], "--min-coverage": ["0.5", "1"], "--max-dead": ["0.9"], "--grid": ["1", "2", "64"],
    "--mode": ["weights", "fds", "local"],
    "--select": ["all", "max", "topk:1"], "--preset": ["raw", "torchvision", "caffe"], "--dtype": ["float64"],
    "--device": ["cpu"], "--shard": ["0/2", "1/2"], "--modes": ["weights", "weights,nf"], "--layers": ["c2"],
}
#: option -> hostile values, for the commands that take it
OPTIONS = {
    "--neurons": NEURONS, "--top": INTS, "--batch-size": INTS, "--per-image": INTS, "--scale": FLOATS,
    "--mean": FLOATS, "--std": FLOATS, "--input-shape": SHAPES, "--sample": INTS, "--neurons-per-layer": INTS,
    "--max-rf": INTS, "--grid": INTS, "--tolerance": FLOATS, "--min-coverage": FLOATS, "--max-dead": FLOATS,
    **{k: st.one_of(st.sampled_from(v), _texts()) for k, v in CHOICE.items()},
}
TAKES = {
    "inspect": ["--input-shape"],
    "decode": ["--neurons", "--mode", "--top", "--select", "--batch-size", "--preset", "--mean", "--std", "--scale",
               "--input-shape", "--dtype", "--device", "--grid"],
    "top": ["--neurons", "--top", "--per-image", "--batch-size", "--preset", "--mean", "--std", "--scale", "--shard",
            "--input-shape", "--device"],
    "merge": ["--top"],
    "nf": ["--neurons", "--top", "--batch-size", "--preset", "--scale", "--input-shape", "--device", "--grid"],
    "fidelity": ["--neurons", "--top", "--modes", "--select", "--batch-size", "--preset", "--scale", "--device",
                 "--grid"],
    "check": ["--sample", "--neurons-per-layer", "--max-rf", "--tolerance", "--min-coverage", "--max-dead",
              "--preset", "--dtype", "--input-shape", "--layers"],
    "report": ["--neurons", "--top", "--select", "--batch-size", "--layers"],
    "zoo": [],
}
FLAGS = {"inspect": ["--json"], "decode": ["--per-instance", "--bgr", "--rgb"], "top": ["--rgb"],
         "check": ["--json"], "zoo": ["--json"]}


# ---- what a case is made of -----------------------------------------------------------------------------------
MODEL_KINDS = ["good"] * 12 + ["refused", "accepted", "flip", "truncate", "missing", "folder", "fifo", "empty",
                              "garbage", "text"]
IMAGE_KINDS = ["npy"] * 10 + ["builtin"] * 2 + ["png", "folder", "npy-uint8", "npy-shape", "npy-nan", "npy-object",
                             "npz-empty", "garbage", "missing", "fifo", "txt", "png-broken", "npy-int-0-1",
                             "npz-truncated", "png-huge"]
OUT_KINDS = ["new"] * 9 + ["default", "nested", "empty-dir", "same-kind", "other-kind", "file", "dir-in-way",
                           "odd-name", "link", "dot", "checkpoint-dir", "below-file", "name-too-long"]
RESULT_KINDS = ["good"] * 3 + ["nan", "image-beyond", "neuron-99", "position", "images-done", "garbage-npz",
                              "missing-json", "digest", "ranges", "other-layer", "empty-dir"]


@st.composite
def cases(draw) -> dict:
    """One hostile command line, as data."""
    from mutations import ACCEPTED, REFUSED

    command = draw(st.sampled_from([c for c, w in zip(COMMANDS, WEIGHTS) for _ in range(w)]))
    model = {"kind": draw(st.sampled_from(MODEL_KINDS))}
    if model["kind"] == "refused":
        model["name"] = draw(st.sampled_from(sorted(REFUSED)))
    elif model["kind"] == "accepted":
        model["name"] = draw(st.sampled_from(sorted(ACCEPTED)))
    elif model["kind"] == "flip":
        model["flips"] = draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4))
    elif model["kind"] == "truncate":
        model["keep"] = draw(st.floats(0, 1))
    images = {"kind": draw(st.sampled_from(IMAGE_KINDS))}
    if images["kind"] == "builtin":
        images["spec"] = draw(st.one_of(st.sampled_from(
            ["builtin:glyphs:4", "builtin:blobs:3", "builtin:gratings", "builtin:glyphs:100000000000", "builtin:x",
             "builtin:blobs:0", "builtin:blobs:-2", "builtin:", "builtin:glyphs:\u0663"]),
            st.integers(1, 12).map(lambda n: f"builtin:blobs:{n}")))
    case = {"command": command, "model": model, "images": images,
            "layer": draw(st.sampled_from(list(LAYERS[:3]) * 6 + list(LAYERS))),
            "out": draw(st.sampled_from(OUT_KINDS)), "results": [], "options": [], "flags": [], "zoo": None}
    if command == "merge":
        case["results"] = draw(st.lists(st.sampled_from(RESULT_KINDS + ["shard0", "shard1", "shard0"]), min_size=1,
                                        max_size=3))
    if command == "nf" and draw(st.booleans()):
        case["results"] = [draw(st.sampled_from(RESULT_KINDS))]
    if command == "zoo":
        case["zoo"] = draw(_zoo_texts())
    for option in draw(st.lists(st.sampled_from(TAKES[command] or ["--top"]), max_size=3, unique=True)):
        if option in TAKES[command]:
            hostile = draw(st.integers(0, 9)) < 3
            case["options"] += [option, draw(OPTIONS[option] if hostile else st.sampled_from(VALID[option]))]
    flags = FLAGS.get(command, []) + (["--frobnicate"] if draw(st.integers(0, 19)) == 0 else [])
    case["flags"] = draw(st.lists(st.sampled_from(flags), max_size=1)) if flags else []
    return case


@st.composite
def _zoo_texts(draw) -> str:
    keys = {"path": ['"net.onnx"', '"missing.onnx"', "3", '["net.onnx"]', '"onnx-light:nope"'],
            "sample": ["1", '"three"', "true", "-1", "0"], "seed": ["0", '"abc"', "1.5"],
            "layers": ['["c2"]', "[1, 2]", '"c2"', '""'], "images": ['"builtin:blobs:2"', "5", '"nowhere"'],
            "input_shape": ["[1, 3, 16, 16]", "[3, 16, 16]", '"1,3,16,16"'], "neurons_per_layer": ["1", "0", "1e9"],
            "tolerance": ["1e-4", '"tight"', "nan"], "name": ['"a"', "7"], "bogus": ["1"]}
    entry = [f"{k} = {draw(st.sampled_from(v))}" for k, v in keys.items()
             if k == "path" or draw(st.integers(0, 3)) == 0]
    text = "[[models]]\n" + "\n".join(entry) + "\n"
    return draw(st.sampled_from([text, text, "[defaults]\nneurons_per_layer = 1\n" + text, "models = 3\n",
                                 "a = " + "[" * 3000 + "]" * 3000, "[[models]\n", text + text]))


# ---- materializing and running ------------------------------------------------------------------------------
class Fixtures:
    """The good inputs every case starts from, made once per worker."""

    def __init__(self, folder: Path):
        from clirun import invoke
        from mutations import base_model

        self.folder = folder
        (folder / "net.onnx").write_bytes(base_model().SerializeToString())
        self.model_bytes = (folder / "net.onnx").read_bytes()
        np.save(folder / "images.npy", np.random.default_rng(1).random((6, 3, 16, 16)).astype(np.float32))
        for name, extra in (("top", []), ("shard0", ["--shard", "0/2"]), ("shard1", ["--shard", "1/2"])):
            result = invoke("top", folder / "net.onnx", "--layer", "c2", "--images", folder / "images.npy", "--top",
                            3, "--out", folder / name, *extra)
            assert result.exit_code == 0, result.output


def materialize(case: dict, root: Path, fx: Fixtures) -> list[str]:
    """Make the case's files under ``root``; the argument list of its command line."""
    from mutations import ACCEPTED, REFUSED

    command = case["command"]
    model = _model(case["model"], root, fx, REFUSED, ACCEPTED)
    images = _images(case["images"], root, fx)
    out = _out(case["out"], root, fx, command)
    if command == "inspect":
        args = [command, model]
    elif command == "merge":
        args = [command, *[_result(kind, root / f"part{i}", fx) for i, kind in enumerate(case["results"])]]
    elif command == "zoo":
        (root / "net.onnx").write_bytes(fx.model_bytes)
        (root / "zoo.toml").write_text(case["zoo"])
        args = [command, root / "zoo.toml"]
    elif command == "check":
        args = [command, model, "--images", images]
    elif command == "report":
        args = [command, model, "--images", images, "--layers", "c2", "--neurons", "0", "--top", "2"]
    else:
        args = [command, model, "--layer", case["layer"]]
        if command != "decode" or case["images"]["kind"] != "npy" or "--mode" in case["options"]:
            args += ["--images", images]
        if command == "fidelity":
            args += ["--holdout", "builtin:blobs:5", "--modes", "weights,nf", "--top", "2"]
        if command == "nf" and case["results"]:
            args += ["--from-top", _result(case["results"][0], root / "from", fx)]
    if out is not None and command not in ("inspect", "check", "zoo"):
        args += ["--out", out]
    return [str(a) for a in (*args, *case["options"], *case["flags"])]


def _model(spec, root, fx, refused, accepted):
    path = root / "model.onnx"
    kind = spec["kind"]
    if kind == "good":
        path.write_bytes(fx.model_bytes)
    elif kind == "refused":
        path.write_bytes(refused[spec["name"]][0]().SerializeToString())
    elif kind == "accepted":
        path.write_bytes(accepted[spec["name"]]().SerializeToString())
    elif kind == "flip":
        data = bytearray(fx.model_bytes)
        for where, value in spec["flips"]:
            data[min(int(where * len(data)), len(data) - 1)] = value
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        path.write_bytes(fx.model_bytes[: int(spec["keep"] * len(fx.model_bytes))])
    elif kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "text":
        path.write_text("this is not an ONNX model\n")
    return path


def _images(spec, root, fx):
    kind = spec["kind"]
    good = np.load(fx.folder / "images.npy")
    path = root / ("images.npy" if kind.startswith("npy") else "images")
    if kind == "npy":
        shutil.copy(fx.folder / "images.npy", path)
    elif kind == "builtin":
        return spec["spec"]
    elif kind == "png" or kind == "folder":
        from PIL import Image

        target = root / "photos" if kind == "folder" else root / "one.png"
        if kind == "folder":
            target.mkdir()
            (target / "notes.txt").write_text("x")
            (target / "broken.png").write_bytes(b"\x89PNG broken")
        for i in range(3 if kind == "folder" else 1):
            Image.fromarray((good[i].transpose(1, 2, 0) * 255).astype(np.uint8)).save(
                target / f"{i}.png" if kind == "folder" else target)
        return target
    elif kind == "npy-uint8":
        np.save(path, (good * 255).astype(np.uint8))
    elif kind == "npy-int-0-1":
        np.save(path, (good > 0.5).astype(np.int64))
    elif kind == "npy-shape":
        np.save(path, good[:, :, :8])
    elif kind == "npy-nan":
        bad = good.copy()
        bad[0, 0, 0, 0] = np.nan
        np.save(path, bad)
    elif kind == "npy-object":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "npz-empty":
        path = root / "images.npz"
        np.savez(path)
    elif kind == "garbage":
        path.write_bytes(b"\x93NUMPY\x01\x00garbage")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "txt":
        path = root / "images.txt"
        path.write_text("x")
    elif kind == "png-broken":
        path = root / "broken.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif kind == "png-huge":  # 100 megapixels: read like any photograph, no raw DecompressionBombWarning
        from PIL import Image

        made = fx.folder / "huge.png"  # made once per worker, when a case first asks for it
        if not made.exists():  # over Pillow's decompression-bomb warning limit (89 MP), under its error limit
            Image.new("L", (10_000, 10_000), 128).save(made)
        path = root / "huge.png"
        shutil.copy(made, path)
    elif kind == "npz-truncated":  # a real archive cut short: the zip reader's own exception
        path = root / "images.npz"
        np.savez(path, images=good)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


RESULT_FOR = {"decode": "decoded.npz", "top": "top.npz", "nf": "decoded.npz", "fidelity": "fidelity.json",
              "report": "index.html", "merge": "top.npz"}


def _out(kind, root, fx, command):
    out = root / "out"
    if kind == "default":
        return None
    if kind == "nested":
        return root / "a" / "b" / "out"
    if kind == "empty-dir":
        out.mkdir()
    elif kind in ("same-kind", "other-kind"):
        same = command in ("top", "merge")
        shutil.copytree(fx.folder / "top", out) if same == (kind == "same-kind") else _decoded_folder(out)
    elif kind == "file":
        out.write_text("mine")
    elif kind == "dir-in-way":
        (out / RESULT_FOR.get(command, "x")).mkdir(parents=True)
        (out / "filters.png").mkdir()
        (out / "top.json").mkdir()
    elif kind == "odd-name":
        return root / "o [/] \u00e9 'q' $x"
    elif kind == "link":
        os.symlink(root / "nowhere", out)
    elif kind == "dot":
        return Path(".")
    elif kind == "checkpoint-dir":  # a folder where top keeps its checkpoint beside --out
        (root / ".out.top-checkpoint.npz").mkdir()
    elif kind == "below-file":
        (root / "afile").write_text("mine")
        return root / "afile" / "out"
    elif kind == "name-too-long":
        return root / ("x" * 300)
    return out


def _decoded_folder(out: Path) -> None:
    """A `fdsub decode` (weights) result in ``out``."""
    import fdsub_onnx as fd

    decoded = fd.Decoded(np.zeros((1, 3, 3, 3), np.float32), np.zeros(1, np.float32), np.arange(1), (1, 1), (0, 0),
                         "c2", "weights")
    fd.save_decoded(decoded, out)


def _result(kind, folder: Path, fx) -> Path:
    """A top-N result folder of ``kind`` (good, a shard, or broken in one way)."""
    source = fx.folder / (kind if kind in ("shard0", "shard1") else "top")
    shutil.copytree(source, folder)
    if kind == "empty-dir":
        shutil.rmtree(folder)
        folder.mkdir()
        return folder
    with np.load(folder / "top.npz") as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads((folder / "top.json").read_text())
    if kind == "nan":
        arrays["values"][:] = np.nan
    elif kind == "image-beyond":
        arrays["image_index"][:] = 60
    elif kind == "neuron-99":
        arrays["neurons"][0] = 99
    elif kind == "position":
        arrays["position"][:] = 40
    elif kind == "images-done":
        meta["images_done"] = "x"
    elif kind == "digest":
        meta["sources"] = meta["sources"][::-1]
    elif kind == "ranges":
        meta["ranges"] = [[0, 99]]
    elif kind == "other-layer":
        arrays["layer"] = np.asarray("p1")
        meta["layer"] = "p1"
    np.savez(folder / "top.npz", **arrays)
    (folder / "top.json").write_text(json.dumps(meta))
    if kind == "garbage-npz":
        (folder / "top.npz").write_bytes(b"PK\x03\x04garbage")
    elif kind == "missing-json":
        (folder / "top.json").unlink()
    return folder


def snapshot(root: Path) -> dict:
    """Every entry under ``root``: its kind and, for a file, a digest of its bytes (nothing is opened but files)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                seen[rel] = "link"
            elif path.is_file():
                seen[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
            else:
                seen[rel] = "dir" if path.is_dir() else "special"
    return seen


def run_case(case: dict, root: Path, fx: Fixtures) -> dict:
    """Materialize and run one case in ``root`` (the working directory); what it gave."""
    from clirun import runner

    from fdsub_onnx.cli.main import app

    root.mkdir(parents=True)
    args = materialize(case, root, fx)
    before = snapshot(root)
    cwd = os.getcwd()
    os.chdir(root)
    start = time.perf_counter()
    try:
        result = runner.invoke(app, args)
    finally:
        os.chdir(cwd)
    seconds = time.perf_counter() - start
    after = snapshot(root)
    return {"args": args, "exit": result.exit_code, "output": result.output, "seconds": seconds,
            "changed": sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)),
            "nan": _nan_in_results(root, before), "exception": None if result.exception is None or isinstance(
                result.exception, SystemExit) else f"{type(result.exception).__name__}: {result.exception}"}


def _nan_in_results(root: Path, before: dict) -> list[str]:
    """Result files written by the run that hold NaN."""
    found = []
    for rel in snapshot(root):
        path = root / rel
        if rel in before or not path.is_file():
            continue
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    if any(data[k].dtype.kind == "f" and np.isnan(data[k]).any() for k in data.files):
                        found.append(rel)
            elif path.suffix == ".json" and _has_nan(json.loads(path.read_text())):
                found.append(rel)
        except (OSError, ValueError):
            continue
    return found


def _has_nan(value) -> bool:
    if isinstance(value, float):
        return value != value
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    return isinstance(value, list) and any(_has_nan(v) for v in value)


def problems(case: dict, outcome: dict) -> list[str]:
    """What the run got wrong (module docstring); empty when it behaved."""
    if outcome.get("hang"):
        return [f"hang: no answer in {CASE_SECONDS:.0f} s"]
    if outcome.get("crash"):
        return [f"worker died: {outcome['crash']}"]
    text, code = outcome["output"], outcome["exit"]
    lines = text.strip().splitlines()
    found = []
    allowed = (0, 1, 2) if case["command"] in ("check", "zoo") else (0, 2)
    if code not in allowed:
        found.append(f"exit {code}")
    if "Traceback" in text or "internal error" in text or outcome["exception"]:
        found.append(f"internal error: {outcome['exception'] or text.strip()[-300:]}")
    raw = [line for line in lines if re.search(r"\b\w+Warning: ", line)]
    if raw:
        found.append(f"raw warning: {raw[0][:200]}")
    zoo_report = case["command"] == "zoo" and lines and (lines[-1].startswith("ERROR: ") or '"error"' in text)
    if code == 2 and not zoo_report and (len(lines) != 1 or not lines[0].startswith("error: ")):
        found.append(f"{len(lines)} lines on exit 2, not one error: line")
    if code != 0 and outcome["changed"]:
        found.append(f"left {', '.join(outcome['changed'][:4])} on failure")
    if code == 0 and outcome["nan"] and "warning:" not in text:
        found.append(f"NaN in {', '.join(outcome['nan'])} without a warning")
    return found


def classes(case: dict) -> list[str]:
    """The input classes of a case, for the summary."""
    names = [f"command:{case['command']}", f"out:{case['out']}"]
    if case["command"] not in ("merge", "zoo"):
        names.append(f"model:{case['model'].get('name', case['model']['kind'])}")
    if case["command"] not in ("inspect", "merge", "zoo"):
        names.append(f"images:{case['images']['kind']}")
    names += [f"result:{kind}" for kind in case["results"]]
    names += [f"option:{option}" for option in case["options"][::2]]
    names += [f"flag:{flag}" for flag in case["flags"]]
    return names


# ---- the capped worker --------------------------------------------------------------------------------------
class Worker:
    """A child process that runs cases one at a time (JSON lines in, JSON lines out); restarted after a hang."""

    def __init__(self):
        self.proc = None
        self.folder = Path(tempfile.mkdtemp(prefix="fdsub-fuzz-"))
        self.count = 0

    def _start(self):
        def cap():
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0", COLUMNS="80")
        env.pop("FDSUB_DEBUG", None)
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fuzzcases.py"), "--serve", str(self.folder)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=cap,
                                     env=env)
        ready = self._read(120)
        if ready != {"ready": True}:
            raise RuntimeError(f"the fuzz worker did not start: {ready}")

    def _read(self, timeout):
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not readable:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"crash": f"exit {self.proc.wait()}"}

    def run(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.count += 1
        self.proc.stdin.write(json.dumps({"case": case, "name": f"case{self.count}"}) + "\n")
        self.proc.stdin.flush()
        outcome = self._read(CASE_SECONDS)
        if outcome is None or "crash" in outcome:
            self.close()
            return outcome or {"hang": True}
        return outcome

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def cleanup(self):
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def serve(folder: Path) -> None:
    """The worker's loop: cases from stdin, outcomes to stdout; each case's folder removed after it."""
    sys.path.insert(0, str(HERE))
    fixtures_dir = folder / "fixtures"
    fixtures_dir.mkdir(exist_ok=True)
    fx = Fixtures(fixtures_dir)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but outcomes on the pipe
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        root = folder / request["name"]
        try:
            outcome = run_case(request["case"], root, fx)
        except Exception as exc:  # a broken generator, not the tool: reported as such
            outcome = {"args": [], "exit": -1, "output": f"fuzz harness: {type(exc).__name__}: {exc}", "seconds": 0,
                       "changed": [], "nan": [], "exception": f"harness: {exc!r}"}
        finally:
            shutil.rmtree(root, ignore_errors=True)
        out.write(json.dumps(outcome) + "\n")
        out.flush()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--serve":
    serve(Path(sys.argv[2]))
