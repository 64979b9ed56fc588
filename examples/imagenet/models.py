"""The four networks of Das et al. (ICLR 2018) plus ResNet-18, in Flax linen (NHWC).

Every convolution and dense layer is a plain ``nn.Conv``/``nn.Dense``, so each one is a
``conv_general_dilated``/``dot_general`` in the jaxpr, which is what ``dfpjax.dfp_transform``
rewrites. Pooling and normalisation never use a matmul for the same reason.

All models take ``(batch, height, width, 3)`` images, are called as
``model.apply(variables, x, train=...)`` and return float32 logits. They run at 224x224 with the
canonical parameter counts and also at small sizes such as 32x32 (see ``max_pool`` and
``adaptive_avg_pool``).
"""

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

import dfpjax
from examples.imagenet import batch_sums

ModuleDef = Any

# torchvision's initialisation for convolutions (He et al. 2015, fan-out) and classifiers.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.normal(0.01)
# He et al. (2015) in its fan-in form, which keeps the variance of the activations from layer to
# layer, for the ReLU layers of GoogLeNet and AlexNet: without normalisation nothing else does.
# The fan-out form multiplies a layer's output variance by its fan-in over its fan-out, so
# GoogLeNet's 1x1 reductions (832 -> 32) blow the activations up (their rms grows 1.5-2x per
# inception module) and AlexNet's grouped conv2, conv4 and conv5 shrink them, as normal(0.01) does
# for fc6 and fc7 (measured: docs/accuracy.md).
relu_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_2d(x, window: tuple[int, int], strides: tuple[int, int],
                padding: tuple[tuple[int, int], tuple[int, int]]):
  """``nn.max_pool(x, window, strides, padding)`` of NHWC ``x`` (explicit padding pairs), the
  same values and the same gradient bits, which XLA:CPU computes about five times faster.

  JAX differentiates a max pool into a select-and-scatter, which XLA:CPU expands into a
  reduce-window over the input and four index arrays and then a scatter: 97 ms a step for the
  ResNet-50 stem's pool at batch 16 on two cores (docs/performance.md, "The max pool's
  gradient"). Here the forward pass keeps, per output, the window offset the select-and-scatter
  would choose (its first maximum, by the same comparisons), in int8 (``dfpjax.materialized``:
  computed in the forward pass, not again from a kept ``x`` in the backward one), and the
  backward pass scatters the cotangents there, so the gradient has the select-and-scatter's
  bits.

  A ReLU commutes with it (both are monotone, and ReLU's gradient at a window's maximum is that
  of the window's first maximum), so the ResNet and GoogLeNet stems pool first and take the ReLU
  of the pooled map: the same values and gradient bits wherever there is no NaN, with the ReLU
  and its backward select on a quarter of the pixels (the ResNet-50 DFP step at batch 16 1.4%
  shorter, GoogLeNet's 4% less memory: docs/performance.md)."""
  return _max_pool_values(x, window, strides, padding)


def _max_pool_values(x, window, strides, padding):
  return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, *window, 1),
                           (1, *strides, 1), ((0, 0), *padding, (0, 0)))


def _window_offsets(window):
  return [(i, j) for i in range(window[0]) for j in range(window[1])]


def _max_pool_fwd(x, window, strides, padding):
  if math.prod(x.shape[1:]) >= 2**31:
    raise ValueError(f"max_pool_2d: images of {math.prod(x.shape[1:])} elements; its gradient "
                     f"indexes them in int32, so it takes fewer than 2**31")
  # nn.max_pool's own reduce-window: whether XLA:CPU's reduce-window drops NaNs or propagates
  # them depends on the shape (a 2x2 pool of [2, 16, 16, 8] drops them, of [1, 8, 8, 4]
  # propagates them), so no max folded over the window's slices below has its bits everywhere.
  y = _max_pool_values(x, window, strides, padding)
  # The offset the select-and-scatter chooses: the window's elements (padding's -inf among them)
  # in row-major order, each taking over unless the one chosen so far is >= it. Found by
  # comparing them with each other, not with y: XLA may fuse x's producer into this and into
  # y's reduction with different roundings.
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
  best = chosen = None
  for k, (i, j) in enumerate(_window_offsets(window)):
    candidate = lax.slice(padded, (0, i, j, 0), (y.shape[0], i + (y.shape[1] - 1) * strides[0] + 1,
                                                 j + (y.shape[2] - 1) * strides[1] + 1, y.shape[3]),
                          (1, *strides, 1))
    if best is None:
      best, chosen = candidate, jnp.zeros(y.shape, jnp.int8 if window[0] * window[1] <= 128 else jnp.int32)
    else:
      later = ~(best >= candidate)
      best = jnp.where(later, candidate, best)
      chosen = jnp.where(later, jnp.asarray(k, chosen.dtype), chosen)
  # Computed here and stored (y tied to them): else XLA:CPU computes them in the backward pass
  # and keeps x for it.
  chosen = dfpjax.materialized(chosen)
  return dfpjax.after(y, chosen), (chosen, x.shape)


def _max_pool_bwd(window, strides, padding, residuals, dy):
  chosen, shape = residuals
  # Each output's cotangent added into the input its window chose (none where that is padding):
  # a scatter-add over the windows in order, as XLA:CPU runs the select-and-scatter (after its
  # far slower search), per image into its flattened pixels (one index array, not three), the
  # images a batch dimension of the scatter, which a sharded batch splits.
  def image(chosen, dy):
    offset = chosen.astype(jnp.int32)
    iota = lambda axis: lax.broadcasted_iota(jnp.int32, dy.shape, axis)
    flat, inside = 0, True
    for axis, tap in ((0, offset // window[1]), (1, offset % window[1])):
      at = iota(axis) * strides[axis] + tap - padding[axis][0]
      flat, inside = flat * shape[axis + 1] + at, inside & (at >= 0) & (at < shape[axis + 1])
    pixels = math.prod(shape[1:])
    flat = jnp.where(inside, flat * shape[3] + iota(2), pixels)  # padding: past the end, dropped
    dx = jnp.zeros(pixels, dy.dtype).at[flat.reshape(-1)].add(dy.reshape(-1), mode="drop")
    return dx.reshape(shape[1:])

  return (jax.vmap(image)(chosen, dy),)


max_pool_2d.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window: int, stride: int):
  """Max pooling (``max_pool_2d``) with Caffe's ceil-mode output size, but never smaller than
  1x1.

  At 224x224 this gives the canonical feature-map sizes; on small inputs the right/bottom edge is
  padded with -inf so that a map smaller than the window still yields one output.
  """
  pads = []
  for size in x.shape[1:3]:
    out = max(1, math.ceil((size - window) / stride) + 1)
    pads.append((0, (out - 1) * stride + window - size))
  return max_pool_2d(x, (window, window), (stride, stride), tuple(pads))


def adaptive_avg_pool(x, out: int):
  """torchvision's ``AdaptiveAvgPool2d(out)``: bin i covers [floor(i*n/out), ceil((i+1)*n/out)).

  The identity when the map already is out x out (VGG/AlexNet at 224, so parameter counts are
  canonical); a map smaller than out x out is replicated, so small inputs keep the classifier's
  shape.
  """
  def pool_axis(x, axis):
    n = x.shape[axis]
    if n == out:
      return x
    bins = [jax.lax.slice_in_dim(x, (i * n) // out, -(-(i + 1) * n // out), axis=axis)
            .mean(axis=axis, keepdims=True) for i in range(out)]
    return jnp.concatenate(bins, axis=axis)
  return pool_axis(pool_axis(x, 1), 2)


def local_response_norm(x, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 2.0, groups: int = 1):
  """Cross-channel LRN as in Krizhevsky et al. (2012): x / (k + alpha * sum_window x^2)^beta.

  Unlike Caffe and PyTorch, ``alpha`` is not divided by ``size``. With ``groups > 1`` the window
  stays inside each group of channels, as it did on each GPU of the two-tower AlexNet. The
  window sum is a sum of shifted slices: differentiable, and no matmul for DFP to pick up.

  The gradient is JAX's, with the window sum's cotangent stored (``cotangent_materialized``):
  the window sum's transpose adds that cotangent at each of the window's shifts, and XLA:CPU
  fused its computation (a ``pow`` of the window sum, itself a sum of shifted squares) into each
  shift, five times per element: GoogLeNet's DFP step at batch 16 spent a quarter of its time in
  conv2's LRN gradient. The power is ``_power``'s (square roots for the models' beta 0.75, its
  slope from its value). Both change the last bits against the plain formula (many ulp of the
  gradient where its two terms cancel), with errors against the exact values and gradient of the
  same size (tested); docs/performance.md, "The local response norm's gradient, stored".
  """
  *lead, c = x.shape
  sq = jnp.square(x.reshape(*lead, groups, c // groups))
  half = size // 2
  padded = jnp.pad(sq, [(0, 0)] * (sq.ndim - 1) + [(half, half)])
  window_sum = cotangent_materialized(sum(padded[..., i:i + sq.shape[-1]] for i in range(size)))
  return x / _power(k + alpha * window_sum, beta).reshape(x.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _power(base, exponent: float):
  """``base ** exponent`` for ``base > 0``; for 0.75 (the models') ``sqrt(base * sqrt(base))``:
  two correctly rounded square roots and a product, where XLA:CPU's ``pow`` (a logarithm and an
  exponential) took 3 ns an element. The derivative ``exponent * value / base``, from the value:
  no second ``pow`` in the backward pass."""
  return jnp.sqrt(base * jnp.sqrt(base)) if exponent == 0.75 else jnp.power(base, exponent)


@_power.defjvp
def _power_jvp(exponent, primals, tangents):
  (base,), (tangent,) = primals, tangents
  value = _power(base, exponent)
  return value, tangent * (exponent * value / base)


@jax.custom_vjp
def cotangent_materialized(x):
  """``x``, whose cotangent is ``dfpjax.materialized``: computed once and stored, where XLA:CPU
  would fuse its computation into each of its consumers in the backward pass."""
  return x


cotangent_materialized.defvjp(lambda x: (x, None), lambda _, g: (dfpjax.materialized(g),))


def same_conv(features: int, kernel_size: tuple[int, int], strides=(1, 1), **kwargs):
  """``nn.Conv`` with symmetric k//2 padding (Caffe/PyTorch), He-initialised."""
  padding = [(k // 2, k // 2) for k in kernel_size]
  kwargs.setdefault("kernel_init", conv_init)
  return nn.Conv(features, kernel_size, strides, padding=padding, **kwargs)


# ----------------------------------------------------------------------------- ResNet

# The name under which ``relu_keeping_signs`` saves its mask, for ``dfpjax.RecomputePolicy``.
RELU_MASK = "relu_mask"


@jax.custom_jvp
def relu_keeping_signs(x):
  """``nn.relu`` (the same values and gradients) whose backward pass keeps one bit per element:
  its mask, packed eight channels to a byte and named ``RELU_MASK``.

  ``nn.relu``'s backward pass reads a boolean mask, which XLA:CPU recomputes in the backward
  pass from the ReLU's input, and so keeps what that is computed from. The packed mask is a
  reduction, which XLA does not recompute; the output is tied to it (``dfpjax.after``), so it is
  computed in the forward pass. The last axis must be a multiple of 8."""
  return jnp.maximum(x, 0.0)


@relu_keeping_signs.defjvp
def _relu_keeping_signs_jvp(primals, tangents):
  from jax.ad_checkpoint import checkpoint_name  # pylint: disable=g-import-not-at-top
  x, = primals
  t, = tangents
  *lead, channels = x.shape
  if channels % 8:
    raise ValueError(f"relu_keeping_signs: {channels} channels, not a multiple of 8")
  bits = (x > 0).reshape(*lead, channels // 8, 8).astype(jnp.uint8)
  packed = jnp.sum(bits << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)
  packed = checkpoint_name(packed, RELU_MASK)
  per_channel = jnp.broadcast_to(packed[..., None], packed.shape + (8,)).reshape(x.shape)
  mask = ((per_channel >> jnp.tile(jnp.arange(8, dtype=jnp.uint8), channels // 8)) & 1) == 1
  return dfpjax.after(jnp.maximum(x, 0.0), per_channel), jnp.where(mask, t, 0.0)


def _block_tail(block, y, residual, features: int, last_conv_kernel):
  """The end of a residual block: its last convolution and BatchNorm, the projection of the
  residual where the shapes differ, the residual add and the ReLU (``relu_keeping_signs`` where
  the channels allow)."""
  y = block.conv(features, last_conv_kernel)(y)
  # Zero-init of the last BN scale makes each block start as the identity (Goyal et al. 2017).
  y = block.norm(scale_init=nn.initializers.zeros_init())(y)
  if residual.shape != y.shape:
    residual = block.conv(features, (1, 1), block.strides, name="conv_proj")(residual)
    residual = block.norm(name="norm_proj")(residual)
  if features % 8 == 0:  # its mask packs 8 channels to a byte
    return relu_keeping_signs(residual + y)
  return block.act(residual + y)


def block_tail(block, y, residual, features: int, last_conv_kernel=(1, 1)):
  """``_block_tail``, its output ``dfpjax.materialized``; with ``block.recompute`` a
  ``dfpjax.recompute`` region: under ``dfp_transform`` the backward pass recomputes the tail's
  convolution outputs (the BatchNorm inputs) from their INT16 operands instead of keeping them,
  and keeps the ReLU's packed mask (docs/performance.md, "Memory of the ResNet-50 DFP step").

  The block outputs are the residual stream: each feeds the next block's first convolution and
  its residual add. XLA:CPU would fuse the stream's BatchNorms, adds and ReLUs into each of those
  consumers and into each backward ReLU mask, recomputing a stage's whole stream from its start
  in every one of them; materialized, each block output is written once and read back, and with
  the packed masks the backward pass does not keep it (docs/performance.md, "The residual
  stream computed once")."""
  tail = _block_tail
  if block.recompute:
    tail = nn.remat(_block_tail, policy=dfpjax.RecomputePolicy((RELU_MASK,)),
                    static_argnums=(3, 4))
  return dfpjax.materialized(tail(block, y, residual, features, last_conv_kernel))


class ResNetBlock(nn.Module):
  """Basic two-conv residual block (ResNet-18/34)."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)
  recompute: bool = False  # see block_tail

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.act(self.norm()(y))
    return block_tail(self, y, x, self.filters, (3, 3))


class BottleneckResNetBlock(nn.Module):
  """Bottleneck block of ResNet v1.5: the stride sits on the 3x3 convolution."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)
  recompute: bool = False  # see block_tail

  @nn.compact
  def __call__(self, x):
    y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    return block_tail(self, y, x, self.filters * 4)


class ResNet(nn.Module):
  """ResNet v1.5 (He et al. 2016; stride on the 3x3 conv as in torchvision).

  BatchNorm is ``batch_sums.BatchNorm`` (``nn.BatchNorm``'s variables, a backward pass that
  keeps no cotangent alive past its layer). ``kernel_batch_sums``: BatchNorm's sums are
  ``dfpjax.channel_sums`` (``train.create_model`` turns it on in DFP runs).
  ``reproducible_batch_sums`` (over ``kernel_batch_sums``): BatchNorm and the head's bias sum
  over the batch with ``dfpjax.reproducible_sum`` (``batch_sums``), the same variables.
  ``recompute_block_tails``: each block's tail a ``dfpjax.recompute`` region (``block_tail``),
  in every stage (``True``) or in the stages given by their 0-based indices (``(0, 1)``); the
  same variables (``train.create_model`` picks the stages of a DFP run,
  ``DFP_RECOMPUTED_STAGES``).
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  dtype: Any = jnp.float32
  kernel_batch_sums: bool = False
  reproducible_batch_sums: bool = False
  recompute_block_tails: bool | Sequence[int] = False

  def recomputed_stages(self) -> frozenset[int]:
    """The stages whose blocks' tails are recompute regions (``recompute_block_tails``)."""
    stages = range(len(self.stage_sizes))
    if isinstance(self.recompute_block_tails, bool):
      return frozenset(stages if self.recompute_block_tails else ())
    chosen = frozenset(self.recompute_block_tails)
    if not chosen <= set(stages):
      raise ValueError(f"recompute_block_tails: stages {sorted(chosen - set(stages))} do not "
                       f"exist; the network's stages are {list(stages)}")
    return chosen

  @nn.compact
  def __call__(self, x, train: bool = True):
    recomputed = self.recomputed_stages()
    conv = functools.partial(same_conv, use_bias=False, dtype=self.dtype)
    reproducible = self.reproducible_batch_sums
    sums = (batch_sums.reproducible_batch_sums if reproducible else
            batch_sums.kernel_batch_sums if self.kernel_batch_sums else batch_sums.batch_sums)
    norm = functools.partial(batch_sums.BatchNorm, use_running_average=not train, sums=sums,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    x = conv(self.num_filters, (7, 7), (2, 2), name="conv_init")(jnp.asarray(x, self.dtype))
    x = norm(name="bn_init")(x)
    x = nn.relu(max_pool_2d(x, (3, 3), (2, 2), ((1, 1), (1, 1))))  # ReLU after the pool: max_pool_2d
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm,
                           act=nn.relu, recompute=i in recomputed)(x)
    x = jnp.mean(x, axis=(1, 2))
    dense = batch_sums.Dense if reproducible else nn.Dense
    x = dense(self.num_classes, dtype=self.dtype, name="head")(x)
    # Logits in float32 whatever the compute dtype: the softmax needs the range.
    return jnp.asarray(x, jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock)


# ----------------------------------------------------------------------------- GoogLeNet


class Inception(nn.Module):
  """Inception module of GoogLeNet: four branches concatenated along channels."""
  c1: int
  c3_reduce: int
  c3: int
  c5_reduce: int
  c5: int
  pool_proj: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    def conv_relu(y, features, k, name):
      return nn.relu(same_conv(features, (k, k), dtype=self.dtype, kernel_init=relu_init,
                               name=name)(y))

    b1 = conv_relu(x, self.c1, 1, "1x1")
    b2 = conv_relu(conv_relu(x, self.c3_reduce, 1, "3x3_reduce"), self.c3, 3, "3x3")
    b3 = conv_relu(conv_relu(x, self.c5_reduce, 1, "5x5_reduce"), self.c5, 5, "5x5")
    pooled = max_pool_2d(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    b4 = conv_relu(pooled, self.pool_proj, 1, "pool_proj")
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionAux(nn.Module):
  """Auxiliary classifier on inception 4a/4d (training only).

  Pools to 4x4 adaptively (as torchvision does) instead of the paper's 5x5/3 average pool, which
  gives the same 4x4 map at 224 and keeps working on small inputs.
  """
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = adaptive_avg_pool(x, 4)
    x = nn.relu(same_conv(128, (1, 1), dtype=self.dtype, kernel_init=relu_init, name="conv")(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(1024, dtype=self.dtype, kernel_init=relu_init, name="fc")(x))
    x = nn.Dropout(0.7, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_init,
                    name="classifier")(x)


# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) per module, Szegedy et al. (2015) Table 1.
INCEPTION_CONFIGS = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
  """GoogLeNet / Inception v1 as in the paper and Caffe's bvlc_googlenet: no BatchNorm, biased
  convolutions, true 5x5 convolutions, LRN in the stem. Initialised by ``relu_init``, not Caffe's
  Xavier fill (variance 1/fan-in, which halves the activations' variance at each ReLU layer), the
  classifiers by normal(0.01).

  With ``aux_logits`` the two auxiliary heads exist and, in training, the model returns
  ``(logits, (aux1, aux2))``; the paper weights their losses by 0.3.
  """
  num_classes: int
  aux_logits: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(same_conv, dtype=self.dtype, kernel_init=relu_init)
    # bvlc_googlenet's LRN: Caffe's k defaults to 1 and it divides alpha by the window size.
    lrn = functools.partial(local_response_norm, size=5, alpha=1e-4 / 5, beta=0.75, k=1.0)
    inception = lambda key, y: Inception(*INCEPTION_CONFIGS[key], dtype=self.dtype,
                                         name=f"inception_{key}")(y)
    x = conv(64, (7, 7), (2, 2), name="conv1")(jnp.asarray(x, self.dtype))
    x = lrn(nn.relu(max_pool(x, 3, 2)))  # ReLU after the pool: max_pool_2d
    x = nn.relu(conv(64, (1, 1), name="conv2_reduce")(x))
    x = nn.relu(conv(192, (3, 3), name="conv2")(x))
    x = max_pool(lrn(x), 3, 2)
    x = inception("3b", inception("3a", x))
    x = inception("4a", max_pool(x, 3, 2))
    # The heads run in training only, but must exist after an init in eval mode.
    with_aux = self.aux_logits and (train or self.is_initializing())
    aux = []
    if with_aux:
      aux.append(InceptionAux(self.num_classes, self.dtype, name="aux1")(x, train))
    x = inception("4d", inception("4c", inception("4b", x)))
    if with_aux:
      aux.append(InceptionAux(self.num_classes, self.dtype, name="aux2")(x, train))
    x = inception("4e", x)
    x = inception("5b", inception("5a", max_pool(x, 3, 2)))
    x = jnp.mean(x, axis=(1, 2))  # the paper's 7x7 average pool at 224
    x = nn.Dropout(0.4, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_init, name="fc")(x)
    logits = jnp.asarray(x, jnp.float32)
    if train and aux:
      return logits, tuple(jnp.asarray(a, jnp.float32) for a in aux)
    return logits


# ----------------------------------------------------------------------------- VGG

VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


def classifier(x, num_classes: int, hidden: int, train: bool, dtype, hidden_init=dense_init):
  """fc6/fc7 (ReLU, dropout 0.5, initialised by ``hidden_init``) and fc8 of AlexNet and VGG."""
  x = x.reshape(x.shape[0], -1)
  for name in ("fc6", "fc7"):
    x = nn.relu(nn.Dense(hidden, dtype=dtype, kernel_init=hidden_init, name=name)(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
  x = nn.Dense(num_classes, dtype=dtype, kernel_init=dense_init, name="fc8")(x)
  return jnp.asarray(x, jnp.float32)


class VGG(nn.Module):
  """VGG (Simonyan & Zisserman 2015), configuration D (VGG-16) by default.

  ``batch_norm=True`` adds BatchNorm after each convolution (torchvision's vgg16_bn); the original
  has none. ``layers`` and ``hidden`` (the width of fc6/fc7) narrow the net for small images.
  """
  num_classes: int
  layers: Sequence[Any] = VGG16_LAYERS
  batch_norm: bool = False
  hidden: int = 4096
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = jnp.asarray(x, self.dtype)
    block, index = 1, 1
    for width in self.layers:
      if width == "M":
        x = max_pool(x, 2, 2)
        block, index = block + 1, 1
        continue
      x = same_conv(width, (3, 3), dtype=self.dtype, name=f"conv{block}_{index}")(x)
      if self.batch_norm:
        x = batch_sums.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=self.dtype, name=f"bn{block}_{index}")(x)
      x = nn.relu(x)
      index += 1
    return classifier(adaptive_avg_pool(x, 7), self.num_classes, self.hidden, train, self.dtype)


# ----------------------------------------------------------------------------- AlexNet


class AlexNet(nn.Module):
  """AlexNet (Krizhevsky et al. 2012).

  Default: the original two-tower net. Its towers are grouped convolutions
  (``feature_group_count=2``) on conv2, conv4 and conv5; conv1 (each tower sees the whole image)
  and conv3 (the towers exchange features) are ungrouped; LRN (size 5, alpha 1e-4, beta 0.75,
  k 2, within each tower) follows conv1 and conv2. 60,965,224 parameters at 1000 classes:
  conv1 96*3*11*11+96, conv2 256*48*5*5+256, conv3 384*256*3*3+384, conv4 384*192*3*3+384,
  conv5 256*192*3*3+256, fc6 9216*4096+4096, fc7 4096*4096+4096, fc8 4096*1000+1000
  (the same as Caffe's bvlc_alexnet).

  ``one_tower=True``: torchvision's single-tower variant (64/192/384/256/256 channels, no LRN,
  61,100,840 parameters). ``hidden`` is the width of fc6/fc7.

  The convolutions and fc6/fc7 are initialised by ``relu_init``, fc8 by normal(0.01); the paper's
  normal(0.01) everywhere with biases of 1 needed its 90 epochs to leave chance level.
  """
  num_classes: int
  one_tower: bool = False
  hidden: int = 4096
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.one_tower:
      widths, groups, towers = (64, 192, 384, 256, 256), (1, 1, 1, 1, 1), 1
    else:
      widths, groups, towers = (96, 256, 384, 384, 256), (1, 2, 1, 2, 2), 2
    conv = functools.partial(same_conv, dtype=self.dtype, kernel_init=relu_init)
    x = jnp.asarray(x, self.dtype)
    # Padding 2 (torchvision) gives the canonical 55x55 conv1 map from a 224x224 input.
    x = nn.relu(nn.Conv(widths[0], (11, 11), (4, 4), padding=((2, 2), (2, 2)),
                        kernel_init=relu_init, dtype=self.dtype, name="conv1")(x))
    if not self.one_tower:
      x = local_response_norm(x, groups=towers)
    x = max_pool(x, 3, 2)
    x = nn.relu(conv(widths[1], (5, 5), feature_group_count=groups[1], name="conv2")(x))
    if not self.one_tower:
      x = local_response_norm(x, groups=towers)
    x = max_pool(x, 3, 2)
    for i in (2, 3, 4):
      x = nn.relu(conv(widths[i], (3, 3), feature_group_count=groups[i], name=f"conv{i + 1}")(x))
    x = max_pool(x, 3, 2)
    return classifier(adaptive_avg_pool(x, 6), self.num_classes, self.hidden, train, self.dtype,
                      hidden_init=relu_init)


# ----------------------------------------------------------------------------- registry

MODELS = {
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "googlenet": GoogLeNet,
    "vgg16": VGG,
    "alexnet": AlexNet,
}
# The models with the fields ``reproducible_batch_sums`` and ``kernel_batch_sums`` (the latter on
# in their DFP steps, train.create_model).
BATCH_SUMS_MODELS = ("resnet18", "resnet50")
# The stages whose block tails a model's DFP step recomputes (``recompute_block_tails``, set by
# train.create_model): where that saves memory for little work. ResNet-50's first two stages
# have the largest float outputs to drop and the cheapest products to recompute them with (1x1
# convolutions of 64 and 128 channels); stage 3's tails saved no XLA temporaries (b16 686 MiB
# with or without them) and stage 2's saved 31 MiB (81 at b32) for 3% of the step. ResNet-18's
# tails save none at 64x64 or 224x224 (docs/performance.md, "Recomputation where it saves
# memory").
DFP_RECOMPUTED_STAGES = {"resnet50": (0, 1)}


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds ``MODELS[name]``; kwargs are the model's fields (``dtype``, ``aux_logits``, ...)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
  if kwargs.get("reproducible_batch_sums") and name not in BATCH_SUMS_MODELS:
    raise ValueError(f"reproducible_batch_sums: model {name!r} sums over the batch in float "
                     f"(its biases or BatchNorm); only {BATCH_SUMS_MODELS} have the option")
  return MODELS[name](num_classes=num_classes, **kwargs)
