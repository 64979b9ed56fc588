"""The DFP numerics contract (spec sections 1, 2 and 5): configuration and quantization."""

from dfpjax.numerics.config import DFPConfig, QuantConfig
from dfpjax.numerics.quantization import NONFINITE_EXPONENT, DFPTensor, dequantize, quantize, quantize_with

__all__ = ["DFPConfig", "QuantConfig", "DFPTensor", "NONFINITE_EXPONENT", "quantize", "quantize_with",
           "dequantize"]
