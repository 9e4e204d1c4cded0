"""fdsub-onnx: Filter Decoding with Substitution for any CNN exported to ONNX.

>>> import fdsub_onnx as fd
>>> model = fd.load_model("model.onnx")
>>> [l.name for l in fd.inspect_model(model).layers if l.decodable]      # doctest: +SKIP
>>> result = fd.decode(model, "conv2", neurons="0-7")                    # doctest: +SKIP
>>> result.filters.shape   # [8, 3, R_y, R_x]                             # doctest: +SKIP
"""

from ._capture import TopN, capture_top, load_top, merge_top, save_top
from ._check import Check, CheckReport, check_model
from ._decode import Decoded, Layer, Summary, decode, find_layer, inspect_model, iter_decode
from ._errors import FdsubError
from ._geometry import Geometry
from ._images import ArrayImages, open_images
from ._io import save_decoded
from ._model import Model, load_model
from ._neurons import parse_neurons
from ._nf import neuron_feature
from ._render import filter_grid
from ._report import report
from ._substitution import Substitution, gather_statistics

__all__ = [
    "ArrayImages", "Check", "CheckReport", "Decoded", "FdsubError", "Geometry", "Layer", "Model", "Substitution", "Summary", "TopN", "capture_top", "check_model", "decode",
    "filter_grid", "find_layer", "gather_statistics", "inspect_model", "iter_decode", "load_model", "load_top", "merge_top",
    "neuron_feature", "open_images", "parse_neurons", "report", "save_decoded", "save_top",
]
__version__ = "0.1.0"
