"""Digests of what the commands write, to show that a change leaves every output the same, bit for bit.

    .venv/bin/python tools/digest.py write /tmp/before.json     # on the commit before the change
    .venv/bin/python tools/digest.py compare /tmp/before.json   # after it: each output that differs; exit 1 if any

It runs, in a temporary folder, the demo commands on ``models/demo.onnx`` with ``builtin:glyphs:64`` (``inspect
--json``; ``decode`` in every mode at conv2 and conv4, ``--per-instance`` for local; ``top``; ``nf``; ``fidelity``
of every decoding) and ``fdsub zoo models/zoo-modern.toml --json``. Every array of every ``.npz`` is digested as
its name, dtype, shape and bytes; every JSON (a result's, or a command's printed object) as its canonical text
with the fields that hold times, paths or the machine removed (``VOLATILE``). The ``report`` page is left out:
it embeds PNGs whose encoder may change, and every figure on it comes from the same arrays.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FDSUB = [sys.executable, "-m", "fdsub_onnx.cli"]
MODEL, IMAGES = str(ROOT / "models" / "demo.onnx"), "builtin:glyphs:64"
#: JSON keys whose values change from run to run or machine to machine, not with the method
VOLATILE = {"seconds", "elapsed", "time", "created", "path", "model_path", "out", "version", "machine", "host",
            "python", "numpy", "onnxruntime", "platform", "cwd", "file", "folder", "sources"}


def commands(out: Path) -> dict[str, list[str]]:
    """Name -> the command line whose outputs (files under out/name, or its printed JSON) are digested."""
    runs = {"inspect": ["inspect", MODEL, "--json"]}
    for layer in ("conv2", "conv4"):
        for mode in ("weights", "fds", "local", "deconvnet"):
            extra = ["--per-instance"] if mode == "local" else []
            data = [] if mode == "weights" else ["--images", IMAGES, "--top", "8"]
            runs[f"decode-{mode}-{layer}"] = ["decode", MODEL, "--layer", layer, "--mode", mode, "--neurons", "0-7",
                                               *data, *extra, "--out", str(out / f"decode-{mode}-{layer}")]
    runs["top-conv3"] = ["top", MODEL, "--layer", "conv3", "--images", IMAGES, "--top", "8", "--out",
                         str(out / "top-conv3")]
    runs["nf-conv3"] = ["nf", MODEL, "--layer", "conv3", "--images", IMAGES, "--top", "8", "--out",
                        str(out / "nf-conv3")]
    runs["fidelity-conv3"] = ["fidelity", MODEL, "--layer", "conv3", "--images", IMAGES, "--holdout",
                              "builtin:blobs:32", "--top", "8", "--neurons", "0-7", "--out",
                              str(out / "fidelity-conv3")]
    runs["zoo-modern"] = ["zoo", str(ROOT / "models" / "zoo-modern.toml"), "--json"]
    return runs


def digest_array(array: np.ndarray) -> str:
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


def stable(value):
    """``value`` without its volatile fields (``VOLATILE``), at any depth."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def digest_json(value) -> str:
    return hashlib.sha256(json.dumps(stable(value), sort_keys=True).encode()).hexdigest()[:16]


def digest_folder(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                found.update({f"{name}:{key}": digest_array(arrays[key]) for key in sorted(arrays.files)})
        elif path.suffix == ".json":
            found[name] = digest_json(json.loads(path.read_text(encoding="utf-8")))
    return found


def run_all() -> dict[str, dict[str, str]]:
    digests = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name, args in commands(out).items():
            done = subprocess.run([*FDSUB, *args], capture_output=True, text=True, cwd=ROOT)
            if done.returncode not in (0, 1):  # zoo/check exit 1 on a failing model: still an output
                raise SystemExit(f"{name}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            entry = digest_folder(out / name) if (out / name).is_dir() else {}
            if args[-1] == "--json":
                entry["stdout"] = digest_json(json.loads(done.stdout))
            entry["exit"] = str(done.returncode)
            digests[name] = entry
            print(f"{name}: {len(entry) - 1} outputs", flush=True)
    return digests


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["write", "compare"])
    parser.add_argument("path")
    args = parser.parse_args(argv)
    now = run_all()
    if args.step == "write":
        Path(args.path).write_text(json.dumps(now, indent=1, sort_keys=True))
        print(f"wrote {sum(len(v) for v in now.values())} digests to {args.path}")
        return 0
    before = json.loads(Path(args.path).read_text())
    differ = [f"{run}/{key}" for run in sorted(set(before) | set(now))
              for key in sorted(set(before.get(run, {})) | set(now.get(run, {})))
              if before.get(run, {}).get(key) != now.get(run, {}).get(key)]
    for line in differ:
        print(f"differs: {line}")
    print(f"{len(differ)} of {sum(len(v) for v in now.values())} outputs differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
