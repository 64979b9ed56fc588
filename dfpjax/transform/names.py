"""Call-site paths and directions from an equation's name stack.

A name stack is a sequence of ``Scope`` frames (Flax module names, ``jax.named_scope``)
and ``Transform`` frames (``jvp``, ``transpose``, ``vmap``, ...). An equation inside a
sub-jaxpr stores its stack relative to the enclosing equation, so the interpreter
concatenates them (as ``jax.core.eval_jaxpr`` does) before asking for a path.
"""

from __future__ import annotations

import re

from dfpjax._jax_compat import source_info_util

NameStack = source_info_util.NameStack
Scope = source_info_util.Scope
Transform = source_info_util.Transform
# The scope JAX puts around the recomputation of a ``remat`` (``jax.checkpoint``).
_REMAT_SCOPE = "rematted_computation"
# Operand subscripts (letters, ellipses, spaces) separated by commas, then optionally the output's.
_SUBSCRIPTS = re.compile(r"[A-Za-z. ]*(,[A-Za-z. ]*)+(->[A-Za-z. ]*)?")


def module_path(name_stack: source_info_util.NameStack) -> str:
  """The ``/``-joined scope names of ``name_stack`` with transform frames removed.

  ``transpose(jvp(Net))/Dense_0`` gives ``Net/Dense_0``. JAX re-roots some stacks: the
  equations of a ``remat`` transposed in the backward pass carry the absolute stack
  again (``transpose(jvp(Net))/jvp(Net)/rem``): a run of scopes that follows a
  transform frame and starts with the whole path so far is taken as such a restart
  (``Net/rem``), not as nested modules of the same names. Scopes that are no modules are left
  out: the one JAX puts around a ``remat``'s recomputation, the ``Block_0.fn`` a Flax
  lifted transform of a function called with module ``Block_0`` adds (``nn.remat(fn)``), and
  the one ``jnp.einsum`` names after its subscripts (``bd,dk->bk``). A scope may repeat its
  parent's name (a ``Dense(name="proj")`` in a module named ``proj``: ``Outer/proj/proj``).
  """
  groups: list[list[str]] = [[]]
  previous_was_scope = False
  modules = set()
  for frame in name_stack.stack:
    if isinstance(frame, Transform):
      if previous_was_scope:
        groups.append([])
      previous_was_scope = False
    elif not (frame.name == _REMAT_SCOPE or _is_lifted_call(frame.name, modules)
              or _is_einsum_subscripts(frame.name)):
      groups[-1].append(frame.name)
      modules.add(frame.name)
      previous_was_scope = True
  path: list[str] = []
  for group in groups:
    path = group if path and group[:len(path)] == path else path + group
  return "/".join(path)


def _is_lifted_call(name: str, modules: set[str]) -> bool:
  """Whether ``name`` is ``<module>.<function>`` of a module the stack has named."""
  module, dot, _ = name.partition(".")
  return bool(dot) and module in modules


def _is_einsum_subscripts(name: str) -> bool:
  """Whether ``name`` is the subscripts of an einsum of two or more operands (a product's)."""
  return "," in name and _SUBSCRIPTS.fullmatch(name) is not None


def is_backward(name_stack: source_info_util.NameStack) -> bool:
  """Whether the equation came from a transpose (the backward pass of ``jax.grad``).

  Recomputation inside a ``remat`` that runs in the backward pass counts as backward:
  the name stack does not tell it apart.
  """
  return any(isinstance(f, Transform) and f.name == "transpose" for f in name_stack.stack)
