"""Tests of examples/imagenet/batch_sums.py: the examples' BatchNorm is ``nn.BatchNorm`` (its
variables, its numerics to float rounding) with a backward pass that computes the scale and bias
gradients from the sums the input gradient needs (docs/performance.md, "Memory of the ResNet-50
DFP step")."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.imagenet import batch_sums

SUMS = [batch_sums.batch_sums, batch_sums.kernel_batch_sums, batch_sums.reproducible_batch_sums]


def test_batch_sums_are_the_sums_over_all_axes_but_the_last():
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=(4, 5, 6, 3)), jnp.float32) for _ in range(2))
  center = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  for sums in SUMS:
    total, dot = sums(a, b, center)
    np.testing.assert_allclose(total, np.sum(a64, axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dot, np.sum(a64 * (b64 - np.asarray(center)), axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-5)
    total, dot = sums(a[0, 0], b[0, 0], center)  # features only after the batch axis
    np.testing.assert_allclose(total, np.sum(a64[0, 0], axis=0), rtol=1e-5, atol=1e-5)
    assert dot.shape == (3,)


def flax_and_ours(**kwargs):
  return (nn.BatchNorm(use_running_average=False, momentum=0.9, **kwargs),
          batch_sums.BatchNorm(use_running_average=False, momentum=0.9, **kwargs))


def close(actual, expected):
  """Equal up to float32 rounding, relative to the largest element: the sums add in another
  order, and the fast variance E[x^2] - E[x]^2 loses digits to E[x]^2 (as flax's does)."""
  scale = float(np.max(np.abs(expected)))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("sums", SUMS)
def test_batch_norm_is_flax_batch_norm_to_float_rounding(sums):
  rng = np.random.default_rng(1)
  # Channels off zero mean and unit scale, as after a convolution.
  x = jnp.asarray(rng.normal(size=(8, 6, 6, 5)) * [0.5, 1, 2, 4, 8] + [3, -1, 0, 0.5, 20],
                  jnp.float32)
  reference, ours = flax_and_ours(epsilon=1e-5)
  ours = ours.clone(sums=sums)
  variables = reference.init(jax.random.key(0), x)
  ours_variables = ours.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(ours_variables)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(ours_variables), strict=True):
    np.testing.assert_array_equal(a, b)
  params = {"scale": jnp.asarray(rng.normal(size=5), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=5), jnp.float32)}
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def forward_and_gradients(module):
    def loss(x, params):
      y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
      return jnp.sum(y * cotangent), (y, updates["batch_stats"])
    (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
    return y, stats, grads

  expected, actual = (jax.jit(forward_and_gradients, static_argnums=0)(m)
                      for m in (reference, ours))
  (y0, stats0, (dx0, dparams0)), (y1, stats1, (dx1, dparams1)) = expected, actual
  close(y1, y0)
  for name in ("mean", "var"):
    close(stats1[name], stats0[name])
  close(dx1, dx0)
  for name in ("scale", "bias"):
    close(dparams1[name], dparams0[name])
  # Evaluation with the running statistics: the same formula as flax's.
  eval_variables = {"params": params, "batch_stats": stats0}
  np.testing.assert_array_equal(
      ours.clone(use_running_average=True).apply(eval_variables, x),
      reference.clone(use_running_average=True).apply(eval_variables, x))


def test_batch_norm_keeps_the_compute_dtype():
  x = jnp.ones((2, 3, 3, 4), jnp.bfloat16)
  reference, ours = flax_and_ours(dtype=jnp.bfloat16)
  variables = reference.init(jax.random.key(0), x)
  y, _ = ours.apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))

