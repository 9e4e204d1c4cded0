"""fdsub-onnx: Filter Decoding with Substitution for any CNN exported to ONNX.

>>> import fdsub_onnx as fd
>>> model = fd.load_model("model.onnx")
>>> [l.name for l in fd.inspect_model(model).layers if l.decodable]      # doctest: +SKIP
>>> result = fd.decode(model, "conv2", neurons="0-7")                    # doctest: +SKIP
>>> result.filters.shape   # [8, 3, R_y, R_x]                             # doctest: +SKIP

The package's parts, imported in one direction only (docs/architecture.md):
``data`` and ``graph`` -> ``compose`` -> ``runtime`` -> ``modes`` -> ``evaluate`` -> ``present`` -> ``cli``.
Everything the command line uses is exported here.

Each name is imported from its module on first use (PEP 562): ``import fdsub_onnx`` and the defaults cost
nothing, so `fdsub --help` answers without loading onnx and onnxruntime (seconds).
"""

from __future__ import annotations

import importlib

from .defaults import (
    CHECK_IMAGES,
    DEFAULT_BATCH,
    DEFAULT_DIFF_TOP,
    DEFAULT_GRID,
    DEFAULT_SELECT,
    DEFAULT_TOP,
    DEFAULT_WEIGHTING,
    FIDELITY_MODES,
    REPORT_FIDELITY_IMAGES,
    REPORT_LAYERS,
    REPORT_NEURONS,
    REPORT_TOP,
    SELECTS,
    WEIGHTINGS,
    budget,
    memory_budget,
    parse_bytes,
)
from .errors import FdsubError

#: public name -> (module, name there)
_EXPORTS = {
    "diff": (".evaluate.drift", "diff_models"), "DiffReport": (".evaluate.drift", "DiffReport"),
    "LayerDrift": (".evaluate.drift", "LayerDrift"), "match_layers": (".evaluate.drift", "match_layers"),
    "checkpoint_progress": (".data.topn", "checkpoint_progress"),
    "diff_suite": (".present.junit", "diff_suite"), "save_diff": (".present.save", "save_diff"),
    "patch_grid": (".present.render", "patch_grid"), "neuron_card": (".present.render", "neuron_card"),
    "estimate_diff": (".evaluate.drift", "estimate_diff"),
    "estimate_fingerprint": (".evaluate.drift", "estimate_fingerprint"),
    "save_fingerprint": (".evaluate.drift", "save_fingerprint"),
    "load_fingerprint": (".evaluate.drift", "load_fingerprint"),
    "Device": (".compose.backend", "Device"), "resolve_device": (".compose.backend", "resolve_device"),
    "Layer": (".compose.inspect", "Layer"), "Summary": (".compose.inspect", "Summary"),
    "inspect_model": (".compose.inspect", "inspect_model"), "layer_geometry": (".compose.inspect", "layer_geometry"),
    "ArrayImages": (".data.images", "ArrayImages"), "open_images": (".data.images", "open_images"),
    "check_result_folder": (".data.files", "check_result_folder"),
    "TopN": (".data.topn", "TopN"), "load_top": (".data.topn", "load_top"), "save_top": (".data.topn", "save_top"),
    "check_top_fits": (".data.topn", "check_top_fits"),
    "Check": (".evaluate.check", "Check"), "CheckReport": (".evaluate.check", "CheckReport"),
    "check_model": (".evaluate.check", "check_model"), "estimate_check": (".evaluate.check", "estimate_check"),
    "LayerComparison": (".evaluate.compare", "LayerComparison"),
    "ReportChoice": (".evaluate.compare", "ReportChoice"), "choose_report": (".evaluate.compare", "choose_report"),
    "compare_layers": (".evaluate.compare", "compare_layers"),
    "compare_modes": (".evaluate.compare", "compare_modes"),
    "estimate_compare": (".evaluate.compare", "estimate_compare"), "fidelity": (".evaluate.fidelity", "fidelity"),
    "fidelity_of_layers": (".evaluate.fidelity", "fidelity_of_layers"),
    "read_zoo": (".evaluate.zoo", "read_zoo"), "run_zoo": (".evaluate.zoo", "run_zoo"),
    "estimate_zoo": (".evaluate.zoo", "estimate_zoo"),
    "dequantized_note": (".graph.dequantize", "dequantized_note"), "Geometry": (".graph.geometry", "Geometry"),
    "Model": (".graph.model", "Model"), "find_layer": (".graph.model", "find_layer"),
    "load_model": (".graph.model", "load_model"),
    "describe_position": (".graph.model", "describe_position"),
    "nonfinite_weights": (".graph.validate", "nonfinite_weights"),
    "MODES": (".modes.decode", "MODES"), "decode": (".modes.decode", "decode"),
    "iter_decode": (".modes.decode", "iter_decode"), "plan_decode": (".modes.decode", "plan_decode"),
    "CostPlan": (".modes.cost", "CostPlan"), "Stage": (".modes.cost", "Stage"),
    "estimate_decode": (".modes.cost", "estimate_decode"), "estimate_top": (".modes.cost", "estimate_top"),
    "estimate_nf": (".modes.cost", "estimate_nf"),
    "ROUTES": (".modes.plan", "ROUTES"), "Plan": (".modes.plan", "Plan"),
    "Substitution": (".modes.fds", "Substitution"),
    "gather_statistics": (".modes.fds", "gather_statistics"), "decode_instances": (".modes.local", "decode_instances"),
    "neuron_feature": (".modes.nf", "neuron_feature"), "Decoded": (".modes.result", "Decoded"),
    "parse_neurons": (".neurons", "parse_neurons"),
    "check_junit_path": (".present.junit", "check_junit_path"), "junit_document": (".present.junit", "junit_document"),
    "junit_suite": (".present.junit", "junit_suite"), "write_junit": (".present.junit", "write_junit"),
    "filter_grid": (".present.render", "filter_grid"), "grid_cells": (".present.render", "grid_cells"),
    "report": (".present.report", "report"), "fidelity_sample": (".present.report", "fidelity_sample"),
    "result_kind": (".present.save", "result_kind"), "save_decoded": (".present.save", "save_decoded"),
    "save_fidelity": (".present.save", "save_fidelity"), "save_with_top": (".present.save", "save_with_top"),
    "capture_top": (".runtime.capture", "capture_top"), "merge_top": (".runtime.capture", "merge_top"),
    "connect": (".runtime.cluster", "connect"),
}

__all__ = ["CHECK_IMAGES", "DEFAULT_BATCH", "DEFAULT_DIFF_TOP", "DEFAULT_GRID", "DEFAULT_SELECT", "DEFAULT_TOP",
           "DEFAULT_WEIGHTING", "FIDELITY_MODES", "REPORT_FIDELITY_IMAGES", "REPORT_LAYERS", "REPORT_NEURONS",
           "REPORT_TOP", "SELECTS", "WEIGHTINGS", "FdsubError", "budget", "memory_budget", "parse_bytes"]
__all__ += sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import a public name's module the first time the name is used."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
