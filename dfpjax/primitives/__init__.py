"""DFP primitives: exact products of quantized operands, with batching, AD and lowerings; and
``channel_sums``, the per-channel float sums around them (BatchNorm's statistics)."""

from dfpjax.primitives.channel_sums import channel_sums
from dfpjax.primitives.conv_general_dilated import dfp_conv_general_dilated
from dfpjax.primitives.dot_general import dfp_dot_general, dfp_dot_general_p
from dfpjax.primitives.reference import reference_mode

__all__ = ["channel_sums", "dfp_conv_general_dilated", "dfp_dot_general", "dfp_dot_general_p", "reference_mode"]
