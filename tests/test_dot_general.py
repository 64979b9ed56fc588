"""dfp_dot_general: spec section 3 forward and section 4 gradients, under jit, grad and vmap.

Expected values come from an independent route: the quantized operands dequantized into
float64 (exact), multiplied with XLA's own float64 dot_general (exact at these sizes) and
rounded once to float32. Gradients use JAX's own transpose rules on those float64 values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import dfpjax
from dfpjax.primitives import reference_mode

DENSE = (((1,), (0,)), ((), ()))


def _f64(t):
  e = np.asarray(t.broadcast_exponent()).astype(np.int64)
  return np.asarray(t.mantissa, np.float64) * np.ldexp(1.0, e)  # exact


def _exact(fn, *quantized):
  """fn evaluated exactly in float64 on dequantized DFP tensors, rounded once to float32."""
  with jax.enable_x64(True):
    return np.asarray(fn(*[jnp.asarray(_f64(t)) for t in quantized])).astype(np.float32)


def _random_problem(rng):
  """Random shapes and dimension numbers: batch, contracting and free axes in any order."""
  nb, nc, nlf, nrf = rng.integers(0, 3), rng.integers(1, 3), rng.integers(0, 3), rng.integers(0, 3)
  sizes = rng.integers(1, 6, nb + nc + nlf + nrf)
  batch, contract = list(range(nb)), list(range(nb, nb + nc))
  lfree, rfree = list(range(nb + nc, nb + nc + nlf)), list(range(nb + nc + nlf, len(sizes)))
  lhs_axes = list(rng.permutation(batch + contract + lfree))
  rhs_axes = list(rng.permutation(batch + contract + rfree))
  order = rng.permutation(nc)
  dims = ((tuple(lhs_axes.index(contract[i]) for i in order), tuple(rhs_axes.index(contract[i]) for i in order)),
          (tuple(lhs_axes.index(b) for b in batch), tuple(rhs_axes.index(b) for b in batch)))
  lhs = rng.standard_normal([sizes[a] for a in lhs_axes]).astype(np.float32)
  rhs = rng.standard_normal([sizes[a] for a in rhs_axes]).astype(np.float32)
  return lhs, rhs, dims


@pytest.mark.parametrize("seed", range(8))
def test_random_dimension_numbers_forward(isa, seed):
  lhs, rhs, dims = _random_problem(np.random.default_rng(seed))
  got = jax.jit(lambda a, b: dfpjax.dfp_dot_general(a, b, dims))(lhs, rhs)
  want = _exact(lambda a, b: lax.dot_general(a, b, dims), dfpjax.quantize(lhs), dfpjax.quantize(rhs))
  np.testing.assert_array_equal(np.asarray(got), want)
  assert got.shape == lax.dot_general(lhs, rhs, dims).shape


@pytest.mark.parametrize("seed", range(4))
def test_random_dimension_numbers_gradients(isa, seed):
  """Spec section 4: d lhs, d rhs are DFP products of the quantized cotangent and the forward's
  quantized operands, with the dimension numbers of JAX's own transpose rules."""
  rng = np.random.default_rng(100 + seed)
  lhs, rhs, dims = _random_problem(rng)
  out_shape = lax.dot_general(lhs, rhs, dims).shape
  g = rng.standard_normal(out_shape).astype(np.float32)
  _, vjp = jax.vjp(lambda a, b: dfpjax.dfp_dot_general(a, b, dims), lhs, rhs)
  da, db = vjp(g)
  qa, qb, qg = dfpjax.quantize(lhs), dfpjax.quantize(rhs), dfpjax.quantize(g)
  want_da = _exact(lambda g, b: jax.vjp(lambda a: lax.dot_general(a, b, dims), jnp.zeros(lhs.shape, g.dtype))[1](g)[0], qg, qb)
  want_db = _exact(lambda g, a: jax.vjp(lambda b: lax.dot_general(a, b, dims), jnp.zeros(rhs.shape, g.dtype))[1](g)[0], qg, qa)
  np.testing.assert_array_equal(np.asarray(da), want_da)
  np.testing.assert_array_equal(np.asarray(db), want_db)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("out", [None, jnp.float32, jnp.bfloat16, jnp.float16])
def test_kernel_equals_reference_end_to_end(isa, dtype, out):
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.standard_normal((3, 19, 40)), dtype)
  b = jnp.asarray(rng.standard_normal((3, 40, 23)), dtype)
  dims = (((2,), (1,)), ((0,), (0,)))

  def loss_and_grads(a, b):
    y, vjp = jax.vjp(lambda a, b: dfpjax.dfp_dot_general(a, b, dims, preferred_element_type=out), a, b)
    return (y,) + vjp(jnp.cos(y.astype(jnp.float32)).astype(y.dtype))

  got = jax.jit(loss_and_grads)(a, b)
  with reference_mode():
    want = jax.jit(lambda a, b: loss_and_grads(a, b))(a, b)
  assert got[0].dtype == (jnp.float32 if out is None else out)
  assert got[1].dtype == dtype and got[2].dtype == dtype
  for x, y in zip(got, want):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def test_close_to_float_and_paper_bits():
  rng = np.random.default_rng(2)
  a, b = rng.standard_normal((64, 256)).astype(np.float32), rng.standard_normal((256, 32)).astype(np.float32)
  exact = a.astype(np.float64) @ b.astype(np.float64)
  error16 = np.abs(np.asarray(dfpjax.dfp_dot_general(a, b, DENSE)) - exact).max()
  cfg8 = dfpjax.DFPConfig(forward=dfpjax.QuantConfig(bits=8))
  error8 = np.abs(np.asarray(dfpjax.dfp_dot_general(a, b, DENSE, config=cfg8)) - exact).max()
  assert error16 < 1e-2 and error8 > 50 * error16


def test_channel_granularity_forward_and_gradients():
  """Per-channel exponents on each operand's last free axis; the backward folds the partner's
  per-channel exponent into the cotangent before quantizing it (docs/numerics.md)."""
  rng = np.random.default_rng(3)
  a = (rng.standard_normal((6, 20)) * np.logspace(-3, 3, 6)[:, None]).astype(np.float32)
  b = (rng.standard_normal((20, 5)) * np.logspace(2, -2, 5)[None, :]).astype(np.float32)
  g = rng.standard_normal((6, 5)).astype(np.float32)
  cfg = dfpjax.DFPConfig(forward=dfpjax.QuantConfig(granularity="channel"))
  y, vjp = jax.vjp(lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE, config=cfg), a, b)
  da, db = vjp(g)
  qa = dfpjax.quantize(a, granularity="channel", axis=0)
  qb = dfpjax.quantize(b, granularity="channel", axis=1)
  assert qa.exponent.shape == (6,) and len(set(np.asarray(qa.exponent))) > 1
  np.testing.assert_array_equal(np.asarray(y), _exact(lambda a, b: a @ b, qa, qb))
  # d a = g @ b.T: b's channel axis is contracted; g * 2**eb (exact in float32 here) is quantized.
  qg_b = dfpjax.quantize(g * np.ldexp(np.float32(1), np.asarray(qb.exponent))[None, :])
  mb = dfpjax.DFPTensor(qb.mantissa, jnp.zeros((), jnp.int32))
  np.testing.assert_array_equal(np.asarray(da), _exact(lambda g, b: g @ b.T, qg_b, mb))
  qg_a = dfpjax.quantize(g * np.ldexp(np.float32(1), np.asarray(qa.exponent))[:, None])
  ma = dfpjax.DFPTensor(qa.mantissa, jnp.zeros((), jnp.int32))
  np.testing.assert_array_equal(np.asarray(db), _exact(lambda g, a: a.T @ g, qg_a, ma))


@pytest.mark.parametrize("seed", range(4))
def test_quantized_operands_are_multiplied_as_they_are(isa, seed):
  lhs, rhs, dims = _random_problem(np.random.default_rng(100 + seed))
  qa, qb = dfpjax.quantize(lhs, bits=7), dfpjax.quantize(rhs, bits=7)
  got = jax.jit(lambda qa, qb: dfpjax.dfp_dot_general(qa, qb, dims))(qa, qb)
  np.testing.assert_array_equal(np.asarray(got), _exact(lambda a, b: lax.dot_general(a, b, dims), qa, qb))
  # The same bits as quantizing inside the op with the same settings.
  cfg = dfpjax.DFPConfig(forward=dfpjax.QuantConfig(bits=7))
  np.testing.assert_array_equal(np.asarray(dfpjax.dfp_dot_general(lhs, rhs, dims, config=cfg)),
                                np.asarray(got))


def test_quantized_operands_per_channel_and_errors():
  rng = np.random.default_rng(4)
  a = (rng.standard_normal((6, 20)) * np.logspace(-3, 3, 6)[:, None]).astype(np.float32)
  b = rng.standard_normal((20, 5)).astype(np.float32)
  qa, qb = dfpjax.quantize(a, granularity="channel", axis=0), dfpjax.quantize(b)
  np.testing.assert_array_equal(np.asarray(dfpjax.dfp_dot_general(qa, qb, DENSE)),
                                _exact(lambda a, b: a @ b, qa, qb))
  along_k = dfpjax.quantize(a, granularity="channel", axis=1)
  with pytest.raises(ValueError, match="channel axis to be its last free axis"):
    dfpjax.dfp_dot_general(along_k, qb, DENSE)
  with pytest.raises(TypeError, match="both as DFPTensors"):
    dfpjax.dfp_dot_general(qa, b, DENSE)
  with pytest.raises(ValueError, match="used as they are"):
    dfpjax.dfp_dot_general(qa, qb, DENSE, config=dfpjax.DFPConfig())


def test_gradient_settings_apply_to_the_cotangent():
  rng = np.random.default_rng(4)
  a, b = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
  g = rng.standard_normal((8, 4)).astype(np.float32)
  cfg = dfpjax.DFPConfig(gradient=dfpjax.QuantConfig(bits=5, headroom=1))
  _, vjp = jax.vjp(lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE, config=cfg), a, b)
  da, _ = vjp(g)
  qg = dfpjax.quantize(g, bits=5, headroom=1)
  np.testing.assert_array_equal(np.asarray(da), _exact(lambda g, b: g @ b.T, qg, dfpjax.quantize(b)))


def test_stochastic_rounding_needs_a_key_and_reproduces():
  rng = np.random.default_rng(5)
  a, b = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
  cfg = dfpjax.DFPConfig(forward=dfpjax.QuantConfig(bits=6, rounding="stochastic"),
                         gradient=dfpjax.QuantConfig(bits=6, rounding="stochastic"))
  with pytest.raises(ValueError, match="needs key"):
    dfpjax.dfp_dot_general(a, b, DENSE, config=cfg)
  f = jax.jit(jax.value_and_grad(lambda a, b, k: dfpjax.dfp_dot_general(a, b, DENSE, config=cfg, key=k).sum(),
                                 argnums=(0, 1)))
  y1, g1 = f(a, b, jax.random.key(0))
  y2, g2 = f(a, b, jax.random.key(0))
  y3, g3 = f(a, b, jax.random.key(1))
  assert float(y1) == float(y2) and float(y1) != float(y3)
  np.testing.assert_array_equal(np.asarray(g1[0]), np.asarray(g2[0]))
  assert np.any(np.asarray(g1[0]) != np.asarray(g3[0]))
  # The forward operands use the documented keys: fold_in(key, 0) and fold_in(key, 1).
  key = jax.random.key(0)
  qa = dfpjax.quantize(a, bits=6, rounding="stochastic", key=jax.random.fold_in(key, 0))
  qb = dfpjax.quantize(b, bits=6, rounding="stochastic", key=jax.random.fold_in(key, 1))
  np.testing.assert_array_equal(np.asarray(dfpjax.dfp_dot_general(a, b, DENSE, config=cfg, key=key)),
                                _exact(lambda a, b: a @ b, qa, qb))


def test_jit_eager_vmap_and_vmap_of_grad_agree(isa):
  rng = np.random.default_rng(6)
  xs = rng.standard_normal((5, 7, 12)).astype(np.float32)
  w = rng.standard_normal((12, 9)).astype(np.float32)
  ws = rng.standard_normal((5, 12, 9)).astype(np.float32)
  f = lambda x, w: dfpjax.dfp_dot_general(x, w, DENSE)
  loop = np.stack([np.asarray(f(x, w)) for x in xs])
  np.testing.assert_array_equal(np.asarray(jax.vmap(f, (0, None))(xs, w)), loop)
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(f, (0, None)))(xs, w)), loop)
  np.testing.assert_array_equal(np.asarray(jax.vmap(f, (None, 0))(xs[0], ws)),
                                np.stack([np.asarray(f(xs[0], v)) for v in ws]))
  np.testing.assert_array_equal(np.asarray(jax.vmap(f)(xs, ws)),
                                np.stack([np.asarray(f(x, v)) for x, v in zip(xs, ws)]))
  np.testing.assert_array_equal(np.asarray(jax.vmap(f, (2, None), 1)(np.moveaxis(xs, 0, 2), w)),
                                np.moveaxis(loop, 0, 1))
  loss = lambda x, w: jnp.sum(jnp.tanh(f(x, w)))
  per_example = jax.vmap(jax.grad(loss, argnums=(0, 1)), (0, None))(xs, w)
  for i, x in enumerate(xs):
    gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
    np.testing.assert_array_equal(np.asarray(per_example[0][i]), np.asarray(gx))
    np.testing.assert_array_equal(np.asarray(per_example[1][i]), np.asarray(gw))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int16, jnp.complex64, jnp.float64])
def test_non_float_operands_are_rejected(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    with pytest.raises(TypeError, match="lhs must be float32, bfloat16 or float16"):
      dfpjax.dfp_dot_general(jnp.ones((2, 3), dtype), jnp.ones((3, 2)), DENSE)


def test_bad_dimension_numbers_are_rejected():
  a, b = jnp.ones((2, 3)), jnp.ones((4, 2))
  with pytest.raises(ValueError, match="contracting dimension sizes differ"):
    dfpjax.dfp_dot_general(a, b, DENSE)
  with pytest.raises(ValueError, match="out of range"):
    dfpjax.dfp_dot_general(a, b, (((2,), (0,)), ((), ())))
  with pytest.raises(ValueError, match="as many contracting"):
    dfpjax.dfp_dot_general(a, b, (((1,), ()), ((), ())))
  with pytest.raises(ValueError, match="dimension_numbers must be"):
    dfpjax.dfp_dot_general(a, b, "ij,jk")
  with pytest.raises(TypeError, match="preferred_element_type"):
    dfpjax.dfp_dot_general(a, jnp.ones((3, 2)), DENSE, preferred_element_type=jnp.int32)
  with pytest.raises(ValueError, match="bits must be an integer in 2..16"):
    dfpjax.DFPConfig(forward=dfpjax.QuantConfig(bits=17))


def test_nan_or_inf_operand_gives_all_nan_output():
  a = np.ones((3, 4), np.float32)
  a[1, 2] = np.inf
  b = np.ones((4, 2), np.float32)
  y, vjp = jax.vjp(lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE), a, b)
  assert np.isnan(np.asarray(y)).all()
  # d a = g . Q(b)^T has finite operands; d b = Q(a)^T . g has the Inf.
  da, db = vjp(np.ones((3, 2), np.float32))
  assert np.isfinite(np.asarray(da)).all() and np.isnan(np.asarray(db)).all()


@pytest.mark.parametrize("bits", [2, 5, 8, 11, 16])
def test_any_bit_width(bits):
  rng = np.random.default_rng(bits)
  a, b = rng.standard_normal((9, 30)).astype(np.float32), rng.standard_normal((30, 7)).astype(np.float32)
  cfg = dfpjax.DFPConfig(forward=dfpjax.QuantConfig(bits=bits, headroom=bits // 4))
  qa = dfpjax.quantize(a, bits=bits, headroom=bits // 4)
  qb = dfpjax.quantize(b, bits=bits, headroom=bits // 4)
  np.testing.assert_array_equal(np.asarray(dfpjax.dfp_dot_general(a, b, DENSE, config=cfg)),
                                _exact(lambda a, b: a @ b, qa, qb))


def test_dense_weight_gradient_is_written_as_it_lies():
  """A dense layer's weight gradient (rhs [in, out]) comes out of the kernel in rhs order: the
  compiled gradient transposes nothing (an [out, in] product transposed by XLA is 5x slower)."""
  f = jax.jit(jax.grad(lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE).sum(), argnums=1))
  a, b = jnp.ones((8, 24)), jnp.ones((24, 5))
  hlo = f.lower(a, b).compile().as_text()
  kernel, = [line for line in hlo.splitlines() if 'custom_call_target="dfpjax_dot_general"' in line]
  assert "f32[1,24,5]" in kernel.split("custom-call(")[0]
  assert " transpose(" not in hlo and " copy(" not in hlo
  np.testing.assert_array_equal(f(a, b), np.full((24, 5), 8.0, np.float32))


def test_other_platforms_lower_to_pure_xla():
  """Without a GPU here, lower for CUDA: the primitive must become plain XLA ops (the reference),
  with no CPU custom call left."""
  f = jax.jit(jax.value_and_grad(lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE).sum(), argnums=(0, 1)))
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  cuda = f.trace(a, b).lower(lowering_platforms=("cuda",)).as_text()
  cpu = f.trace(a, b).lower(lowering_platforms=("cpu",)).as_text()
  assert "dfpjax_dot_general" in cpu
  assert "dfpjax_dot_general" not in cuda and "custom_call" not in cuda
  assert "dot_general" in cuda and "i64" in cuda  # the exact int64 product
