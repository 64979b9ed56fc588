"""The DFP numerics contract (spec sections 1, 2 and 5): configuration and quantization; and
reproducible float sums (``summation``), float numerics the DFP contract does not cover; and
``after``, a value tied to another so that XLA cannot compute it earlier, and ``materialized``, a
value XLA:CPU computes once instead of in each consumer (``floatbits``)."""

from dfpjax.numerics.config import DFPConfig, QuantConfig
from dfpjax.numerics.floatbits import after, materialized
from dfpjax.numerics.quantization import NONFINITE_EXPONENT, DFPTensor, dequantize, quantize, quantize_with
from dfpjax.numerics.summation import reproducible_sum

__all__ = ["DFPConfig", "QuantConfig", "DFPTensor", "NONFINITE_EXPONENT", "quantize", "quantize_with",
           "dequantize", "reproducible_sum", "after", "materialized"]
