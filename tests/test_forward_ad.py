"""Forward mode and higher order of the DFP ops (docs/numerics.md, "Forward mode and higher
order"), against the documented rules built from public API.

* The tangent of ``y = op(a, b)`` is ``op(Qg(ta), qb) + op(qa, Qg(tb))``: DFP products of
  the tangents quantized with the gradient settings and the forward's quantized operands.
* A derivative of a DFP rule with respect to a quantized operand is the same rule with that
  operand replaced by its quantized tangent; so a Hessian-vector product is DFP products.
* Reverse mode is the transpose of the tangent map and stays spec section 4 bit for bit
  (tests/test_dot_general.py, tests/test_conv.py, tests/test_transform.py pin it).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import dfpjax

DENSE = (((1,), (0,)), ((), ()))
DENSE_T_LHS = (((1,), (1,)), ((), ()))   # d lhs = g @ rhs.T
DENSE_T_RHS = (((0,), (0,)), ((), ()))   # d rhs = lhs.T @ g


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _bits(x):
  return np.asarray(x).view(np.uint32)


def assert_bitwise_equal(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_array_equal(_bits(g), _bits(w))


def _dot(qa, qb, dims=DENSE):
  return dfpjax.dfp_dot_general(qa, qb, dims)


def _q(x, **kw):
  return dfpjax.quantize(x, **kw)


# ---------------------------------------------------------------------------------------
# The tangent: DFP products of the quantized tangents.
# ---------------------------------------------------------------------------------------

CONFIGS = {
    "default": dfpjax.DFPConfig(),
    "8-bit gradients": dfpjax.DFPConfig(gradient=dfpjax.QuantConfig(bits=8)),
    "per-channel forward": dfpjax.DFPConfig(forward=dfpjax.QuantConfig(granularity="channel")),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_dot_jvp_is_dfp_products_of_quantized_tangents(name):
  config = CONFIGS[name]
  a, b, ta, tb = _normal(0, (6, 7)), _normal(1, (7, 5)), _normal(2, (6, 7)), _normal(3, (7, 5))
  f = lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE, config=config)
  y, ty = jax.jit(lambda *args: jax.jvp(f, args[:2], args[2:]))(a, b, ta, tb)
  fwd, grad = config.forward, config.gradient
  channel = fwd.granularity == "channel"
  qa = _q(a, bits=fwd.bits, granularity=fwd.granularity, axis=0 if channel else None)
  qb = _q(b, bits=fwd.bits, granularity=fwd.granularity, axis=1 if channel else None)
  want = _dot(_q(ta, bits=grad.bits), qb) + _dot(qa, _q(tb, bits=grad.bits))
  assert_bitwise_equal(y, _dot(qa, qb))
  assert_bitwise_equal(ty, want)
  # One tangent only: the other product is absent, not a product with zero.
  _, ty_a = jax.jvp(lambda a: f(a, b), (a,), (ta,))
  assert_bitwise_equal(ty_a, _dot(_q(ta, bits=grad.bits), qb))


def test_stochastic_tangents_use_their_documented_keys():
  config = dfpjax.DFPConfig(gradient=dfpjax.QuantConfig(rounding="stochastic"))
  key = jax.random.key(7)
  a, b, ta, tb = _normal(0, (3, 8)), _normal(1, (8, 4)), _normal(2, (3, 8)), _normal(3, (8, 4))
  f = lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE, config=config, key=key)
  _, ty = jax.jvp(f, (a, b), (ta, tb))
  stochastic = lambda x, n: _q(x, rounding="stochastic", key=jax.random.fold_in(key, n))
  want = _dot(stochastic(ta, 3), _q(b)) + _dot(_q(a), stochastic(tb, 4))
  assert_bitwise_equal(ty, want)


CONV = dict(window_strides=(2, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _exact_conv(qx, qw):
  """A DFP convolution of quantized operands (spec section 3): exact in float64, rounded once."""
  f64 = lambda t: np.asarray(t.mantissa, np.float64) * np.ldexp(1.0, int(t.exponent))
  with jax.enable_x64(True):
    y = lax.conv_general_dilated(jnp.asarray(f64(qx)), jnp.asarray(f64(qw)), **CONV)
    return jnp.asarray(np.asarray(y).astype(np.float32))


def test_conv_jvp_is_dfp_products_of_quantized_tangents():
  x, w, tx, tw = _normal(0, (2, 6, 5, 3)), _normal(1, (3, 3, 3, 4)), _normal(2, (2, 6, 5, 3)), \
      _normal(3, (3, 3, 3, 4))
  f = lambda x, w: dfpjax.dfp_conv_general_dilated(x, w, **CONV)
  y, ty = jax.jit(lambda *args: jax.jvp(f, args[:2], args[2:]))(x, w, tx, tw)
  assert_bitwise_equal(y, _exact_conv(_q(x), _q(w)))
  assert_bitwise_equal(ty, _exact_conv(_q(tx), _q(w)) + _exact_conv(_q(x), _q(tw)))


# ---------------------------------------------------------------------------------------
# Forward and reverse agree where the rules coincide; linearize; vmap.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["dot", "conv"])
def test_jacfwd_equals_jacrev(op):
  # Basis tangents and cotangents are powers of two, which quantize exactly: both Jacobians
  # are then the exact products of the basis with the same quantized partners.
  if op == "dot":
    f = lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE)
    args = (_normal(0, (3, 4)), _normal(1, (4, 2)))
  else:
    f = lambda a, b: dfpjax.dfp_conv_general_dilated(a, b, **CONV)
    args = (_normal(0, (1, 4, 3, 2)), _normal(1, (2, 2, 2, 3)))
  forward = jax.jit(jax.jacfwd(f, argnums=(0, 1)))(*args)
  reverse = jax.jit(jax.jacrev(f, argnums=(0, 1)))(*args)
  assert_bitwise_equal(forward, reverse)
  assert any(np.any(np.asarray(j) != 0) for j in forward)


def test_linearize_and_its_transpose_are_jvp_and_vjp():
  a, b, ta, tb = _normal(0, (6, 7)), _normal(1, (7, 5)), _normal(2, (6, 7)), _normal(3, (7, 5))
  f = lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE)
  y, f_lin = jax.linearize(f, a, b)
  _, ty = jax.jvp(f, (a, b), (ta, tb))
  assert_bitwise_equal(f_lin(ta, tb), ty)
  g = _normal(4, y.shape)
  _, f_vjp = jax.vjp(f, a, b)
  assert_bitwise_equal(jax.linear_transpose(f_lin, a, b)(g), f_vjp(g))
  # Spec section 4: the cotangent quantized, times the same quantized partners.
  assert_bitwise_equal(f_vjp(g), (_dot(_q(g), _q(b), DENSE_T_LHS),
                                  _dot(_q(a), _q(g), DENSE_T_RHS)))


def test_vmap_of_jvp_is_per_example():
  a, b, ta = _normal(0, (3, 4, 5)), _normal(1, (5, 2)), _normal(2, (3, 4, 5))
  f = lambda a, ta: jax.jvp(lambda a: dfpjax.dfp_dot_general(a, b, DENSE), (a,), (ta,))[1]
  assert_bitwise_equal(jax.vmap(f)(a, ta), jnp.stack([f(a[i], ta[i]) for i in range(3)]))


def test_grad_of_vmap_is_per_example_gradients():
  # Transposing a batched tangent primitive: a batched operand gets its per-example
  # gradient, a shared one the sum over the batch.
  a, b = _normal(0, (3, 4, 5)), _normal(1, (5, 2))
  loss = lambda a, b: jnp.sum(dfpjax.dfp_dot_general(a, b, DENSE) ** 2)
  batched = lambda a, b: jnp.sum(jax.vmap(loss, in_axes=(0, None))(a, b))
  ga, gb = jax.grad(batched, argnums=(0, 1))(a, b)
  each = [jax.grad(loss, argnums=(0, 1))(a[i], b) for i in range(3)]
  assert_bitwise_equal(ga, jnp.stack([g[0] for g in each]))
  np.testing.assert_allclose(gb, sum(g[1] for g in each), rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Second order: Hessian-vector products and Hessians are DFP products.
# ---------------------------------------------------------------------------------------


def _half_square_loss(a, b):
  return 0.5 * jnp.sum(dfpjax.dfp_dot_general(a, b, DENSE) ** 2)


def _hvp_rule(a, b, va, vb):
  """The documented HVP of ``_half_square_loss``. Its gradient is the section 4 product of
  ``g = y`` with the partners; the derivative is the same rule on ``dg = ty`` (linear part)
  plus the rule with a partner replaced by its quantized tangent."""
  qa, qb = _q(a), _q(b)
  y = _dot(qa, qb)
  terms = [(_dot(_q(va), qb) if va is not None else None),
           (_dot(qa, _q(vb)) if vb is not None else None)]
  ty = sum(t for t in terms if t is not None)
  hva = _dot(_q(ty), qb, DENSE_T_LHS)
  hvb = _dot(qa, _q(ty), DENSE_T_RHS)
  if vb is not None:
    hva = hva + _dot(_q(y), _q(vb), DENSE_T_LHS)
  if va is not None:
    hvb = hvb + _dot(_q(va), _q(y), DENSE_T_RHS)
  return hva, hvb


def test_hessian_vector_product_is_dfp_products():
  a, b, va, vb = _normal(0, (4, 6)), _normal(1, (6, 3)), _normal(2, (4, 6)), _normal(3, (6, 3))
  hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(_half_square_loss, argnums=(0, 1)), p, v)[1])
  assert_bitwise_equal(hvp((a, b), (va, vb)), _hvp_rule(a, b, va, vb))


def test_hessian_is_hvps_of_the_basis():
  a, b = _normal(0, (2, 3)), _normal(1, (3, 2))
  hessian = jax.jit(jax.hessian(_half_square_loss, argnums=(0, 1)))(a, b)
  for arg, x in enumerate((a, b)):
    columns = []
    for i in range(x.size):
      v = jnp.zeros(x.size, jnp.float32).at[i].set(1.0).reshape(x.shape)
      columns.append(_hvp_rule(a, b, *((v, None) if arg == 0 else (None, v))))
    for out in range(2):
      want = jnp.stack([c[out] for c in columns], axis=-1).reshape(hessian[out][arg].shape)
      assert_bitwise_equal(hessian[out][arg], want)
  # The mixed block is no Gauss-Newton approximation: it holds the partner-tangent term.
  assert np.any(np.asarray(hessian[0][1]) != 0)


def test_conv_hessian_vector_product_runs_and_is_symmetric():
  # <u, H v> = <v, H u> where the quantizations involved are exact: one-hot directions.
  x, w = _normal(0, (1, 4, 4, 2)), _normal(1, (2, 2, 2, 2))
  loss = lambda x, w: 0.5 * jnp.sum(dfpjax.dfp_conv_general_dilated(x, w, **CONV) ** 2)
  hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(loss, argnums=(0, 1)), p, v)[1])
  u = (jnp.zeros_like(x).at[0, 1, 2, 0].set(1.0), jnp.zeros_like(w))
  v = (jnp.zeros_like(x), jnp.zeros_like(w).at[1, 0, 1, 1].set(1.0))
  inner = lambda p, q: sum(jnp.vdot(s, t) for s, t in zip(p, q))
  hu, hv = hvp((x, w), u), hvp((x, w), v)
  assert float(inner(u, hv)) != 0.0
  np.testing.assert_allclose(float(inner(u, hv)), float(inner(v, hu)), rtol=1e-3)


# ---------------------------------------------------------------------------------------
# Through dfp_transform.
# ---------------------------------------------------------------------------------------


def _mlp(params, x):
  w1, w2 = params
  return jnp.tanh(x @ w1) @ w2


def _mlp_dfp(params, x):
  w1, w2 = params
  dot = functools.partial(dfpjax.dfp_dot_general, dimension_numbers=DENSE)
  return dot(jnp.tanh(dot(x, w1)), w2)


def test_jvp_and_hessian_through_dfp_transform():
  params = (_normal(0, (5, 4)), _normal(1, (4, 3)))
  x, tangent = _normal(2, (2, 5)), (_normal(3, (5, 4)), _normal(4, (4, 3)))
  transformed = dfpjax.dfp_transform(_mlp)
  assert_bitwise_equal(jax.jvp(lambda p: transformed(p, x), (params,), (tangent,)),
                       jax.jvp(lambda p: _mlp_dfp(p, x), (params,), (tangent,)))
  loss = lambda f: (lambda p: 0.5 * jnp.sum(f(p, x) ** 2))
  assert_bitwise_equal(jax.jit(jax.hessian(loss(transformed)))(params),
                       jax.jit(jax.hessian(loss(_mlp_dfp)))(params))


def test_hessian_under_checkpoint_and_the_undefined_reverse_over_reverse():
  a, b = _normal(0, (4, 6)), _normal(1, (6, 3))
  remat = jax.checkpoint(_half_square_loss)
  assert_bitwise_equal(jax.hessian(remat)(a, b), jax.hessian(_half_square_loss)(a, b))
  # grad of grad through both operands needs the partner-tangent terms' transpose.
  penalty = lambda a, b: jnp.sum(jax.grad(_half_square_loss)(a, b) ** 2)
  with pytest.raises(NotImplementedError, match="Forward over reverse"):
    jax.grad(penalty, argnums=(0, 1))(a, b)
