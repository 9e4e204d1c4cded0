"""Model zoos: a TOML list of models to ``check``, and the onnx package's "light" models with random weights.

A zoo file (``models/zoo.toml``)::

    [defaults]                      # check options for every model; any entry may override them
    images = "builtin:blobs:8"
    neurons_per_layer = 2

    [[models]]
    name = "demo"                   # optional; default: the file name
    path = "demo.onnx"              # relative to the zoo file, or onnx-light:NAME
    input_shape = [1, 3, 64, 64]    # optional (needed for dynamic height/width)
    preset = "raw"                  # preprocessing of the probe images
    decodable = 7                   # optional: expected decodable layers, a count or a list of names
    baseline = "release-1.onnx"     # optional: compare with the last release (a model, or a fingerprint folder)
    max_drift = 0.05                # ... and its limits: max_drift, max_activation_drift, min_top_overlap,
                                    # require_all_matched; diff_neurons, diff_images (fdsub diff's --neurons, --images)

``onnx-light:NAME`` is ``onnx/backend/test/data/light/light_NAME.onnx`` inside the installed onnx
package. Those models ship without weights (every parameter is a ``ConstantOfShape`` filled with
0.02), so they are re-randomized (``randomized``) unless ``randomize = false``; ``seed`` picks the draw.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..data.images import open_images
from ..defaults import CHECK_IMAGES
from ..errors import FdsubError
from ..graph.model import Model, load_model
from ..graph.prepare import ShapeSetting
from ..graph.randomize import randomized
from ..modes.cost import PROCESS_BYTES, CostPlan, Stage
from ..runtime.cluster import map_tasks
from .check import CheckReport, check_model, estimate_check
from .drift import DiffReport, diff_models, estimate_diff

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT_PREFIX = "onnx-light:"
CHECK_KEYS = ("layers", "sample", "neurons_per_layer", "max_rf", "images", "min_coverage", "max_dead",
              "max_degenerate", "tolerance", "dtype", "identity_images")
PREPROCESSING_KEYS = ("preset", "mean", "std", "scale", "bgr")
#: a model's baseline (its last release: a model file, or a fingerprint folder) and the limits of ``diff_models``;
#: ``diff_neurons`` and ``diff_images`` are its ``neurons`` and ``images``
DIFF_KEYS = ("baseline", "max_drift", "max_activation_drift", "min_top_overlap", "require_all_matched", "diff_neurons",
             "diff_images")
MODEL_KEYS = ("name", "path", "input_shape", "decodable", "randomize", "seed", *PREPROCESSING_KEYS, *CHECK_KEYS,
              *DIFF_KEYS)
_NUMBER, _INT, _TEXT, _FLAG = "a number", "an integer", "a string", "true or false"
#: the type each key takes: a description, and a test of one value
KEY_TYPES = {
    **dict.fromkeys(("name", "path", "preset", "images", "dtype", "baseline", "diff_neurons", "diff_images"), _TEXT),
    **dict.fromkeys(("seed", "sample", "neurons_per_layer", "max_rf", "identity_images"), _INT),
    **dict.fromkeys(("scale", "min_coverage", "max_dead", "max_degenerate", "tolerance", "max_drift",
                     "max_activation_drift", "min_top_overlap"), _NUMBER),
    **dict.fromkeys(("randomize", "bgr", "require_all_matched"), _FLAG),
    **dict.fromkeys(("mean", "std"), "a number or a list of numbers"),
    "layers": "a list of layer names (or one string, comma separated)",
    "input_shape": "four positive integers [N, C, H, W]",
    "decodable": "a count or a list of layer names",
}



# ---- the onnx package's light models --------------------------------------------------------------
def light_paths() -> list[str]:
    """Paths of the light models shipped with the onnx package."""
    return sorted(glob.glob(os.path.join(LIGHT_DIR, "*.onnx")))


def light_name(path: str) -> str:
    """``light_resnet50.onnx`` -> ``resnet50``."""
    return os.path.basename(path)[: -len(".onnx")].removeprefix("light_")


def light_path(name: str) -> str:
    """The file of light model ``name`` (``resnet50``); a FdsubError naming the available ones otherwise."""
    path = os.path.join(LIGHT_DIR, f"light_{name.removeprefix('light_')}.onnx")
    if not os.path.isfile(path):
        names = ", ".join(light_name(p) for p in light_paths()) or f"none in {LIGHT_DIR}"
        raise FdsubError(f"{LIGHT_PREFIX}{name}: the onnx package has no such light model (available: {names})")
    return path




# ---- zoo files ----------------------------------------------------------------------------------------
@dataclass
class ZooModel:
    """One entry of a zoo file, resolved: ``path`` is the file to load, ``source`` what the zoo file says."""

    name: str
    source: str
    path: str
    input_shape: tuple[int, ...] | None = None
    randomize: bool = False
    seed: int = 0
    decodable: int | list[str] | None = None
    preprocessing: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # keyword arguments of check_model
    baseline: str | None = None  # the model (or fingerprint folder) it is compared with: its last release
    diff_options: dict = field(default_factory=dict)  # keyword arguments of diff_models


@dataclass
class ZooResult:
    """The outcome for one zoo model: its report, or the one-line ``error`` that stopped it."""

    model: ZooModel
    report: CheckReport | None
    error: str | None
    seconds: float
    diff: DiffReport | None = None  # against the entry's baseline, where it has one

    @property
    def status(self) -> str:
        if self.report is None:
            return "error"
        return "fail" if "fail" in (self.report.status, self.diff.status if self.diff else "pass") else "pass"

    def to_json(self) -> dict:
        out = {"name": self.model.name, "source": self.model.source, "status": self.status,
               "seconds": round(self.seconds, 3)}
        if self.report is None:
            out["error"] = self.error
        else:
            out["report"] = self.report.to_json()
        if self.diff is not None:
            out["diff"] = self.diff.to_json()
        return out


def read_zoo(path: str | os.PathLike) -> list[ZooModel]:
    """The models of zoo file ``path`` (module docstring), each with its check options; a FdsubError when malformed."""
    path = Path(path)
    if not path.is_file():
        raise FdsubError(f"zoo file not found: {path}" if not path.exists()
                         else f"{path} is a folder; give the zoo .toml file" if path.is_dir()
                         else f"{path} is not a regular file (a FIFO, socket or device); give the zoo .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FdsubError(f"{path} is not valid TOML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise FdsubError(f"{path} is nested too deeply to read; a zoo file holds flat [[models]] tables") from None
    except OSError as exc:
        raise FdsubError(f"cannot read zoo file {path}: {exc.strerror or exc}") from None
    unknown = set(data) - {"defaults", "models"}
    if unknown:
        raise FdsubError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; "
                         "a zoo file has [defaults] and [[models]]")
    defaults = data.get("defaults", {})
    entries = data.get("models")
    if not isinstance(defaults, dict) or not isinstance(entries, list) or not entries:
        raise FdsubError(f"{path}: list the models as [[models]] tables, each with a path")
    _known(defaults, (*PREPROCESSING_KEYS, *CHECK_KEYS, *DIFF_KEYS[1:], "seed", "randomize"), f"{path} [defaults]")
    models = [_entry(path, i, {**defaults, **entry} if isinstance(entry, dict) else entry)
              for i, entry in enumerate(entries)]
    names = [m.name for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FdsubError(f"{path}: model name(s) {', '.join(twice)} appear twice; give each a distinct name")
    return models


def _known(table: dict, keys, where: str) -> None:
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise FdsubError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(keys)}")


def _entry(zoo: Path, index: int, entry) -> ZooModel:
    where = f"{zoo} model {index + 1}"
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise FdsubError(f"{where}: each [[models]] table needs path = \"file.onnx\" (or \"{LIGHT_PREFIX}NAME\")")
    _known(entry, MODEL_KEYS, where)
    for key, value in entry.items():
        if not _fits(key, value):
            raise FdsubError(f"{where}: {key} = {_shown(value)} is not {KEY_TYPES[key]}")
    source = entry["path"]
    light = source.startswith(LIGHT_PREFIX)
    if light:
        name = source[len(LIGHT_PREFIX):]
        path = os.path.join(LIGHT_DIR, f"light_{name.removeprefix('light_')}.onnx")  # checked when it runs
    else:
        path = str((zoo.parent / source) if not os.path.isabs(source) else Path(source))
        name = Path(source).stem
    shape = entry.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 4
                              or not all(isinstance(v, int) and v > 0 for v in shape)):
        raise FdsubError(f"{where}: input_shape must be four positive integers [N, C, H, W], got {shape!r}")
    decodable = entry.get("decodable")
    count = isinstance(decodable, int) and not isinstance(decodable, bool)
    names = isinstance(decodable, list) and all(isinstance(v, str) for v in decodable)
    if decodable is not None and not (count or names):
        raise FdsubError(f"{where}: decodable is a count or a list of layer names, got {decodable!r}")
    options = {key: entry[key] for key in CHECK_KEYS if key in entry}
    if isinstance(options.get("layers"), str):
        options["layers"] = [v.strip() for v in options["layers"].split(",") if v.strip()]
    baseline = entry.get("baseline")
    if baseline is not None and not os.path.isabs(baseline):
        baseline = str(zoo.parent / baseline)
    diff_options = {key: entry[key] for key in DIFF_KEYS[1:] if key in entry}
    if diff_options and baseline is None:
        raise FdsubError(f"{where}: {', '.join(sorted(diff_options))} compare the model with its baseline; give "
                         "baseline = \"the last release's model or fingerprint folder\"")
    diff_options = {{"diff_neurons": "neurons", "diff_images": "images"}.get(k, k): v for k, v in diff_options.items()}
    return ZooModel(
        name=str(entry.get("name", name)), source=source, path=path,
        input_shape=tuple(shape) if shape is not None else None,
        randomize=bool(entry.get("randomize", light)), seed=int(entry.get("seed", 0)), decodable=decodable,
        preprocessing={key: entry[key] for key in PREPROCESSING_KEYS if key in entry}, options=options,
        baseline=baseline, diff_options=diff_options,
    )


def _fits(key: str, value) -> bool:
    """Whether ``value`` has the type ``KEY_TYPES[key]`` names (TOML's booleans are not numbers here)."""
    kind = KEY_TYPES[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == _TEXT:
        return isinstance(value, str)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUMBER:
        return number
    if kind == _FLAG:
        return isinstance(value, bool)
    if key in ("mean", "std"):
        return number or (isinstance(value, list) and bool(value) and all(_fits("scale", v) for v in value))
    if key in ("layers", "decodable"):
        names = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return names or (isinstance(value, str) if key == "layers" else _fits("seed", value))
    return True  # input_shape: checked with its own message


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_zoo_model(entry: ZooModel, progress: Callable[[str], None] | None = None) -> CheckReport:
    """Load (re-randomized when asked) and check one zoo model; a FdsubError when it cannot be checked."""
    note = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="fdsub-zoo-") as folder:
        model = _load_entry(entry, folder, note)
        report = check_model(
            model, expect_decodable=entry.decodable, preprocessing=entry.preprocessing, seed=entry.seed,
            progress=lambda message: note(f"{entry.name}: {message}"), **entry.options,
        )
    report.model = entry.source
    return report


def _load_entry(entry: ZooModel, folder: str, note: Callable[[str], None]) -> Model:
    """The entry's model, re-randomized into ``folder`` when asked."""
    if entry.source.startswith(LIGHT_PREFIX):
        light_path(entry.source[len(LIGHT_PREFIX):])
    path = entry.path
    if entry.randomize:
        if not os.path.isfile(path):
            raise FdsubError(f"model file not found: {path}; check the path")
        note(f"{entry.name}: randomizing the weights")
        path = os.path.join(folder, "model.onnx")
        onnx.save(randomized(entry.path, entry.seed), path)
    note(f"{entry.name}: loading")
    return load_model(path, entry.input_shape, ZOO_SHAPE)


#: a zoo file sets its models' input shape with its ``input_shape`` key, not the command line's option
ZOO_SHAPE = ShapeSetting("input_shape", "set input_shape = [1, C, H, W] (e.g. [1, 3, 224, 224]) in its zoo entry")


def estimate_zoo(models: list[ZooModel]) -> CostPlan:
    """The cost of ``run_zoo`` in one process: each model's check in turn, each peak with its own model loaded."""
    stages = []
    for entry in models:
        try:
            with tempfile.TemporaryDirectory(prefix="fdsub-zoo-") as folder:
                model = _load_entry(entry, folder, lambda message: None)
                options = {k: entry.options[k] for k in ("layers", "sample", "neurons_per_layer", "max_rf", "dtype")
                           if k in entry.options}
                probes = entry.options.get("images", CHECK_IMAGES)
                count = 0 if probes is None else len(open_images(probes, model.input_shape[1:], **entry.preprocessing))
                plan = estimate_check(model, images=count, **options)
                stages.append(Stage(f"check of {entry.name}", plan.peak_bytes - PROCESS_BYTES, plan.seconds))
                if entry.baseline is not None:  # its diff against its baseline (15.7 s of a 21 s run had been left out)
                    stages.append(_diff_stage(entry, model, folder))
        except FdsubError as exc:  # the run reports it for this model and goes on with the others
            stages.append(Stage(f"check of {entry.name}: cannot be checked ({' '.join(str(exc).splitlines())})",
                                0.0, 0.0))
    return CostPlan("zoo", stages, PROCESS_BYTES)


def _diff_stage(entry: ZooModel, model: Model, folder: str) -> Stage:
    """The entry's diff against its baseline, as ``diff_zoo_model`` runs it, as one stage."""
    baseline, options = _baseline(entry, model, folder, lambda message: None)
    images = options.get("images")
    plan = estimate_diff(baseline, model, neurons=options.get("neurons"), images=0 if images is None else len(images))
    return Stage(f"diff of {entry.name} against its baseline", plan.peak_bytes - PROCESS_BYTES, plan.seconds)


def _baseline(entry: ZooModel, model: Model, folder: str, note) -> tuple:
    """``(baseline, diff_models' options)`` of the entry: a baseline model file loaded as the entry is (re-randomized
    with its seed when the entry is) into ``folder``, a fingerprint folder as it is; the diff's images opened."""
    baseline = entry.baseline
    if not os.path.isdir(baseline):
        os.makedirs(os.path.join(folder, "baseline"), exist_ok=True)
        baseline = _load_entry(dataclasses.replace(entry, path=entry.baseline, source=entry.baseline),
                               os.path.join(folder, "baseline"), note)
    options = dict(entry.diff_options)
    if isinstance(options.get("images"), str):
        options["images"] = open_images(options["images"], model.input_shape[1:], **entry.preprocessing)
    return baseline, options


def run_zoo(models: list[ZooModel], progress: Callable[[str], None] | None = None, client=None) -> list[ZooResult]:
    """Check every model in turn; a model that cannot be checked gets its error instead of a report.

    With a Dask ``client`` each model is one task on the cluster (workers read the models at the same paths);
    ``progress`` then hears of each model as it finishes.
    """
    if client is None:
        return [check_zoo_entry(entry, progress) for entry in models]
    note = progress or (lambda message: None)
    return map_tasks(client, check_zoo_entry, [(entry,) for entry in models],
                     done=lambda i, result: note(f"{result.model.name}: {result.status}"))


def check_zoo_entry(entry: ZooModel, progress: Callable[[str], None] | None = None) -> ZooResult:
    """One model's result: its report (and its diff against its baseline), or the error that stopped it, and how
    long it took."""
    start = time.perf_counter()
    diff = None
    try:
        report, error = check_zoo_model(entry, progress), None
        if entry.baseline is not None:
            try:
                diff = diff_zoo_model(entry, progress)
            except FdsubError as exc:  # said as the baseline's, not as the model's
                raise FdsubError(f"its baseline {entry.baseline}: {exc}") from None
    except FdsubError as exc:
        report, error = None, " ".join(str(exc).splitlines())
    return ZooResult(entry, report, error, time.perf_counter() - start, diff)


def diff_zoo_model(entry: ZooModel, progress: Callable[[str], None] | None = None) -> DiffReport:
    """The entry's model against its baseline (``diff_models``): a baseline model file is loaded as the entry is
    (re-randomized with its seed when the entry is), a fingerprint folder read as it is."""
    note = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="fdsub-zoo-") as folder:
        model = _load_entry(entry, folder, note)
        baseline, options = _baseline(entry, model, folder, note)
        note(f"{entry.name}: comparing with {entry.baseline}")
        report = diff_models(baseline, model, **options)
    report.model_a, report.model_b = entry.baseline, entry.source
    return report
