"""dfpjax: train JAX models in INT16 dynamic fixed point (DFP).

Layers (each imports only the ones above it; JAX's internals only through _jax_compat):
  numerics    the DFP contract: DFPConfig, quantize/dequantize (docs/numerics.md); and
              reproducible_sum, a float sum with the same bits on any device count; after and
              materialized, XLA:CPU's schedule and fusion steered without changing a bit
  primitives  exact DFP dot_general and conv_general_dilated; cpu_ffi is their C kernel;
              channel_sums, per-channel float sums in one read (BatchNorm's statistics)
  transform   dfp_transform: run any JAX/Flax function's products in DFP; report, diagnose;
              recompute: a region whose products' outputs the backward pass recomputes
kernel_info() says which kernel path (ISA) the C kernel runs on this CPU.
"""

from dfpjax import _jax_compat  # noqa: F401  (first: checks that JAX is a supported version)
from dfpjax.cpu_ffi import kernel_info
from dfpjax.numerics import (DFPConfig, DFPTensor, QuantConfig, after, dequantize, materialized,
                             quantize, reproducible_sum)
from dfpjax.primitives import channel_sums, dfp_conv_general_dilated, dfp_dot_general
from dfpjax.transform import RecomputePolicy, diagnose, dfp_transform, recompute, report

__all__ = ["DFPConfig", "QuantConfig", "DFPTensor", "quantize", "dequantize", "dfp_dot_general",
           "dfp_conv_general_dilated", "dfp_transform", "recompute", "RecomputePolicy", "report",
           "diagnose", "kernel_info", "reproducible_sum", "after", "materialized", "channel_sums"]
__version__ = "0.1.0"
