"""Arguments the DFP ops refuse, each with an error that names the argument and the problem,
and a convolution the kernel cannot run, which dfp_transform keeps in float."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import dfpjax
from dfpjax.transform import dfp_transform, report

DOT = (((1,), (0,)), ((), ()))


def _conv(lhs_shape, rhs_shape, strides, **kwargs):
  lhs = jnp.ones(lhs_shape, jnp.float32)
  rhs = jnp.ones(rhs_shape, jnp.float32)
  return dfpjax.dfp_conv_general_dilated(lhs, rhs, strides, "VALID", **kwargs)


def test_convolution_with_four_spatial_dimensions_is_refused():
  with pytest.raises(ValueError, match=r"lhs has shape \(1, 1, 3, 3, 3, 3\): the DFP kernel "
                                       r"convolves 1 to 3 spatial dimensions"):
    _conv((1, 1, 3, 3, 3, 3), (1, 1, 2, 2, 2, 2), (1, 1, 1, 1))


@pytest.mark.parametrize("strides", [(0, 1), (-1, 1), (1,), (1.5, 1)])
def test_strides_must_be_one_positive_integer_per_spatial_dimension(strides):
  with pytest.raises(ValueError, match=r"window_strides must be 2 positive integers, one per "
                                       r"spatial dimension"):
    _conv((1, 1, 5, 5), (1, 1, 2, 2), strides)


@pytest.mark.parametrize("padding", [((0.9, 0.9), (1, 1)), ((1, 1), (1.5, 0)), "FULL"])
def test_padding_must_be_integer_pairs_or_a_name(padding):
  with pytest.raises(ValueError, match="padding must be 'SAME', 'SAME_LOWER', 'VALID' or one "
                                       r"\(low, high\) pair of integers per spatial dimension"):
    dfpjax.dfp_conv_general_dilated(jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4)), (1, 1),
                                    padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("name", ["lhs_dilation", "rhs_dilation"])
def test_dilations_must_be_positive(name):
  with pytest.raises(ValueError, match=f"{name} must be 2 positive integers"):
    _conv((1, 1, 5, 5), (1, 1, 2, 2), (1, 1), **{name: (1, 0)})


def test_window_must_not_be_empty():
  """lax.conv_general_dilated cannot lower a window with a zero dimension; neither is it summed
  to zeros here."""
  with pytest.raises(ValueError, match=r"rhs has shape \(0, 3, 3, 4\), a window of \(0, 3\): "
                                       "every spatial dimension of the window must be at least 1"):
    dfpjax.dfp_conv_general_dilated(jnp.ones((1, 5, 5, 3)), jnp.ones((0, 3, 3, 4)), (1, 1),
                                    "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_group_counts_must_be_positive():
  with pytest.raises(ValueError, match="feature_group_count must be a positive integer, got 0"):
    _conv((1, 1, 5, 5), (1, 1, 2, 2), (1, 1), feature_group_count=0)


def test_convolution_of_dfp_tensors_is_refused_without_printing_them():
  t = dfpjax.quantize(jnp.ones((1, 1, 4, 4)))
  w = jnp.ones((1, 1, 2, 2))
  with pytest.raises(TypeError) as err:
    dfpjax.dfp_conv_general_dilated(t, w, (1, 1), "VALID")
  message = str(err.value)
  assert message.startswith("dfp_conv_general_dilated: lhs is a DFPTensor; "
                            "dfp_conv_general_dilated takes float arrays")
  assert "mantissa=" not in message and len(message) < 200


def _dfp(x, **kwargs):
  kwargs.setdefault("exponent", jnp.zeros((), jnp.int32))
  return dfpjax.DFPTensor(x, **kwargs)


def test_per_channel_exponent_needs_a_channel_axis():
  a = _dfp(jnp.ones((2, 3), jnp.int16), exponent=jnp.zeros((2,), jnp.int32))
  b = _dfp(jnp.ones((3, 4), jnp.int16))
  with pytest.raises(ValueError, match=r"lhs is a DFPTensor with an exponent of shape \(2,\) and "
                                       r"no channel_axis"):
    dfpjax.dfp_dot_general(a, b, DOT)


def test_per_channel_exponent_needs_one_entry_per_channel():
  a = _dfp(jnp.ones((2, 3), jnp.int16))
  b = _dfp(jnp.ones((3, 4), jnp.int16), exponent=jnp.zeros((3,), jnp.int32), channel_axis=1)
  with pytest.raises(ValueError, match=r"rhs is a DFPTensor with an exponent of shape \(3,\); "
                                       r"along its channel_axis 1 .* shape \(4,\)"):
    dfpjax.dfp_dot_general(a, b, DOT)


def test_mantissas_must_be_int16():
  a = _dfp(jnp.ones((2, 3), jnp.int32))
  b = _dfp(jnp.ones((3, 4), jnp.int16))
  with pytest.raises(TypeError, match="dfp_dot_general: lhs is a DFPTensor with int32 mantissas; "
                                      "DFP mantissas are int16"):
    dfpjax.dfp_dot_general(a, b, DOT)


def test_mantissas_must_be_arrays():
  a = _dfp([[1, 2, 3], [4, 5, 6]])
  b = _dfp(jnp.ones((3, 4), jnp.int16))
  with pytest.raises(TypeError, match="dfp_dot_general: lhs is a DFPTensor whose mantissa is a list, "
                                      "not an array; DFP mantissas are int16 arrays"):
    dfpjax.dfp_dot_general(a, b, DOT)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int16, jnp.uint8, jnp.uint32])
def test_exponents_must_be_int32(dtype):
  a = _dfp(jnp.ones((2, 3), jnp.int16))
  b = _dfp(jnp.ones((3, 4), jnp.int16), exponent=jnp.zeros((), dtype))
  with pytest.raises(TypeError, match=f"rhs is a DFPTensor with a {np.dtype(dtype)} exponent; "
                                      "DFP exponents are int32"):
    dfpjax.dfp_dot_general(a, b, DOT)
  # A Python int is taken as an int32.
  assert dfpjax.dfp_dot_general(a, _dfp(jnp.ones((3, 4), jnp.int16), exponent=-2), DOT).shape == (2, 4)


def test_valid_per_channel_dfp_tensors_still_multiply():
  rng = np.random.default_rng(0)
  a = _dfp(jnp.asarray(rng.integers(-9, 9, (2, 3)), jnp.int16))
  b = _dfp(jnp.asarray(rng.integers(-9, 9, (3, 4)), jnp.int16),
           exponent=jnp.asarray([0, 1, 2, -1], jnp.int32), channel_axis=1)
  got = dfpjax.dfp_dot_general(a, b, DOT)
  want = (np.asarray(a.mantissa, np.float64) @ np.asarray(b.mantissa, np.float64)
          * 2.0 ** np.asarray([0, 1, 2, -1]))
  np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))


def _conv4d(x, w):
  return lax.conv_general_dilated(x, w, (1, 1, 1, 1), "VALID")


def test_transform_keeps_a_four_dimensional_convolution_in_float():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 2, 3, 3, 3, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, 2, 2, 2, 2, 2)), jnp.float32)
  (site,) = report(_conv4d, x, w)
  assert (site.mode, site.primitive) == ("float", "conv_general_dilated")
  assert "1 to 3 spatial dimensions" in site.reason and "rank-6" in site.reason
  np.testing.assert_array_equal(np.asarray(dfp_transform(_conv4d)(x, w)),
                                np.asarray(_conv4d(x, w)))
