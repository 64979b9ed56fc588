"""Configuration of DFP numerics (spec section 5)."""

from __future__ import annotations

import dataclasses
import fnmatch
import numbers
from typing import Literal

Rounding = Literal["nearest", "stochastic"]
Granularity = Literal["tensor", "channel"]

SUPPORTED_OPS = ("dot_general", "conv_general_dilated")


def _integer(value) -> bool:
  """An integer (a NumPy one too), not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How one class of operands (forward operands or gradients) is quantized.

  Attributes:
    bits: mantissa width P in 2..16; mantissas satisfy ``|m| <= 2**(P-1) - 1``.
    headroom: s in 0..P-2; the largest element maps into ``[2**(P-2-s), 2**(P-1-s))``.
      0 keeps the most precision (accumulation is exact, so no headroom is needed
      against overflow); 2 reproduces the paper's reference exponent choice.
    rounding: ``"nearest"`` (half to even) or ``"stochastic"`` (needs a key).
    granularity: ``"tensor"`` (one exponent per tensor, the paper's scheme) or
      ``"channel"`` (one exponent per index of the operand's channel axis).
    exponent_axes: manual mesh axes (inside ``shard_map``) over which an operand is one
      tensor split into shards: its exponent is the whole tensor's (the abs-max is
      max-reduced over these axes), so its mantissas are those one device forms. Empty
      (the default): each shard has its own exponent. ``jax.jit`` sharding needs no such
      field: there exponents are always the global tensor's.
  """

  bits: int = 16
  headroom: int = 0
  rounding: Rounding = "nearest"
  granularity: Granularity = "tensor"
  exponent_axes: tuple[str, ...] = ()

  def __post_init__(self):
    axes = self.exponent_axes
    if not isinstance(axes, tuple) or not all(isinstance(a, str) for a in axes):
      raise TypeError(f"DFP exponent_axes must be a tuple of mesh axis names, got {axes!r}")
    if not _integer(self.bits) or not 2 <= self.bits <= 16:
      raise ValueError(f"DFP bits must be an integer in 2..16, got {self.bits!r}")
    if not _integer(self.headroom) or not 0 <= self.headroom <= self.bits - 2:
      raise ValueError(
          f"DFP headroom must be an integer in 0..bits-2={self.bits - 2}, got {self.headroom!r}")
    object.__setattr__(self, "bits", int(self.bits))  # a NumPy integer hashes and prints as one
    object.__setattr__(self, "headroom", int(self.headroom))
    if self.rounding not in ("nearest", "stochastic"):
      raise ValueError(f"DFP rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
    if self.granularity not in ("tensor", "channel"):
      raise ValueError(
          f"DFP granularity must be 'tensor' or 'channel', got {self.granularity!r}")


@dataclasses.dataclass(frozen=True)
class DFPConfig:
  """What runs in DFP and how.

  The default reproduces the paper: 16-bit per-tensor DFP for the forward operands
  and for the gradients, every ``dot_general`` and ``conv_general_dilated`` rewritten.

  Attributes:
    forward: quantization of the forward operands (activations and weights).
    gradient: quantization of the incoming cotangents in the backward pass. Its
      granularity must be ``"tensor"``: a cotangent's axes are contracted by one of
      the two backward ops, so a per-channel exponent could not stay outside the sum.
    ops: the primitives that ``dfp_transform`` rewrites.
    keep_float: glob patterns over call-site paths (the Flax module path in the
      equation's name stack, from the top module, e.g. ``"ResNet/conv_init"`` or
      ``"*/Dense_*"``; docs/transform.md) whose ops stay in floating point.
  """

  forward: QuantConfig = QuantConfig()
  gradient: QuantConfig = QuantConfig()
  ops: tuple[str, ...] = SUPPORTED_OPS
  keep_float: tuple[str, ...] = ()

  def __post_init__(self):
    if not isinstance(self.forward, QuantConfig) or not isinstance(self.gradient, QuantConfig):
      raise TypeError("DFPConfig.forward and .gradient must be QuantConfig instances")
    if self.gradient.granularity != "tensor":
      raise ValueError("DFPConfig.gradient.granularity must be 'tensor' (see the docstring)")
    ops = _names(self.ops, "ops")
    unknown = sorted(set(ops) - set(SUPPORTED_OPS))
    if unknown:
      raise ValueError(f"DFPConfig.ops has unsupported ops {unknown}; supported: {SUPPORTED_OPS}")
    object.__setattr__(self, "ops", ops)
    object.__setattr__(self, "keep_float", _names(self.keep_float, "keep_float"))

  @property
  def needs_key(self) -> bool:
    return "stochastic" in (self.forward.rounding, self.gradient.rounding)

  def keeps_float(self, site_path: str) -> bool:
    """Whether the call site at ``site_path`` is excluded from DFP."""
    return any(fnmatch.fnmatchcase(site_path, pattern) for pattern in self.keep_float)


def _names(value, field: str) -> tuple[str, ...]:
  """``DFPConfig.<field>`` as a tuple of strings: one string is one name, not its letters."""
  if isinstance(value, str):
    return (value,)
  try:
    names = tuple(value)
  except TypeError:
    names = None
  if names is None or not all(isinstance(name, str) for name in names):
    raise TypeError(f"DFPConfig.{field} must be a string or a sequence of strings, got {value!r}")
  return names
