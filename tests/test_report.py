"""report describes what the function it is given runs (docs/transform.md, "report")."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import dfpjax
from dfpjax import dfp_transform, report

KEEP_HEAD = dfpjax.DFPConfig(keep_float=("*/head",))
TANGENT = "computes a tangent in a custom_jvp rule, which must stay linear"


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="head")(nn.relu(nn.Dense(16, name="hidden")(x)))


@pytest.fixture(scope="module")
def mlp():
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (8, 5))
  y = jnp.arange(8) % 3
  params = model.init(jax.random.key(1), x)

  def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()
  return loss, params, x, y


def summary(records):
  return sorted((r.path, r.role, r.out_shape, r.mode) for r in records)


FORWARD = [("MLP/head", "forward", (8, 3), "dfp"), ("MLP/hidden", "forward", (8, 16), "dfp")]
# Each Dense's gradients: backward-data has its input's shape, backward-weights its kernel's.
BACKWARD = [("MLP/head", "backward-data", (8, 16), "dfp"),
            ("MLP/head", "backward-weights", (16, 3), "dfp"),
            ("MLP/hidden", "backward-data", (8, 5), "dfp"),
            ("MLP/hidden", "backward-weights", (5, 16), "dfp")]


def test_report_of_the_transformed_function_lists_its_forward_sites(mlp):
  loss, params, x, y = mlp
  records = report(dfp_transform(loss), params, x, y)
  assert summary(records) == FORWARD
  assert [r.index for r in records] == [0, 1] and {r.direction for r in records} == {"forward"}
  # As before: a plain function is reported as dfp_transform would run it.
  assert records == report(loss, params, x, y)
  assert records == report(jax.jit(dfp_transform(loss)), params, x, y)


@pytest.mark.parametrize("wrap", [jax.grad, jax.value_and_grad, lambda f: jax.jit(jax.grad(f)),
                                  lambda f: jax.grad(jax.jit(f))],
                         ids=["grad", "value_and_grad", "jit_grad", "grad_jit"])
def test_report_of_a_gradient_lists_the_backward_sites(mlp, wrap):
  loss, params, x, y = mlp
  records = report(wrap(dfp_transform(loss)), params, x, y)
  assert summary(records) == sorted(FORWARD + BACKWARD)
  assert [r.index for r in records] == list(range(6))
  for r in records:
    if r.role == "backward-data":     # cotangent x kernel
      assert r.shapes[1] == next(f.shapes[1] for f in records if f.path == r.path and
                                 f.role == "forward")
  table = str(records)
  assert "backward-weights" in table and table.splitlines()[-1] == "6 sites: 6 dfp, 0 float, 0 unchanged"


def test_report_ignores_traces_cached_outside_it(mlp):
  loss, params, x, y = mlp
  step = jax.jit(jax.grad(dfp_transform(loss)))
  step(params, x, y)  # jit has traced (and cached) it without recording
  assert summary(report(step, params, x, y)) == sorted(FORWARD + BACKWARD)
  assert summary(report(step, params, x, y)) == sorted(FORWARD + BACKWARD)


def test_report_of_vmap_lists_the_batched_sites(mlp):
  loss, params, x, y = mlp
  batched = jax.vmap(dfp_transform(loss), in_axes=(None, 0, 0))
  records = report(batched, params, x.reshape(2, 4, 5), y.reshape(2, 4))
  assert [(r.path, r.role, r.out_shape) for r in records] == [
      ("MLP/hidden", "forward", (4, 16)), ("MLP/head", "forward", (4, 3))]


def test_report_of_vmap_of_grad_lists_the_backward_sites(mlp):
  loss, params, x, y = mlp
  per_batch = jax.vmap(jax.grad(dfp_transform(loss)), in_axes=(None, 0, 0))
  records = report(per_batch, params, x.reshape(2, 4, 5), y.reshape(2, 4))
  assert sorted((r.path, r.role, r.mode) for r in records) == \
      sorted((path, role, mode) for path, role, _, mode in FORWARD + BACKWARD)


def test_report_of_forward_mode_lists_the_forward_sites(mlp):
  """jax.jacfwd has no backward pass: the sites run as they are, their tangent products with
  them (report's backward-pass wrapper is a custom_vjp, which forward mode cannot take)."""
  loss, params, x, y = mlp
  records = report(jax.jacfwd(dfp_transform(loss), argnums=1), params, x, y)
  assert sorted((r.path, r.role, r.out_shape, r.mode) for r in records) == sorted(FORWARD)


def test_a_product_with_an_integer_operand_is_listed_unchanged_with_its_reason():
  records = report(lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32),
                   jnp.ones((2, 3), jnp.int8), jnp.ones((3, 2)))
  assert [(r.mode, r.reason) for r in records] == [("unchanged", "an operand is not floating point")]


def test_abstract_arguments(mlp):
  loss, params, x, y = mlp
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x, y))
  assert summary(report(jax.grad(dfp_transform(loss)), *abstract)) == sorted(FORWARD + BACKWARD)


def test_float_sites_list_their_backward_products(mlp):
  loss, params, x, y = mlp
  records = report(jax.grad(dfp_transform(loss, KEEP_HEAD)), params, x, y)
  head = [(r.role, r.out_shape, r.mode, r.reason) for r in records if r.path == "MLP/head"]
  kept = "path matches config.keep_float"
  # JAX's transpose rule computes the kernel's gradient transposed, then moves its axes.
  assert sorted(head) == [("backward-data", (8, 16), "float", kept),
                          ("backward-weights", (3, 16), "float", kept),
                          ("forward", (8, 3), "float", kept)]
  # config replaces the transforms' own configs.
  assert summary(report(jax.grad(dfp_transform(loss)), params, x, y, config=KEEP_HEAD)) == \
      summary(records)


def test_products_outside_any_transform_are_listed():
  x = jax.random.normal(jax.random.key(2), (4, 3))
  w = jax.random.normal(jax.random.key(3), (3, 2))
  v = jax.random.normal(jax.random.key(4), (2, 5))
  inner = dfp_transform(lambda w, x: jnp.tanh(x @ w))
  step = jax.grad(lambda w: jnp.sum(inner(w, x) @ v))
  records = report(step, w)
  outside = [(r.role, r.out_shape, r.mode) for r in records if r.reason == "outside dfp_transform"]
  assert sorted(outside) == [("backward", (4, 2), "float"), ("forward", (4, 5), "float")]
  assert sorted((r.role, r.mode) for r in records if r.reason != "outside dfp_transform") == [
      ("backward-data", "dfp"), ("backward-weights", "dfp"), ("forward", "dfp")]


def test_dfp_ops_called_directly_are_listed_with_their_gradients():
  """dfp_dot_general and dfp_conv_general_dilated called by the function itself, not by a
  transform: each listed once as a DFP product with the user's shapes, in forward mode too,
  and its two gradients when differentiated; the rest of the function is transformed."""
  x = jax.random.normal(jax.random.key(7), (2, 6, 6, 3))
  w = jax.random.normal(jax.random.key(8), (3, 3, 3, 4))
  v = jax.random.normal(jax.random.key(9), (4, 5))

  def f(x, w, v):
    y = dfpjax.dfp_conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    z = dfpjax.dfp_dot_general(y, v, (((3,), (0,)), ((), ())))
    return jnp.sum(jnp.tanh(z) @ jnp.ones((5, 2)))

  direct = lambda records: sorted((r.role, r.primitive, r.shapes, r.out_shape, r.mode)
                                  for r in records if "called directly" in r.reason)
  forward = [("forward", "conv_general_dilated", ((2, 6, 6, 3), (3, 3, 3, 4)), (2, 6, 6, 4), "dfp"),
             ("forward", "dot_general", ((2, 6, 6, 4), (4, 5)), (2, 6, 6, 5), "dfp")]
  records = report(f, x, w, v)
  assert direct(records) == forward
  assert [(r.role, r.mode, r.reason) for r in records if "called directly" not in r.reason] == [
      ("forward", "dfp", "rewritten")]
  assert direct(report(lambda x, t: jax.jvp(lambda x: f(x, w, v), (x,), (t,)), x, x)) == forward
  assert direct(report(jax.grad(f, argnums=(0, 1, 2)), x, w, v)) == sorted(forward + [
      ("backward-data", "conv_general_dilated", ((2, 6, 6, 4), (3, 3, 3, 4)), (2, 6, 6, 3), "dfp"),
      ("backward-data", "dot_general", ((2, 6, 6, 5), (4, 5)), (2, 6, 6, 4), "dfp"),
      ("backward-weights", "conv_general_dilated", ((2, 6, 6, 4), (2, 6, 6, 3)), (3, 3, 3, 4), "dfp"),
      ("backward-weights", "dot_general", ((2, 6, 6, 5), (2, 6, 6, 4)), (4, 5), "dfp")])


@jax.custom_jvp
def scaled_matmul(x, w):
  return x @ w


@scaled_matmul.defjvp
def _scaled_matmul_jvp(primals, tangents):
  (x, w), (dx, dw) = primals, tangents
  return x @ w, dx @ w + x @ dw


def test_custom_jvp_tangent_products_are_listed_as_float():
  x = jax.random.normal(jax.random.key(5), (4, 3))
  w = jax.random.normal(jax.random.key(6), (3, 2))
  f = dfp_transform(lambda w, x: jnp.sum(scaled_matmul(x, w) ** 2))
  records = report(jax.grad(f), w, x)
  assert [(r.role, r.mode) for r in records if r.reason != TANGENT] == [("forward", "dfp")]
  tangent = sorted((r.role, r.out_shape) for r in records if r.reason == TANGENT)
  # The tangent product x @ dw runs in float, and so does its transpose, the gradient of
  # w (computed transposed, as JAX's rule does). (JAX also traces dx @ w with a zero dx;
  # XLA drops it.)
  assert ("backward-weights", (2, 3)) in tangent and all(r.mode == "float" for r in records
                                                         if r.reason == TANGENT)


def ragged(x, w, sizes):
  return lax.ragged_dot(x, w, sizes)


def test_ragged_dot_is_run_as_it_is_and_listed_as_float():
  x = jax.random.normal(jax.random.key(7), (6, 3))
  w = jax.random.normal(jax.random.key(8), (2, 3, 4))
  sizes = jnp.array([2, 4], jnp.int32)
  np.testing.assert_array_equal(dfp_transform(ragged)(x, w, sizes), ragged(x, w, sizes))
  records = report(ragged, x, w, sizes)
  assert [(r.primitive, r.role, r.mode) for r in records] == [("ragged_dot_general", "forward", "float")]
  assert "does not rewrite ragged_dot" in records[0].reason
  grads = report(jax.grad(lambda w: jnp.sum(dfp_transform(ragged)(x, w, sizes))), w)
  assert {(r.primitive, r.mode) for r in grads} == {("ragged_dot_general", "float")}
  assert {r.role for r in grads} >= {"forward", "backward-weights"}
  assert all("does not rewrite ragged_dot" in r.reason for r in grads)


@jax.custom_vjp
def half_grad_matmul(x, w):
  return x @ w


def _half_fwd(x, w):
  return x @ w, (x, w)


def _half_bwd(res, g):
  x, w = res
  return (g @ w.T) / 2, (x.T @ g) / 2


half_grad_matmul.defvjp(_half_fwd, _half_bwd)


@pytest.mark.parametrize("remat", [False, True])
def test_a_custom_vjp_bwd_lists_its_own_backward_sites(remat):
  """The products of a user's bwd are sites of their own, in the backward pass, also
  where a remat traces that pass afresh (its name stack starts anew there)."""
  x = jax.random.normal(jax.random.key(9), (4, 3))
  w = jax.random.normal(jax.random.key(10), (3, 2))
  matmul = jax.checkpoint(half_grad_matmul) if remat else half_grad_matmul
  f = dfp_transform(lambda w, x: jnp.sum(jnp.tanh(matmul(x, w))))
  records = report(jax.grad(f, argnums=(0, 1)), w, x)
  assert [(r.role, r.out_shape, r.reason) for r in records] == [
      ("forward", (4, 2), "rewritten"), ("backward", (4, 3), "rewritten"),
      ("backward", (3, 2), "rewritten")]
  rows = dfpjax.diagnose(jax.grad(f, argnums=(0, 1)), w, x)
  assert [(d.role, d.calls) for d in rows] == [("forward", 1), ("backward", 1), ("backward", 1)]
