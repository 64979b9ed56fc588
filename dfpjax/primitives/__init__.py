"""DFP primitives: exact products of quantized operands, with batching, AD and lowerings."""

from dfpjax.primitives.conv_general_dilated import dfp_conv_general_dilated
from dfpjax.primitives.dot_general import dfp_dot_general, dfp_dot_general_p
from dfpjax.primitives.reference import reference_mode

__all__ = ["dfp_conv_general_dilated", "dfp_dot_general", "dfp_dot_general_p", "reference_mode"]
