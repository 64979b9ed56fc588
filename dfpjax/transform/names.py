"""Call-site paths and directions from an equation's name stack.

A name stack is a sequence of ``Scope`` frames (Flax module names, ``jax.named_scope``)
and ``Transform`` frames (``jvp``, ``transpose``, ``vmap``, ...). An equation inside a
sub-jaxpr stores its stack relative to the enclosing equation, so the interpreter
concatenates them (as ``jax.core.eval_jaxpr`` does) before asking for a path.
"""

from __future__ import annotations

from dfpjax._jax_compat import source_info_util

NameStack = source_info_util.NameStack
Scope = source_info_util.Scope
Transform = source_info_util.Transform


def module_path(name_stack: source_info_util.NameStack) -> str:
  """The ``/``-joined scope names of ``name_stack`` with transform frames removed.

  ``transpose(jvp(Net))/Dense_0`` gives ``Net/Dense_0``. JAX re-roots some stacks: the
  equations of a ``remat`` transposed in the backward pass carry the absolute stack
  again (``transpose(jvp(Net))/jvp(Net)/rem``): a run of scopes that follows a
  transform frame and starts with the whole path so far is taken as such a restart
  (``Net/rem``), not as nested modules of the same names.
  """
  groups: list[list[str]] = [[]]
  previous_was_scope = False
  for frame in name_stack.stack:
    if isinstance(frame, Transform):
      if previous_was_scope:
        groups.append([])
      previous_was_scope = False
    else:
      groups[-1].append(frame.name)
      previous_was_scope = True
  path: list[str] = []
  for group in groups:
    path = group if path and group[:len(path)] == path else path + group
  return "/".join(path)


def is_backward(name_stack: source_info_util.NameStack) -> bool:
  """Whether the equation came from a transpose (the backward pass of ``jax.grad``).

  Recomputation inside a ``remat`` that runs in the backward pass counts as backward:
  the name stack does not tell it apart.
  """
  return any(isinstance(f, Transform) and f.name == "transpose" for f in name_stack.stack)
