"""The examples' BatchNorm, and a dense layer, with every sum over the batch written out: XLA's
sums (``batch_sums``), ``dfpjax.channel_sums`` (``kernel_batch_sums``, a BatchNorm's two sums in
one read of its operands: the DFP ResNets' default, ``train.create_model``), or
``dfpjax.reproducible_sum`` for the same bits on 1, 2 or N devices
(``Config.reproducible_batch_sums``, ``reproducible_batch_sums``).

Memory (docs/performance.md, "Memory of the ResNet-50 DFP step"). Differentiated by JAX,
``nn.BatchNorm``'s scale and bias gradients are reductions of the layer's output cotangent whose
only consumer is the optimizer update, and XLA:CPU schedules them at the end of the step, so every
layer's float cotangent stays alive until then. ``batch_norm``'s custom VJP computes them from the
two sums the input gradient needs anyway (``dbias = sum(dy)``, ``dscale = sum(dy * x_hat)``), so
no cotangent outlives its layer: 1505 -> 1239 MiB of XLA temporaries in the ResNet-50 DFP step at
batch 16, and the step 5% faster (1.67 against 1.76 s). The normalised inputs ``x_hat`` depend
on forward values only, and when ``dscale``'s sum read them XLA:CPU's memory-optimized schedule
computed 30 of them at the start of the backward pass and kept them until their layers came
(1239 against 1024 MiB once they were tied to ``dy``). ``dscale`` is now ``inv * sum(dy * (x -
mean))``, from ``dy`` and ``x`` (one read of each with ``kernel_batch_sums``), and ``x_hat`` is
used only by the input gradient, after both sums: in its layer.

Reproducibility. A data-parallel step sums over the sharded batch wherever a per-channel value
meets a per-example one: BatchNorm's batch statistics in the forward pass, and in the backward pass
the transpose of every broadcast of a per-channel value (BatchNorm's scale, bias, mean and
variance, a dense layer's bias). XLA adds those float sums in an order that depends on the device
count. With ``reproducible_batch_sums`` they are all reproducible (two per BatchNorm each way, one
for a bias gradient); what remains of the step is elementwise or per example, or a DFP product
(exact on any device count).

``BatchNorm`` and ``Dense`` have ``nn.BatchNorm``'s and ``nn.Dense``'s variables (names, shapes,
initial values), so a checkpoint of either kind restores into the other.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax


def _batch_axes(x) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def batch_sums(a, b, center):
  """``(sum(a), sum(a * (b - center)))`` over all axes but the last (the features), ``center``
  per feature, one ``jnp.sum`` each: ``batch_sums(x, x, 0)`` is BatchNorm's sum and sum of
  squares, ``batch_sums(dy, x, mean)`` the sums of its bias and (over ``inv``) scale gradients.

  XLA:CPU runs these as YNNPACK reductions, the second after a fusion that writes its operand
  out. One variadic reduce of all of them, which XLA fuses with the elementwise work making its
  operands, kept no normalised input alive either (1020 MiB of the ResNet-50 DFP step's
  temporaries at batch 16) but made the step 25% slower (2.08 against 1.67 s, steps interleaved
  in one process): XLA's own reduction loops are slow there."""
  return _sum(a), _sum(a * (b - center))


def kernel_batch_sums(a, b, center):
  """``batch_sums`` by ``dfpjax.channel_sums``: one read of ``a`` and ``b`` on CPU, added in
  double (docs/performance.md, "BatchNorm's sums in one read")."""
  import dfpjax  # pylint: disable=g-import-not-at-top  (FP32 runs need none)
  return dfpjax.channel_sums(a, b, center)


def reproducible_batch_sums(a, b, center):
  """``batch_sums`` with each sum ``dfpjax.reproducible_sum``: the same bits on any device count."""
  return _reproducible_sum(a), _reproducible_sum(a * (b - center))


def _sum(x):
  return jnp.sum(x, axis=_batch_axes(x))


def _reproducible_sum(x):
  import dfpjax  # pylint: disable=g-import-not-at-top  (FP32 runs without the switch need none)
  return dfpjax.reproducible_sum(x, _batch_axes(x))


def _count(x) -> int:
  return math.prod(x.shape[:-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm(x, scale, bias, epsilon: float, sums: Callable = batch_sums):
  """Training-mode BatchNorm over all axes but the last: ``(y, mean, var)``, with flax's
  formulas (``nn.BatchNorm``, fast variance E[x^2] - E[x]^2 clipped at 0); ``sums`` is
  ``batch_sums``, ``kernel_batch_sums`` or ``reproducible_batch_sums``."""
  return _batch_norm_fwd(x, scale, bias, epsilon, sums)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, sums):
  n = _count(x)
  total, total_of_squares = sums(x, x, jnp.zeros_like(bias))
  mean = total / n
  var = jnp.maximum(0.0, total_of_squares / n - mean * mean)
  inv = lax.rsqrt(var + epsilon)
  y = (x - mean) * (inv * scale) + bias
  return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(epsilon, sums, residuals, cotangents):
  del epsilon
  x, mean, inv, scale = residuals
  dy, dmean, dvar = cotangents
  n = _count(x)
  centered = x - mean
  # dscale = sum(dy * x_hat) as inv * sum(dy * (x - mean)): both sums from dy and x, in one read
  # with kernel_batch_sums, which then writes no x_hat out.
  dbias, dot = sums(dy, x, mean)
  dscale = dot * inv
  x_hat = centered * inv
  dx = (inv * scale) * (dy - dbias / n - x_hat * (dscale / n))
  # The statistics' own cotangents (zero in a train step: they only update batch_stats).
  dx += dmean / n + dvar * (2.0 / n) * centered
  return dx, dscale, dbias


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


@jax.custom_vjp
def add_bias(y, bias):
  """``y + bias`` (bias along the last axis) whose bias gradient is a reproducible batch sum."""
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, None


def _add_bias_bwd(_, dy):
  return dy, _reproducible_sum(dy)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class BatchNorm(nn.Module):
  """``nn.BatchNorm`` over all axes but the last whose training mode is ``batch_norm`` with
  ``sums``; the fields it shares with ``nn.BatchNorm`` mean the same, statistics are float32."""
  use_running_average: bool
  sums: Callable = batch_sums
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones_init()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", self.scale_init, features, jnp.float32)
    bias = self.param("bias", self.bias_init, features, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    if self.use_running_average:
      y = (x - ra_mean.value) * (lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
    else:
      y, mean, var = batch_norm(x, scale, bias, self.epsilon, self.sums)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return jnp.asarray(y, self.dtype)


class Dense(nn.Module):
  """``nn.Dense`` whose bias gradient is a reproducible batch sum (``add_bias``)."""
  features: int
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return add_bias(y, bias)
