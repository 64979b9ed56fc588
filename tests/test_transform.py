"""dfp_transform and report (docs/transform.md)."""

import functools
import logging
import os
import subprocess
import sys
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.extend import core
from jax.sharding import PartitionSpec as P

import dfpjax
from dfpjax._jax_compat import (CustomJVPTraced, HiPrimitive, VmapOf, custom_jvp3,
                                custom_vjp3, source_info_util, staged)
from dfpjax.primitives import reference_mode
from dfpjax.transform import dfp_transform, report
from dfpjax.transform.names import is_backward, module_path
from dfpjax.transform.report import _walk as walk

# Compile options. FAST: less LLVM optimization (compile time dominates these tests).
# SAME_CODEGEN: also no HLO fusion. XLA compiles the float code around a DFP product
# differently when the product is the C kernel's opaque custom call than when it is the
# inline integer code of reference_mode (other fusions, then other vectorization of float
# reductions and dots), which can change float results in the last bit; with neither,
# XLA emits every float op alike in both programs and only the DFP products differ. Nor
# YNNPACK fusions: jaxlib 0.12.1 hands float dots to YNNPACK, whose bits depend on the shape
# (a vmapped step's float head against one batch's differed in the last bit).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SAME_CODEGEN = dict(FAST, xla_disable_hlo_passes="cpu-instruction-fusion,loop-fusion,fusion",
                    xla_cpu_experimental_ynn_fusion_type="")

DOT = (((1,), (0,)), ((), ()))
STOCHASTIC = dfpjax.DFPConfig(forward=dfpjax.QuantConfig(rounding="stochastic"),
                              gradient=dfpjax.QuantConfig(rounding="stochastic"))


def compiled(fn, *args, options=FAST, **kwargs):
  """jax.jit(fn) compiled with ``options`` for these arguments."""
  return jax.jit(fn).lower(*args, **kwargs).compile(options)


def run(fn, *args, options=FAST, **kwargs):
  return compiled(fn, *args, options=options, **kwargs)(*args, **kwargs)


def assert_bitwise_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for path_a, x, y in zip(jax.tree_util.tree_leaves_with_path(a), leaves_a, leaves_b):
    assert np.asarray(x).dtype == np.asarray(y).dtype, path_a[0]
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path_a[0])


def float_sites(closed):
  """(primitive, path, backward) of the floating dot_general/conv sites left in a jaxpr."""
  return [(eqn.primitive.name, module_path(stack), is_backward(stack))
          for eqn, stack, _ in walk(closed.jaxpr)
          if eqn.primitive.name in ("dot_general", "conv_general_dilated")
          and all(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.invars)]


def count(closed, name):
  return sum(eqn.primitive.name == name for eqn, *_ in walk(closed.jaxpr))


# ---------------------------------------------------------------------------------------
# An MLP.
# ---------------------------------------------------------------------------------------


def mlp_init(key, sizes=(5, 16, 16, 3)):
  keys = jax.random.split(key, len(sizes))
  return [(jax.random.normal(k, (m, n)) / np.sqrt(m), jnp.zeros(n))
          for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def mlp(params, x):
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


def mlp_loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


@pytest.fixture(scope="module")
def mlp_data():
  params = mlp_init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (8, 5))
  y = jnp.arange(8) % 3
  return params, x, y


def test_mlp_every_dot_is_rewritten(mlp_data):
  params, x, _ = mlp_data
  closed = jax.make_jaxpr(dfp_transform(mlp))(params, x)
  assert float_sites(closed) == []
  assert count(closed, "dfp_dot_general") == 3
  np.testing.assert_allclose(run(dfp_transform(mlp), params, x), mlp(params, x), rtol=1e-3,
                             atol=1e-3)


def test_mlp_grad_commutes_bitwise(mlp_data):
  # Spec section 4: a DFP op's backward products equal DFP products of the cotangent, so
  # differentiating the transformed function equals transforming the gradient.
  params, x, y = mlp_data
  g1 = run(jax.grad(dfp_transform(mlp_loss)), params, x, y)
  g2 = run(dfp_transform(jax.grad(mlp_loss)), params, x, y)
  assert_bitwise_equal(g1, g2)
  closed = jax.make_jaxpr(jax.grad(dfp_transform(mlp_loss)))(params, x, y)
  assert float_sites(closed) == []


def test_vmap_matches_per_example(mlp_data):
  params, x, _ = mlp_data
  xs = jax.random.normal(jax.random.key(2), (3, 4, 5))
  f = dfp_transform(mlp)
  batched = run(jax.vmap(f, in_axes=(None, 0)), params, xs)
  single = compiled(f, params, xs[0])
  assert_bitwise_equal(batched, jnp.stack([single(params, xi) for xi in xs]))


def test_jit_compositions_agree(mlp_data):
  params, x, _ = mlp_data
  # One small dot: eager evaluation compiles every operation on its own.
  w, x = params[0][0], x[:2]
  f = lambda w, x: x @ w
  eager = dfp_transform(f)(w, x)
  assert_bitwise_equal(jax.jit(dfp_transform(f))(w, x), eager)
  inner = dfp_transform(jax.jit(f))
  assert float_sites(jax.make_jaxpr(inner)(w, x)) == []
  assert_bitwise_equal(inner(w, x), eager)


def test_eager_calls_are_traced_once_per_signature(mlp_data):
  params, x, _ = mlp_data
  traces = []

  def f(w, x):
    traces.append(x.shape)
    return x @ w

  w = params[0][0]
  g = dfp_transform(f)
  g(w, x)
  g(w, x + 1.0)
  assert traces == [(8, 5)]
  g(w, x[:4])
  assert traces == [(8, 5), (4, 5)]
  assert g.dfp_transform.num_traces == 2
  jax.jit(g)(w, x)   # traced with tracers of the same types: still cached
  assert g.dfp_transform.num_traces == 2


def test_static_arguments():
  traces = []

  def f(x, w, *, transpose=False, scale=1.0):
    traces.append((transpose, scale))
    return (x @ (w.T if transpose else w)) * scale

  x, w = jnp.ones((2, 3)), jnp.ones((3, 3))
  g = dfp_transform(f, static_argnames="transpose")
  assert_bitwise_equal(g(x, w, transpose=True), g(x, w, transpose=True))
  g(x, w, transpose=False, scale=1.0)
  g(x, w, transpose=False, scale=2.0)   # scale is traced: no retrace
  assert [t for t, _ in traces] == [True, False]
  h = dfp_transform(lambda x, n: x @ jnp.eye(3) * n, static_argnums=1)
  assert h(x, 2).shape == (2, 3)
  with pytest.raises(ValueError, match="hashable"):
    h(x, [2])
  with pytest.raises(TypeError, match="static_argnums"):
    dfp_transform(lambda x, s: x @ x.T)(x, "not an array")


def test_integer_and_excluded_ops_are_left_alone():
  def f(a, b, x, w):
    return lax.dot(a, b, preferred_element_type=jnp.int32), x @ w

  args = (jnp.ones((2, 3), jnp.int16), jnp.ones((3, 2), jnp.int16), jnp.ones((2, 3)),
          jnp.ones((3, 2)))
  closed = jax.make_jaxpr(dfp_transform(f))(*args)
  ints = [e for e, *_ in walk(closed.jaxpr) if e.primitive.name == "dot_general"
          and e.invars[0].aval.dtype == jnp.int16]
  assert len(ints) == 1 and float_sites(closed) == []
  records = report(f, *args)
  assert [(r.mode, r.index) for r in records] == [("unchanged", None), ("dfp", 0)]
  only_conv = dfpjax.DFPConfig(ops=("conv_general_dilated",))
  assert len(float_sites(jax.make_jaxpr(dfp_transform(f, only_conv))(*args))) == 1
  assert report(f, *args, config=only_conv)[1].reason == "dot_general is not in config.ops"


def test_transform_takes_a_function_and_a_key_only_where_it_rounds_stochastically():
  with pytest.raises(TypeError, match="dfp_transform: fn must be a function, got int"):
    dfp_transform(3)
  with pytest.raises(TypeError, match="dfp_key is given, but the config rounds to nearest"):
    dfp_transform(lambda x: x @ x)(jnp.ones((2, 2)), dfp_key=jax.random.key(0))


def test_outputs_are_arrays_as_jit_returns_them():
  f = lambda x, n: (x @ x.T, 3, 2.5, np.ones(2, np.float32), n)
  args = (jnp.ones((2, 2)), np.arange(3, dtype=np.int32))
  outs, jitted = dfp_transform(f)(*args), jax.jit(f)(*args)
  assert all(type(o) is type(j) for o, j in zip(outs, jitted)), [type(o) for o in outs]
  for o, j in zip(outs, jitted):
    assert o.dtype == j.dtype and o.weak_type == j.weak_type
    np.testing.assert_array_equal(o, j)


def test_float64_site_raises_clearly():
  with jax.enable_x64(True):
    x = jnp.ones((2, 2), jnp.float64)
    with pytest.raises(TypeError, match="keep_float"):
      dfp_transform(lambda x: x @ x)(x)


# ---------------------------------------------------------------------------------------
# Higher-order primitives.
# ---------------------------------------------------------------------------------------


def control_flow(w, xs):
  def body(c, x):
    return jnp.tanh(c @ w + x), (c @ w).sum()
  c, ys = lax.scan(body, xs[0], xs)
  c = lax.fori_loop(0, 2, lambda i, c: jnp.tanh(c @ w), c)       # a scan
  c = lax.cond(c.sum() > 0, lambda c: c @ w, lambda c: -c, c)
  c = jax.checkpoint(lambda c: jnp.sin(c @ w), prevent_cse=False)(c)
  c = jax.jit(lambda c: c @ w.T)(c)
  c = jax.named_call(lambda c: c @ w, name="named")(c)
  return c.sum() + ys.sum()


def while_loop(w, x):
  return lax.while_loop(lambda c: c[1] < 3, lambda c: (jnp.tanh(c[0] @ w), c[1] + 1),
                        (x, 0))[0]


@pytest.fixture(scope="module")
def loop_data():
  w = jax.random.normal(jax.random.key(3), (5, 5)) * 0.5
  xs = jax.random.normal(jax.random.key(4), (3, 5))
  return w, xs


def test_control_flow_is_rewritten(loop_data):
  w, xs = loop_data
  for fn in (control_flow, jax.grad(control_flow), while_loop):
    closed = jax.make_jaxpr(dfp_transform(fn))(w, xs)
    assert float_sites(closed) == [], fn
  np.testing.assert_allclose(run(dfp_transform(control_flow), w, xs), control_flow(w, xs),
                             rtol=1e-3)
  np.testing.assert_allclose(run(dfp_transform(while_loop), w, xs), while_loop(w, xs),
                             atol=1e-3)


def test_control_flow_grad_commutes_bitwise(loop_data):
  w, xs = loop_data
  assert_bitwise_equal(run(jax.grad(dfp_transform(control_flow)), w, xs),
                       run(dfp_transform(jax.grad(control_flow)), w, xs))


def test_eager_calls_reuse_the_rewritten_sub_jaxprs(loop_data, caplog):
  # Freshly rewritten sub-jaxprs at every call would make JAX compile each jit, scan, while,
  # cond and remat in them again.
  w, xs = loop_data
  key = jax.random.key(0)
  for fn in (control_flow, while_loop):
    for config, kwargs in ((None, {}), (STOCHASTIC, {"dfp_key": key})):
      f = functools.partial(dfp_transform(fn, config), **kwargs)
      first, again = (jax.make_jaxpr(f)(w, xs).jaxpr.eqns for _ in range(2))
      pairs = [(a, b) for a, b in zip(first, again)
               if a.primitive.name in ("jit", "scan", "while", "cond", "remat2")]
      assert pairs and all(x is y for a, b in pairs for x, y in
                           zip(core.jaxprs_in_params(a.params), core.jaxprs_in_params(b.params)))
  # Eagerly, with stochastic rounding: round-to-nearest quantization has a lax.cond of its
  # own (dfpjax.numerics), which JAX compiles at every eager call.
  f = dfp_transform(while_loop, STOCHASTIC)
  first = f(w, xs, dfp_key=key)
  caplog.clear()
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    assert_bitwise_equal(f(w, xs, dfp_key=key), first)
  assert not [r for r in caplog.records if r.getMessage().startswith("Compiling")]
  # The reused jaxprs take the key as an operand: another key gives a fresh trace's bits.
  other = f(w, xs, dfp_key=jax.random.key(1))
  assert not np.array_equal(other, first)
  assert_bitwise_equal(other, dfp_transform(while_loop, STOCHASTIC)(w, xs,
                                                                    dfp_key=jax.random.key(1)))
  assert [r.mode for r in report(f, w, xs)] == ["dfp"]  # report still meets the loop's site


def test_remat_keeps_policy():
  policy = jax.checkpoint_policies.nothing_saveable
  f = jax.checkpoint(lambda w, x: jnp.sin(x @ w).sum(), policy=policy, prevent_cse=False)
  closed = jax.make_jaxpr(dfp_transform(f))(jnp.ones((3, 3)), jnp.ones((2, 3)))
  (remat,) = [e for e, *_ in walk(closed.jaxpr) if e.primitive.name == "remat2"]
  assert remat.params["policy"] is policy and remat.params["prevent_cse"] is False


def _half_fwd(x, w):
  return x @ w, (x, w)


def _half_bwd(res, g):
  x, w = res
  return 0.5 * (g @ w.T), x.T @ g   # deliberately not the true gradient of x


def make_half_grad_matmul(hijax_form: bool = False):
  """x @ w with a user's custom_vjp, in the form jax_custom_vjp3 = hijax_form picks: a
  custom_vjp_call equation, or a call_hi_primitive (hijax) one."""
  @staged(jax.custom_vjp, hijax_form)
  def half_grad_matmul(x, w):
    return x @ w
  half_grad_matmul.defvjp(_half_fwd, _half_bwd)
  return half_grad_matmul


half_grad_matmul = make_half_grad_matmul()
CUSTOM_VJP_FORMS = {"classic": False, "vjp3": True}


def _cubed_jvp(primals, tangents):
  (x, w), (dx, dw) = primals, tangents
  y = x @ w
  return y ** 3, 3 * y ** 2 * (dx @ w + x @ dw)


def make_cubed_matmul(hijax_form: bool = False):
  """(x @ w)**3 with a user's custom_jvp, in the form jax_custom_jvp3 = hijax_form picks (the
  flag is new in JAX 0.11): a custom_jvp_call equation, or a call_hi_primitive (hijax) one."""
  @staged(jax.custom_jvp, hijax_form)
  def cubed_matmul(x, w):
    return (x @ w) ** 3
  cubed_matmul.defjvp(_cubed_jvp)
  return cubed_matmul


cubed_matmul = make_cubed_matmul()  # the classic form: jax_custom_jvp3 is off by default


@pytest.mark.parametrize("form", CUSTOM_VJP_FORMS)
def test_custom_vjp_keeps_the_users_rule(form):
  matmul = make_half_grad_matmul(CUSTOM_VJP_FORMS[form])
  x = jax.random.normal(jax.random.key(5), (4, 3))
  w = jax.random.normal(jax.random.key(6), (3, 2))
  f = lambda x, w: matmul(x, w).sum()
  closed = jax.make_jaxpr(dfp_transform(f))(x, w)
  assert float_sites(closed) == [] and count(closed, "dfp_dot_general") == 1
  dx, dw = run(jax.grad(dfp_transform(f), argnums=(0, 1)), x, w)
  ref_dx, ref_dw = jax.grad(f, argnums=(0, 1))(x, w)
  np.testing.assert_allclose(dx, ref_dx, atol=1e-3)     # half the true gradient
  np.testing.assert_allclose(dw, ref_dw, atol=1e-3)
  closed = jax.make_jaxpr(jax.grad(dfp_transform(f)))(x, w)
  assert float_sites(closed) == []                       # the bwd rule's dots too
  assert_bitwise_equal(
      (dx, dw), run(dfp_transform(jax.grad(f, argnums=(0, 1))), x, w))
  # vmap of the transformed function quantizes each example on its own. So does the
  # transformed vmap under jax_custom_vjp3 before JAX 0.12, which keeps a vmapped custom_vjp
  # a vmap of its primal (VmapOf); the classic form, and the hijax one from 0.12 on, batch
  # the primal's jaxpr (one exponent per batch).
  xs = jnp.stack([x, -2 * x])
  per_example = jnp.stack([run(dfp_transform(f), xi, w) for xi in xs])
  assert_bitwise_equal(run(jax.vmap(dfp_transform(f), (0, None)), xs, w), per_example)
  batched = jax.vmap(f, (0, None))
  assert float_sites(jax.make_jaxpr(dfp_transform(batched))(xs, w)) == []
  if form == "vjp3" and VmapOf is not None:
    assert_bitwise_equal(run(dfp_transform(batched), xs, w), per_example)
  elif form == "vjp3":
    classic = jax.vmap(lambda x, w: half_grad_matmul(x, w).sum(), (0, None))
    assert_bitwise_equal(run(dfp_transform(batched), xs, w), run(dfp_transform(classic), xs, w))


@pytest.mark.skipif(not hasattr(jax.custom_vjp, "defvjp_with_logs"),
                    reason="bwd rules that log (defvjp_with_logs) are new in JAX 0.11")
@pytest.mark.parametrize("form", CUSTOM_VJP_FORMS)
def test_custom_vjp_logs_pass_through(form):
  @staged(jax.custom_vjp, CUSTOM_VJP_FORMS[form])
  def matmul(x, w):
    return x @ w
  matmul.defvjp_with_logs(_half_fwd, lambda res, g: (_half_bwd(res, g), {"g": g.sum()}))
  x = jax.random.normal(jax.random.key(5), (4, 3))
  w = jax.random.normal(jax.random.key(6), (3, 2))
  out, f_vjp = jax.vjp(dfp_transform(matmul), x, w)
  g = jnp.ones_like(out)
  cts, logs = f_vjp.with_logs(g)
  assert_bitwise_equal(logs, {"g": g.sum()})
  assert_bitwise_equal(cts, f_vjp(g))
  _, ref_vjp = jax.vjp(matmul, x, w)
  np.testing.assert_allclose(cts[0], ref_vjp(g)[0], atol=1e-3)  # the user's (half) rule


def _hijax_scaled_matmuls():
  """Two custom_vjp forms of 2 * (x @ w) as jax_custom_vjp3 stages them, whose fwd rules call the
  function itself (a hijax equation inside the rule): one with a static argument, one
  with symbolic zeros. Neither gives w a gradient."""
  @functools.partial(staged(jax.custom_vjp, True), nondiff_argnums=(2,))
  def static_scale(x, w, scale):
    return scale * (x @ w)
  static_scale.defvjp(lambda x, w, scale: (static_scale(x, w, scale), w),
                      lambda scale, w, g: (scale * (g @ w.T), None))

  @staged(jax.custom_vjp, True)
  def symbolic(x, w):
    return 2.0 * (x @ w)

  def fwd(x, w):
    assert x.perturbed and not w.perturbed
    return symbolic(x.value, w.value), w.value
  symbolic.defvjp(fwd, lambda w, g: (2.0 * (g @ w.T), None), symbolic_zeros=True)
  return (lambda x, w: static_scale(x, w, 2.0)), symbolic


@pytest.mark.parametrize("which", [0, 1], ids=["static_args", "symbolic_zeros"])
def test_hijax_custom_vjp_rules_are_rewritten(which):
  matmul = _hijax_scaled_matmuls()[which]
  x = jax.random.normal(jax.random.key(5), (4, 3))
  w = jax.random.normal(jax.random.key(6), (3, 2))
  f = lambda x: matmul(x, w).sum()
  closed = jax.make_jaxpr(dfp_transform(f))(x)
  assert float_sites(closed) == [] and count(closed, "dfp_dot_general") == 1
  grad = jax.make_jaxpr(jax.grad(dfp_transform(f)))(x)
  assert float_sites(grad) == [] and count(grad, "dfp_dot_general") == 2
  dx = run(jax.grad(dfp_transform(f)), x)
  np.testing.assert_allclose(dx, jax.grad(f)(x), rtol=1e-3)
  assert_bitwise_equal(dx, run(dfp_transform(jax.grad(f)), x))
  for config in (None, STOCHASTIC):
    records = report(jax.grad(f), x, config=config)
    assert [(r.direction, r.mode) for r in records] == [("forward", "dfp"), ("backward", "dfp")]


def test_custom_jvp_keeps_the_users_rule():
  x = jax.random.normal(jax.random.key(5), (4, 3))
  w = jax.random.normal(jax.random.key(6), (3, 2))
  f = lambda x, w: cubed_matmul(x, w).sum()
  closed = jax.make_jaxpr(jax.grad(dfp_transform(f)))(x, w)
  # The primal product is DFP; the tangent's products stay float (and linear): a DFP
  # product of a tangent could not be transposed.
  assert count(closed, "dfp_dot_general") == 1
  assert [backward for _, _, backward in float_sites(closed)] == [False, True]
  np.testing.assert_allclose(run(jax.grad(dfp_transform(f)), x, w), jax.grad(f)(x, w),
                             rtol=1e-2)
  records = report(jax.grad(f), x, w)
  assert [r.mode for r in records] == ["dfp"] * 3   # grad(f) has no custom_jvp left


def _custom_jvp_matmuls(hijax_form: bool):
  """Three custom_jvp products of x and w, staged as jax_custom_jvp3 = hijax_form stages them
  (the flag is new in JAX 0.11): the cubed product, one with a static (nondiff) scale, one
  whose rule takes symbolic zeros."""
  cubed = make_cubed_matmul(hijax_form)

  @functools.partial(staged(jax.custom_jvp, hijax_form), nondiff_argnums=(2,))
  def scaled(x, w, scale):
    return scale * jnp.tanh(x @ w)

  @scaled.defjvp
  def _(scale, primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    y = jnp.tanh(x @ w)
    return scale * y, scale * (1 - y * y) * (dx @ w + x @ dw)

  @staged(jax.custom_jvp, hijax_form)
  def symbolic(x, w):
    return jnp.sin(x @ w)

  def symbolic_jvp(primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    assert isinstance(dw, jax.custom_derivatives.SymbolicZero)  # only x is differentiated
    return jnp.sin(x @ w), jnp.cos(x @ w) * (dx @ w)
  symbolic.defjvp(symbolic_jvp, symbolic_zeros=True)
  return [lambda x, w: cubed(x, w).sum(), lambda x, w: scaled(x, w, 0.5).sum(),
          lambda x, w: symbolic(x, w).sum()]


@pytest.mark.skipif(CustomJVPTraced is None,
                    reason="custom_jvp as a hijax primitive (jax_custom_jvp3) is new in JAX 0.11")
@pytest.mark.parametrize("which", [0, 1, 2], ids=["plain", "static_args", "symbolic_zeros"])
def test_hijax_custom_jvp_is_rewritten_as_the_classic_one(which):
  f = _custom_jvp_matmuls(True)[which]
  classic = _custom_jvp_matmuls(False)[which]
  x = jax.random.normal(jax.random.key(5), (4, 3))
  w = jax.random.normal(jax.random.key(6), (3, 2))
  closed = jax.make_jaxpr(dfp_transform(f))(x, w)
  assert count(closed, "call_hi_primitive") == 1      # still the user's hijax custom_jvp
  assert float_sites(closed) == [] and count(closed, "dfp_dot_general") == 1
  # The primal and the user's rule are rewritten with the same sites and keys as the
  # classic custom_jvp's: the same bits, in both orders of grad and the transform, also with
  # stochastic rounding.
  for fn in (dfp_transform, lambda g: jax.grad(dfp_transform(g)),
             lambda g: dfp_transform(jax.grad(g))):
    assert_bitwise_equal(run(fn(f), x, w), run(fn(classic), x, w))
  key = jax.random.key(3)
  assert_bitwise_equal(run(jax.grad(dfp_transform(f, STOCHASTIC)), x, w, dfp_key=key),
                       run(jax.grad(dfp_transform(classic, STOCHASTIC)), x, w, dfp_key=key))
  # The rule's tangent products stay float, as in the classic form.
  grad = jax.make_jaxpr(jax.grad(dfp_transform(f)))(x, w)
  assert float_sites(grad) and {backward for _, _, backward in float_sites(grad)} == {True}
  np.testing.assert_allclose(run(jax.grad(dfp_transform(f)), x, w), jax.grad(f)(x, w),
                             rtol=1e-2, atol=1e-3)
  # A vmapped hijax custom_jvp stays a vmap of its primal before JAX 0.12 (VmapOf): each
  # example quantized alone. From 0.12 on its primal's jaxpr is batched, as the classic
  # form's: one exponent per batch.
  xs = jnp.stack([x, -2 * x])
  batched = run(dfp_transform(jax.vmap(f, (0, None))), xs, w)
  if VmapOf is not None:
    assert_bitwise_equal(batched, jnp.stack([run(dfp_transform(f), xi, w) for xi in xs]))
  else:
    assert_bitwise_equal(batched, run(dfp_transform(jax.vmap(classic, (0, None))), xs, w))
  assert [r.mode for r in report(f, x, w)] == ["dfp"]


def test_shard_map_is_rewritten():
  mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

  def f(x, w):
    return jax.shard_map(lambda x, w: lax.psum(x @ w, "d"), mesh=mesh,
                         in_specs=(P("d"), P()), out_specs=P(), check_vma=True)(x, w)

  x, w = jnp.ones((4, 3)), jnp.full((3, 2), 0.5)
  for config, kwargs in ((None, {}), (STOCHASTIC, {"dfp_key": jax.random.key(0)})):
    g = dfp_transform(f, config)
    assert float_sites(jax.make_jaxpr(functools.partial(g, **kwargs))(x, w)) == []
    np.testing.assert_array_equal(run(g, x, w, **kwargs), f(x, w))


_TWO_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
import dfpjax
from dfpjax.transform import dfp_transform

assert jax.device_count() == 2
x = jax.random.normal(jax.random.key(0), (4, 3))
w = jax.random.normal(jax.random.key(1), (3, 2))
dfp = lambda x, w: jnp.tanh(dfpjax.dfp_dot_general(x, w, (((1,), (0,)), ((), ()))))

# shard_map with check_vma: w is invariant, the product varies over 'd'; each device
# quantizes its own block of x.
mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
f = jax.shard_map(lambda x, w: lax.psum(jnp.tanh(x @ w), "d"), mesh=mesh,
                  in_specs=(P("d"), P()), out_specs=P(), check_vma=True)
assert np.array_equal(dfp_transform(f)(x, w), dfp(x[:2], w) + dfp(x[2:], w))
loss = lambda x, w: f(x, w).sum()
g1 = jax.jit(jax.grad(dfp_transform(loss), argnums=(0, 1)))(x, w)
g2 = jax.jit(dfp_transform(jax.grad(loss, argnums=(0, 1))))(x, w)
ref = jax.grad(lambda x, w: (dfp(x[:2], w) + dfp(x[2:], w)).sum(), argnums=(0, 1))(x, w)
for a, b, r in zip(g1, g2, ref):
  assert np.array_equal(a, b) and np.array_equal(a, r)  # w's gradient summed over 'd'

# pmap is jit(shard_map(...)).
xs = x.reshape(2, 2, 3)
pmapped = dfp_transform(jax.pmap(lambda x, w: jnp.tanh(x @ w), in_axes=(0, None)))
assert np.array_equal(pmapped(xs, w), jnp.stack([dfp(xs[0], w), dfp(xs[1], w)]))
print("ok")
"""


def test_shard_map_and_pmap_on_two_devices():
  # A fresh process: JAX fixes the number of CPU devices when it starts.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  done = subprocess.run([sys.executable, "-c", _TWO_DEVICES], env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# Stochastic rounding keys.
# ---------------------------------------------------------------------------------------


def test_stochastic_rounding_needs_and_uses_dfp_key(loop_data):
  w, xs = loop_data
  f = dfp_transform(control_flow, STOCHASTIC)
  with pytest.raises(ValueError, match="dfp_key"):
    f(w, xs)
  g = compiled(f, w, xs, dfp_key=jax.random.key(0))
  a = g(w, xs, dfp_key=jax.random.key(0))
  assert_bitwise_equal(a, g(w, xs, dfp_key=jax.random.key(0)))
  assert not np.array_equal(a, g(w, xs, dfp_key=jax.random.key(1)))


def test_stochastic_keys_differ_per_iteration():
  # Every iteration multiplies the same operands: only the iteration's key differs.
  x = jax.random.normal(jax.random.key(7), (4, 8))
  w = jax.random.normal(jax.random.key(8), (8, 8))
  scanned = lambda x, w: lax.scan(lambda c, _: (c, x @ w), 0.0, None, length=4)[1]
  ys = run(dfp_transform(scanned, STOCHASTIC), x, w, dfp_key=jax.random.key(0))
  assert all(not np.array_equal(ys[0], y) for y in ys[1:])

  def looped(x, w):
    def body(c):
      i, acc = c
      return i + 1, acc.at[i].set(x @ w)
    return lax.while_loop(lambda c: c[0] < 3, body, (0, jnp.zeros((3, 4, 8))))[1]
  ys = run(dfp_transform(looped, STOCHASTIC), x, w, dfp_key=jax.random.key(0))
  assert all(not np.array_equal(ys[0], y) for y in ys[1:])


def test_the_dfp_ops_stay_classic_equations_under_the_opt_in_flags():
  """With jax_custom_jvp3 and jax_custom_vjp3 on where they are called (JAX 0.12 reads the flags
  at each call, 0.10 and 0.11 where a function is defined), a DFP op is still a
  custom_jvp_call and report's site wrapper a custom_vjp_call: the transform, report and
  their gradients find the DFP products by them."""
  x = jax.random.normal(jax.random.key(5), (4, 3))
  w = jax.random.normal(jax.random.key(6), (3, 2))
  f = lambda x, w: (x @ w).sum()
  dot = lambda x, w: dfpjax.dfp_dot_general(x, w, (((1,), (0,)), ((), ()))).sum()
  with custom_jvp3(True), custom_vjp3(True):
    names = {eqn.primitive.name for eqn, *_ in walk(jax.make_jaxpr(jax.grad(dot))(x, w).jaxpr)}
    records = report(jax.grad(f, argnums=(0, 1)), x, w)
    grad = jax.make_jaxpr(jax.grad(dfp_transform(f), argnums=(0, 1)))(x, w)
  assert "custom_jvp_call" in names and "call_hi_primitive" not in names
  assert [(r.direction, r.mode) for r in records] == [("forward", "dfp"), ("backward", "dfp"),
                                                      ("backward", "dfp")]
  assert float_sites(grad) == []
  assert count(grad, "dfp_dot_general") == 1 and count(grad, "dfp_cotangent") == 1


def test_stochastic_keys_reach_lazily_traced_rules():
  # Custom rules are traced when AD needs them, after the jit trace that owned the key.
  x = jax.random.normal(jax.random.key(5), (4, 3))
  w = jax.random.normal(jax.random.key(6), (3, 2))
  hijax_half_grad_matmul = make_half_grad_matmul(True)
  for user_fn in (half_grad_matmul, hijax_half_grad_matmul, cubed_matmul):
    f = dfp_transform(lambda x, w: user_fn(x, w).sum(), STOCHASTIC)
    key = jax.random.key(0)
    late = run(jax.grad(jax.jit(f)), x, w, dfp_key=key)   # rules traced after the jit trace
    assert_bitwise_equal(late, run(jax.grad(f), x, w, dfp_key=key))


# ---------------------------------------------------------------------------------------
# Errors for what is not supported.
# ---------------------------------------------------------------------------------------

fake_call_p = core.Primitive("fake_call")
fake_call_p.multiple_results = True
fake_call_p.def_impl(lambda *args, jaxpr: core.jaxpr_as_fun(jaxpr)(*args))
fake_call_p.def_abstract_eval(lambda *avals, jaxpr: jaxpr.out_avals)


def test_unknown_higher_order_primitive_raises():
  def f(x):
    return fake_call_p.bind(x, jaxpr=jax.make_jaxpr(lambda x: x @ x)(x))[0]
  x = jnp.ones((2, 2))
  assert_bitwise_equal(f(x), x @ x)
  with pytest.raises(NotImplementedError, match="'fake_call'"):
    dfp_transform(f)(x)
  with pytest.raises(NotImplementedError, match="'fake_call'"):
    report(f, x)


def test_unknown_hijax_primitive_raises():
  class Square(HiPrimitive):
    def __init__(self, aval):
      self.in_avals, self.out_aval, self.params = (aval,), aval, {}
      super().__init__()

    def expand(self, x):
      return x @ x

  x = jnp.ones((2, 2))
  f = lambda x: Square(jax.typeof(x))(x)
  assert_bitwise_equal(jax.jit(f)(x), x @ x)
  with pytest.raises(NotImplementedError, match="hijax primitive Square"):
    dfp_transform(f)(x)


@pytest.mark.skipif(not hasattr(jax.custom_vjp, "defremat"),
                    reason="defremat and defvjp_with_accums are new in JAX 0.12")
@pytest.mark.parametrize("define", ["defremat", "defvjp_with_accums"])
def test_hijax_custom_vjp_rules_it_cannot_rewrite_raise(define):
  @staged(jax.custom_vjp, True)
  def remat_matmul(x, w):
    return x @ w

  if define == "defremat":
    remat_matmul.defremat(lambda x, w: (x @ w, None), lambda _, x, w: (x @ w, (x, w)),
                          _half_bwd)
  else:
    def bwd(res, g, x_accum, w_accum):
      dx, dw = _half_bwd(res, g)
      x_accum.accum(dx)
      w_accum.accum(dw)
    remat_matmul.defvjp_with_accums(_half_fwd, bwd)
  x, w = jnp.ones((4, 3)), jnp.ones((3, 2))
  jax.grad(lambda x: remat_matmul(x, w).sum())(x)   # a valid custom_vjp
  with pytest.raises(NotImplementedError, match=f"'remat_matmul'.*{define}"):
    dfp_transform(remat_matmul)(x, w)


def test_combiner_jaxprs_pass_through():
  def f(x, w):
    y = x @ w
    y = y.at[jnp.array([0, 0])].add(1.0)                      # scatter-add's update_jaxpr
    return lax.reduce(y, 0.0, lambda a, b: a + b, (0,))       # reduce's jaxpr
  x, w = jnp.ones((2, 3)), jnp.ones((3, 2))
  np.testing.assert_array_equal(run(dfp_transform(f), x, w), f(x, w))


# ---------------------------------------------------------------------------------------
# A Flax model trained with optax.
# ---------------------------------------------------------------------------------------


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.relu(nn.Dense(x.shape[-1], name="fc")(x)), None


class UserDense(nn.Module):
  features: int
  matmul: Callable

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    return self.matmul(x, w)


class Net(nn.Module):
  matmul: Callable = half_grad_matmul   # with a user's custom_vjp

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)(name="blocks")(x, None)
    x = nn.remat(UserDense)(16, self.matmul, name="user")(x)
    gate = self.param("gate", nn.initializers.lecun_normal(), (16, 16))
    x = lax.cond(x.mean() > 0, lambda h: jnp.tanh(h @ gate), lambda h: -h, x)
    return nn.Dense(4, name="head")(x)


KEEP_HEAD = dfpjax.DFPConfig(keep_float=("*/head",))


def make_net(matmul=half_grad_matmul):
  model, tx = Net(matmul), optax.adam(1e-2)
  x = jax.random.normal(jax.random.key(10), (16, 6))
  y = jnp.arange(16) % 4
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(11), x, train=False)
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

  def loss_fn(params, batch_stats, x, y, key):
    logits, updated = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                  train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updated

  def step(state, x, y, key):
    params, batch_stats, opt_state = state
    (loss, updated), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), updated["batch_stats"], opt_state), loss

  return dict(state=state, x=x, y=y, key=jax.random.key(12), step=step, loss_fn=loss_fn)


@pytest.fixture(scope="module", params=CUSTOM_VJP_FORMS)
def net(request):
  return make_net(make_half_grad_matmul(CUSTOM_VJP_FORMS[request.param]))


def test_net_train_step_leaves_only_excluded_sites_in_float(net):
  args = (net["state"], net["x"], net["y"], net["key"])
  closed = jax.make_jaxpr(jax.jit(dfp_transform(net["step"], KEEP_HEAD)))(*args)
  left = float_sites(closed)
  assert sorted(left) == [("dot_general", "Net/head", False),
                          ("dot_general", "Net/head", True), ("dot_general", "Net/head", True)]
  # Forward: blocks/fc, user, the cond branch; backward: two products each (for user,
  # those of its custom_vjp rule).
  assert count(closed, "dfp_dot_general") == 9


def test_net_train_step_matches_reference_and_trains(net):
  args = (net["state"], net["x"], net["y"], net["key"])
  step = compiled(dfp_transform(net["step"], KEEP_HEAD), *args, options=SAME_CODEGEN)
  out = step(*args)
  with reference_mode():
    ref = compiled(dfp_transform(net["step"], KEEP_HEAD), *args, options=SAME_CODEGEN)(*args)
  assert_bitwise_equal(out, ref)
  state, losses = net["state"], []
  for i in range(6):
    state, loss = step(state, net["x"], net["y"], jax.random.fold_in(net["key"], i))
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses


def test_net_grad_commutes_bitwise(net):
  params, batch_stats, _ = net["state"]
  loss = lambda p: net["loss_fn"](p, batch_stats, net["x"], net["y"], net["key"])[0]
  g1 = run(jax.grad(dfp_transform(loss)), params)
  g2 = run(dfp_transform(jax.grad(loss)), params)
  assert_bitwise_equal(g1, g2)


def test_net_train_step_vmaps_over_batches(net):
  # Three mini-batches at once, each with its own BatchNorm statistics, DFP exponents and
  # cond predicate: equal to stepping each alone.
  xs = jax.random.normal(jax.random.key(13), (3, *net["x"].shape)) * jnp.array([1., -1., 3.])[:, None, None]
  ys = jnp.stack([jnp.roll(net["y"], i) for i in range(3)])
  step = dfp_transform(net["step"], KEEP_HEAD)
  batched = run(jax.vmap(step, in_axes=(None, 0, 0, None)), net["state"], xs, ys, net["key"],
                options=SAME_CODEGEN)
  single = compiled(step, net["state"], xs[0], ys[0], net["key"], options=SAME_CODEGEN)
  per_batch = [single(net["state"], x, y, net["key"]) for x, y in zip(xs, ys)]
  assert_bitwise_equal(batched, jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_batch))


def test_net_report(net):
  args = (net["state"], net["x"], net["y"], net["key"])
  records = report(dfp_transform(net["step"], KEEP_HEAD), *args)
  by_path = {}
  for r in records:
    by_path.setdefault(r.path, set()).add((r.direction, r.mode))
  assert by_path["Net/head"] == {("forward", "float"), ("backward", "float")}
  for path in ("Net/blocks/fc", "Net/user", "Net"):
    assert ("forward", "dfp") in by_path[path] and ("backward", "dfp") in by_path[path], path
  assert [r.index for r in records] == list(range(len(records)))
  table = str(records)
  assert "Net/blocks/fc" in table and "path matches config.keep_float" in table
  assert table.splitlines()[-1].startswith(f"{len(records)} sites:")


# ---------------------------------------------------------------------------------------
# Convolutions.
# ---------------------------------------------------------------------------------------


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
    return nn.Conv(4, (3, 3), strides=2, feature_group_count=2, name="grouped")(x)


def test_conv_net_rewritten_and_grad_commutes():
  model = ConvNet()
  x = jax.random.normal(jax.random.key(20), (2, 6, 6, 3))
  params = model.init(jax.random.key(21), x)
  loss = lambda p, x: jnp.sum(model.apply(p, x) ** 2)
  closed = jax.make_jaxpr(dfp_transform(jax.grad(loss)))(params, x)
  assert float_sites(closed) == []
  g1 = run(jax.grad(dfp_transform(loss)), params, x)
  g2 = run(dfp_transform(jax.grad(loss)), params, x)
  assert_bitwise_equal(g1, g2)
  kept = report(loss, params, x, config=dfpjax.DFPConfig(keep_float=("*/grouped",)))
  assert {(r.path, r.mode) for r in kept} == {("ConvNet/conv", "dfp"),
                                               ("ConvNet/grouped", "float")}
  # The output shapes tell the passes apart (x is not differentiated: conv has no dx).
  assert sorted((r.path, r.direction, r.out_shape) for r in report(jax.grad(loss), params, x)) == [
      ("ConvNet/conv", "backward", (3, 3, 3, 4)),         # weight gradient
      ("ConvNet/conv", "forward", (2, 6, 6, 4)),
      ("ConvNet/grouped", "backward", (2, 6, 6, 4)),      # input gradient
      ("ConvNet/grouped", "backward", (3, 3, 2, 4)),      # weight gradient
      ("ConvNet/grouped", "forward", (2, 3, 3, 4))]


# ---------------------------------------------------------------------------------------
# Paths.
# ---------------------------------------------------------------------------------------


def _stack(*frames):
  return source_info_util.NameStack(tuple(
      source_info_util.Transform(f[:-2]) if f.endswith("()") else source_info_util.Scope(f)
      for f in frames))


def test_module_paths():
  assert module_path(_stack("jvp()", "Net", "Dense_0")) == "Net/Dense_0"
  assert not is_backward(_stack("jvp()", "Net", "Dense_0"))
  backward = _stack("transpose()", "jvp()", "Net", "Dense_0")
  assert module_path(backward) == "Net/Dense_0" and is_backward(backward)
  # A remat transposed in the backward pass: JAX repeats the path from the root.
  assert module_path(_stack("transpose()", "jvp()", "Net", "jvp()", "Net", "rem")) == "Net/rem"
  # A transform inside a module does not restart the path.
  assert module_path(_stack("Net", "vmap()", "inner", "fc")) == "Net/inner/fc"
  assert module_path(_stack()) == ""
  # A scope may repeat its parent's name (a module named like the one that holds it).
  assert module_path(_stack("Outer", "proj", "proj")) == "Outer/proj/proj"
  # Left out: Flax's lifted call of a function with its module, jnp.einsum's subscripts.
  assert module_path(_stack("Net", "Block_0", "Block_0.fn", "Conv_0")) == "Net/Block_0/Conv_0"
  assert module_path(_stack("Net", "head", "bd,dk->bk")) == "Net/head"
  assert module_path(_stack("head", "...d, dk")) == "head"


def test_keep_float_matches_a_scope_repeating_its_parents_name_and_an_einsums_scope():
  x, w = jnp.ones((4, 8)), jnp.full((8, 8), 0.1)

  def f(x, w):
    with jax.named_scope("a"), jax.named_scope("a"):
      y = x @ w
    with jax.named_scope("head"):
      return jnp.einsum("bd,dk->bk", y, w)

  sites = report(f, x, w, config=dfpjax.DFPConfig(keep_float=("a/a", "*head")))
  assert [(site.path, site.mode) for site in sites] == [("a/a", "float"), ("head", "float")]
