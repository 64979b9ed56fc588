"""diagnose: each DFP product's numerics on a batch (docs/transform.md, "diagnose")."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dfpjax
import spec_oracle
from dfpjax import dfp_transform, diagnose, report


def bits_config(bits):
  q = dfpjax.QuantConfig(bits=bits)
  return dfpjax.DFPConfig(forward=q, gradient=q)


def oracle_product(a, b, bits=16):
  """The DFP product a @ b (per tensor, round to nearest) by the spec oracle, and the
  oracle's quantizations of a and b."""
  qa, qb = spec_oracle.quantize(a, bits), spec_oracle.quantize(b, bits)
  return spec_oracle.dot_2d(qa[0], qa[1], qb[0], qb[1]).astype(np.float64), qa, qb


def rel_error(y, ref):
  return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def test_one_layer_matches_the_oracle_on_its_operands():
  """loss = sum(c * (x @ w)): the cotangent of x @ w is c, so every operand is known."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 5)).astype(np.float32)
  x[0, :3] = 1e-7  # far below the largest element: quantizes to zero at 16 bits
  w = rng.standard_normal((5, 4)).astype(np.float32)
  c = rng.standard_normal((6, 4)).astype(np.float32)
  loss = dfp_transform(lambda w, x: jnp.sum(c * (x @ w)))
  rows = diagnose(jax.grad(loss), w, x)
  assert [(d.index, d.role) for d in rows] == [(0, "forward"), (1, "backward-data"),
                                               (2, "backward-weights")]
  x64, w64, c64 = (a.astype(np.float64) for a in (x, w, c))
  # Spec section 4: with per-tensor exponents a gradient is the DFP product of the
  # quantized cotangent and the forward's quantized partner.
  y, qx, qw = oracle_product(x, w)
  dx, qc, _ = oracle_product(c, w.T)
  dw, _, _ = oracle_product(x.T, c)
  for d, got, want in ((rows[0], y, x64 @ w64), (rows[1], dx, c64 @ w64.T),
                       (rows[2], dw, x64.T @ c64)):
    assert d.calls == 1
    np.testing.assert_allclose(d.rel_error, rel_error(got, want), rtol=1e-9)
  limit = 2**15 - 1
  for d, operands in ((rows[0], (qx, qw)), (rows[1], (qc, qw)), (rows[2], (qc, qx))):
    assert d.exponents == tuple((q[1], q[1]) for q in operands)
    np.testing.assert_allclose(d.mantissa_use, [np.abs(q[0]).max() / limit for q in operands])
  zeroed = np.sum((x != 0) & (qx[0] == 0))
  assert zeroed == 3 and rows[0].underflow == (3 / np.count_nonzero(x), 0.0)
  assert rows[2].underflow[1] == rows[0].underflow[0]


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3, name="head")(nn.relu(nn.Dense(16, name="hidden")(x)))


@pytest.fixture(scope="module")
def train_step():
  model = Net()
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 2))
  y = jnp.arange(4) % 3
  params = model.init(jax.random.key(1), x)

  def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()
  return loss, params, x, y


def test_train_step_rows_are_the_reports_dfp_products(train_step):
  loss, params, x, y = train_step
  step = jax.value_and_grad(dfp_transform(loss))
  rows = diagnose(step, params, x, y)
  want = [(r.index, r.primitive, r.path, r.role) for r in report(step, params, x, y)
          if r.mode == "dfp"]
  assert [(d.index, d.primitive, d.path, d.role) for d in rows] == want
  assert {d.role for d in rows} == {"forward", "backward-data", "backward-weights"}
  assert {d.path for d in rows} == {"Net/conv", "Net/hidden", "Net/head"}
  assert all(0 < d.rel_error < 1e-3 and d.calls == 1 for d in rows)
  assert all(0.5 <= u < 1 for d in rows for u in d.mantissa_use)  # headroom 0
  table = str(rows)
  assert "backward-weights" in table and "rel_error" in table.splitlines()[0]


def test_fewer_bits_give_larger_errors(train_step):
  loss, params, x, y = train_step
  rows16 = diagnose(jax.value_and_grad(dfp_transform(loss, bits_config(16))), params, x, y)
  rows8 = diagnose(jax.value_and_grad(dfp_transform(loss, bits_config(8))), params, x, y)
  assert [(d.path, d.role) for d in rows8] == [(d.path, d.role) for d in rows16]
  for d8, d16 in zip(rows8, rows16):
    assert d8.rel_error > 20 * d16.rel_error, (d8, d16)
    assert all(u8 < 1 and u16 < 1 for u8, u16 in zip(d8.mantissa_use, d16.mantissa_use))


def test_forward_mode_measures_the_forward_sites():
  w = jax.random.normal(jax.random.key(2), (4, 4)) / 2
  h = jax.random.normal(jax.random.key(3), (3, 4))
  f = dfp_transform(lambda w, h: jnp.sum(jnp.tanh(h @ w)))
  rows = diagnose(lambda w, h: jax.jvp(f, (w, h), (w, h)), w, h)
  assert [(d.role, d.calls) for d in rows] == [("forward", 1)]
  assert rows[0].rel_error < 1e-3


def test_dfp_ops_called_directly_are_reported_but_not_measured():
  """The report lists a dfp_dot_general the function calls itself; diagnose measures the
  transform's sites only (it probes what a transform rewrites), with the report's indices."""
  w = jax.random.normal(jax.random.key(2), (4, 4)) / 2
  h = jax.random.normal(jax.random.key(3), (3, 4))
  f = lambda w, h: jnp.sum(jnp.tanh(dfpjax.dfp_dot_general(h, w, (((1,), (0,)), ((), ()))) @ w))
  step = jax.grad(dfp_transform(f))
  listed = [(r.index, r.role, r.reason) for r in report(step, w, h) if r.mode == "dfp"]
  assert [reason for *_, reason in listed].count("a DFP op called directly") == 1
  measured = [(d.index, d.role) for d in diagnose(step, w, h)]
  assert measured == [(i, role) for i, role, reason in listed if "called directly" not in reason]
  assert [role for _, role in measured] == ["forward", "backward-data", "backward-weights"]


def test_a_site_in_a_loop_is_measured_at_every_iteration():
  w = jax.random.normal(jax.random.key(2), (4, 4)) / 2
  h0 = jax.random.normal(jax.random.key(3), (3, 4))

  def loss(w, h):
    h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), h, None, length=3)
    return jnp.sum(h)
  rows = diagnose(jax.grad(dfp_transform(loss)), w, h0)
  assert [(d.role, d.calls) for d in rows] == [("forward", 3), ("backward-data", 3),
                                              ("backward-weights", 3)]
  # The forward row sums the three iterations' errors; its lhs exponents span theirs.
  hs, err2, ref2 = [np.asarray(h0)], 0.0, 0.0
  for _ in range(3):
    y = np.asarray(dfpjax.dfp_dot_general(hs[-1], w, (((1,), (0,)), ((), ()))), np.float64)
    ref = hs[-1].astype(np.float64) @ np.asarray(w, np.float64)
    err2, ref2 = err2 + np.sum((y - ref) ** 2), ref2 + np.sum(ref**2)
    hs.append(np.tanh(y).astype(np.float32))
  exponents = [int(dfpjax.quantize(h).exponent) for h in hs[:3]]
  assert rows[0].exponents[0] == (min(exponents), max(exponents))
  np.testing.assert_allclose(rows[0].rel_error, np.sqrt(err2 / ref2), rtol=1e-3)
