"""fdsub-onnx: Filter Decoding with Substitution for any CNN exported to ONNX.

>>> import fdsub_onnx as fd
>>> model = fd.load_model("model.onnx")
>>> [l.name for l in fd.inspect_model(model).layers if l.decodable]      # doctest: +SKIP
>>> result = fd.decode(model, "conv2", neurons="0-7")                    # doctest: +SKIP
>>> result.filters.shape   # [8, 3, R_y, R_x]                             # doctest: +SKIP

The package's parts, imported in one direction only (docs/architecture.md):
``data`` and ``graph`` -> ``compose`` -> ``runtime`` -> ``modes`` -> ``evaluate`` -> ``present`` -> ``cli``.
Everything the command line uses is exported here.
"""

from .compose.backend import Device, resolve_device
from .compose.inspect import Layer, Summary, inspect_model, layer_geometry
from .data.images import ArrayImages, open_images
from .data.topn import TopN, load_top, save_top
from .errors import FdsubError
from .evaluate.check import DEFAULT_IMAGES as CHECK_IMAGES
from .evaluate.check import Check, CheckReport, check_model
from .evaluate.compare import LayerComparison, compare_layers, compare_modes
from .evaluate.fidelity import FIDELITY_MODES, fidelity
from .evaluate.zoo import read_zoo, run_zoo
from .graph.geometry import Geometry
from .graph.model import Model, find_layer, load_model
from .modes.decode import MODES, decode, iter_decode, plan_decode
from .modes.fds import SELECTS, Substitution, gather_statistics
from .modes.local import decode_instances
from .modes.nf import neuron_feature
from .modes.plan import ROUTES, Plan
from .modes.result import Decoded
from .neurons import parse_neurons
from .present.junit import check_junit_path, junit_document, junit_suite, write_junit
from .present.render import filter_grid
from .present.report import DEFAULT_TOP as REPORT_TOP
from .present.report import report
from .present.save import save_decoded, save_fidelity, save_with_top
from .runtime.capture import capture_top, merge_top

__all__ = [
    "CHECK_IMAGES", "FIDELITY_MODES", "MODES", "REPORT_TOP", "ROUTES", "SELECTS",
    "ArrayImages", "Check", "CheckReport", "Decoded", "Device", "FdsubError", "Geometry", "Layer", "LayerComparison",
    "Model", "Plan", "Substitution", "Summary", "TopN",
    "capture_top", "check_junit_path", "check_model", "compare_layers", "compare_modes", "decode", "decode_instances",
    "fidelity", "filter_grid", "find_layer", "gather_statistics", "inspect_model", "iter_decode", "junit_document",
    "junit_suite", "layer_geometry", "load_model", "load_top", "merge_top", "neuron_feature", "open_images",
    "parse_neurons", "plan_decode", "read_zoo", "report", "resolve_device", "run_zoo", "save_decoded",
    "save_fidelity", "save_top", "save_with_top", "write_junit",
]
__version__ = "0.1.0"
