"""The examples' networks under --dfp: every convolution and dense layer of the train step is DFP,
forward and backward (as dfpjax.report shows), except the layers the config keeps in float; and a
DFP train step computes what the FP32 one does."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dfpjax
from examples.imagenet import train
from examples.imagenet.configs.base import Config
from example_variables import he_filled

SIZE, BATCH, CLASSES = 32, 8, 10  # tiny inputs; the networks keep their full widths

# A DFP step compiles several times slower than an FP32 one on CPU (mostly quantization code);
# the FAST options halve that, and a single step does not need XLA's optimizations.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class Network(NamedTuple):
  kwargs: dict
  first: str  # the first layer: its input, the image, has no gradient
  keep_float: tuple[str, ...]  # --dfp_keep_float patterns
  kept: set[str]  # the layers they match


# ResNets without recomputed block tails (ResNet-50's DFP default), whose recomputed forward
# products the report lists in the backward pass (test_report_paths_inside_recomputed_tails_are_modules).
PLAIN = {"recompute_block_tails": False}
NETWORKS = {
    "resnet18": Network(PLAIN, "ResNet/conv_init", ("*/conv_init", "*/head"),
                        {"ResNet/conv_init", "ResNet/head"}),
    "resnet50": Network(PLAIN, "ResNet/conv_init", ("*/conv_init", "*/head"),
                        {"ResNet/conv_init", "ResNet/head"}),
    # "*" also matches "/": "*/fc" keeps the auxiliary heads' fc layers as well.
    "googlenet": Network({"aux_logits": True}, "GoogLeNet/conv1", ("*/conv1", "*/fc"),
                         {"GoogLeNet/conv1", "GoogLeNet/fc", "GoogLeNet/aux1/fc",
                          "GoogLeNet/aux2/fc"}),
    "vgg16": Network({}, "VGG/conv1_1", ("*/conv1_1", "*/fc8"), {"VGG/conv1_1", "VGG/fc8"}),
    "alexnet": Network({}, "AlexNet/conv1", ("*/conv1", "*/fc8"),
                       {"AlexNet/conv1", "AlexNet/fc8"}),
}


def setup(name, **overrides):
  config = Config(model=name, model_kwargs=NETWORKS[name].kwargs, image_size=SIZE,
                  batch_size=BATCH, warmup_epochs=0, dfp=True, **overrides)
  model = train.create_model(config, CLASSES)
  abstract_state = jax.eval_shape(functools.partial(
      train.create_train_state, config, model, SIZE, train.create_learning_rate_fn(config, 10)))
  return config, model, abstract_state


def kernel_shapes(model, params) -> dict[str, tuple[int, ...]]:
  """Module path (as report writes it) -> kernel shape, for every nn.Conv and nn.Dense."""
  return {"/".join([type(model).__name__] + [k.key for k in path[:-1]]): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)
          if path[-1].key == "kernel"}


def passes(records, kernels) -> dict[str, list[str]]:
  """Module path -> its sites' passes: forward, data (input gradient), weights (its gradient)."""
  inputs = {r.path: r.shapes[0] for r in records if r.direction == "forward"}
  found = {}
  for r in records:
    kernel = kernels[r.path]
    if r.direction == "forward":
      assert kernel in r.shapes, r
      kind = "forward"
    elif r.out_shape in (kernel, kernel[::-1]):  # a dense layer's gradient may be transposed
      kind = "weights"
    else:
      assert r.out_shape == inputs[r.path], r
      kind = "data"
    found.setdefault(r.path, []).append(kind)
  return found


@pytest.mark.parametrize("name", NETWORKS)
def test_report_shows_every_layer_in_dfp_but_the_kept_ones(name):
  network = NETWORKS[name]
  config, model, state = setup(name, dfp_keep_float=network.keep_float)
  batch = {"image": jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
  records = dfpjax.report(train.train_step, state, batch, config=train.make_dfp_config(config))

  kernels = kernel_shapes(model, state.params)
  assert network.kept <= set(kernels)
  found = passes(records, kernels)
  assert set(found) == set(kernels)
  for path in kernels:
    expected = ["forward", "weights"] if path == network.first else \
        ["data", "forward", "weights"]
    assert sorted(found[path]) == expected, path
  for r in records:
    if r.path in network.kept:
      assert (r.mode, r.reason) == ("float", "path matches config.keep_float"), r
    else:
      assert (r.mode, r.reason) == ("dfp", "rewritten"), r
  num_float = sum(len(found[path]) for path in network.kept)
  assert str(records).splitlines()[-1] == \
      f"{len(records)} sites: {len(records) - num_float} dfp, {num_float} float, 0 unchanged"


def test_report_paths_inside_recomputed_tails_are_modules():
  """The recompute regions' scopes (JAX's around the recomputation, Flax's ``Block.fn``) are
  no modules: every site's path is a layer's, as ``dfp_keep_float`` globs expect."""
  config = Config(model="resnet18", image_size=SIZE, batch_size=BATCH, dfp=True,
                  model_kwargs={"recompute_block_tails": True})
  model = train.create_model(config, CLASSES)
  state = jax.eval_shape(functools.partial(
      train.create_train_state, config, model, SIZE, train.create_learning_rate_fn(config, 10)))
  batch = {"image": jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
  records = dfpjax.report(train.train_step, state, batch, config=train.make_dfp_config(config))
  assert {r.path for r in records} == set(kernel_shapes(model, state.params))


# ResNet-18 trains under --dfp in test_examples_train.py. GoogLeNet's 191 sites take minutes to
# compile in DFP on two cores: its step keeps inception 4a-5b in float (the stem, 3a, 3b and
# both auxiliary heads run in DFP).
STEP_KEEP_FLOAT = {"resnet50": (), "googlenet": ("*/inception_4*", "*/inception_5*"),
                   "vgg16": (), "alexnet": ()}


@pytest.mark.parametrize("name", STEP_KEEP_FLOAT)
def test_dfp_train_step_matches_fp32(name):
  config, _, abstract_state = setup(name, dfp_keep_float=STEP_KEEP_FLOAT[name])
  # He-initialised parameters, zero momentum: much faster to build than jitting the init.
  state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract_state).replace(
      params=he_filled(abstract_state.params), batch_stats=he_filled(abstract_state.batch_stats))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
           "label": np.arange(BATCH, dtype=np.int32) % CLASSES}

  def step(fn):
    new_state, metrics = jax.jit(fn).lower(state, batch).compile(FAST)(state, batch)
    updates = jax.tree.map(lambda new, old: new - old, new_state.params, state.params)
    return metrics["loss"], jnp.concatenate([u.ravel() for u in jax.tree.leaves(updates)])

  fp32_loss, fp32_update = step(train.train_step)
  dfp_loss, dfp_update = step(train.make_dfp_step(train.train_step, config))
  assert np.isfinite(dfp_loss) and bool(jnp.all(jnp.isfinite(dfp_update)))
  np.testing.assert_allclose(dfp_loss, fp32_loss, rtol=1e-2)
  # The SGD update points the FP32 way, roughly: at this initialisation (BatchNorm scales of 1,
  # statistics of 8 images) the gradient is chaotic. Changing ResNet-50's parameters by 1e-5 of
  # themselves moves its FP32 gradient by 14%; its DFP gradient is 44% away from FP32's.
  cosine = jnp.dot(dfp_update, fp32_update) / (
      jnp.linalg.norm(dfp_update) * jnp.linalg.norm(fp32_update))
  assert float(cosine) > 0.5
