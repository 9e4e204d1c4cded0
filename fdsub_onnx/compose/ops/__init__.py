"""The op rules, one per ONNX op type, and their registry (``RULES``: op type -> rule)."""

from .op_arithmetic import Add, Div, Mul, Sub, Sum
from .op_batchnorm import BatchNormalization
from .op_concat import Concat
from .op_conv import Conv
from .op_elementwise import (
    LRN,
    Celu,
    Clip,
    Dropout,
    Elu,
    Gelu,
    HardSigmoid,
    HardSwish,
    Identity,
    LeakyRelu,
    Mish,
    PRelu,
    Relu,
    Selu,
    Sigmoid,
    Softplus,
    Tanh,
)
from .op_gather import Gather
from .op_gemm import Gemm, MatMul
from .op_layout import Flatten, Reshape, Squeeze, Transpose, Unsqueeze
from .op_norm import LayerNormalization
from .op_pad import Pad
from .op_pool import AveragePool, GlobalAveragePool, GlobalMaxPool, MaxPool
from .op_quantize import ConvInteger, DequantizeLinear, DynamicQuantizeLinear, QLinearConv, QuantizeLinear
from .op_reduce import ReduceMax, ReduceMean, ReduceSum
from .op_slice import Slice, Split
from .op_upsample import ConvTranspose, Resize, Upsample

#: ops whose rule only explains why they are not decodable
REFUSED = ("Resize", "Upsample", "ConvTranspose", "DynamicQuantizeLinear", "ConvInteger")

RULES = {
    cls.__name__: cls()
    for cls in (
        Add, Sub, Mul, Div, Sum, BatchNormalization, Concat, Conv, Identity, Relu, LeakyRelu, PRelu, Clip,
        Sigmoid, HardSigmoid, HardSwish, Tanh, Elu, Selu, Celu, Softplus, Gelu, Mish, LRN, Dropout, Gemm, MatMul,
        Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Pad, AveragePool, MaxPool, GlobalAveragePool,
        GlobalMaxPool, Slice, Split, ReduceMean, ReduceMax, ReduceSum, QuantizeLinear, DequantizeLinear,
        QLinearConv, DynamicQuantizeLinear, ConvInteger, Resize, Upsample, ConvTranspose, LayerNormalization,
        Gather,
    )
}
