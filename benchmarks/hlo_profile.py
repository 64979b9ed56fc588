"""Where a compiled XLA:CPU step spends its time, by category, from a ``jax.profiler`` trace.

``jax.profiler.trace``'s Chrome-trace JSON has one event per executed HLO instruction (thunk);
the compiled module's HLO text (``Compiled.as_text()``) maps each to a category (see
``Categorizer``). ``profile_categories`` sums the instructions' self times per category;
``written_categories`` counts the instructions of the step and the bytes they write, per
category, from the HLO text alone (no trace, and no noise from a shared machine). Used by
train_step.py; plain Python, no JAX.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re


@dataclasses.dataclass
class Instr:
  name: str
  opcode: str
  dtypes: frozenset[str]  # element types of the result (all of a tuple's)
  elements: int  # of the first array of the result
  nbytes: int  # of the whole result
  operands: list[str]
  op_name: str  # metadata: the JAX name stack and primitive
  target: str  # custom_call_target
  called: list[str]  # fusion bodies and reducers: run inside this instruction, not as thunks


def _split_type(rest: str) -> tuple[str, str]:
  """(result type, remainder) of the text after ``name = ``; tuple types nest parentheses."""
  if not rest.startswith("("):
    return rest.split(" ", 1)
  depth = 0
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rest[:i + 1], rest[i + 1:].lstrip()
  raise ValueError(f"unbalanced type in {rest[:200]!r}")


def parse_hlo(text: str) -> tuple[dict[str, Instr], dict[str, list[Instr]]]:
  """A module's HLO text: its instructions by name, and each computation's instructions."""
  instrs, computations, computation = {}, collections.defaultdict(list), ""
  for line in text.splitlines():
    head = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if head:
      computation = head.group(1)
      continue
    m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (.*)$", line)
    if not m:
      continue
    rtype, rest = _split_type(m.group(2))
    opcode, _, rest = rest.partition("(")
    args, _, attrs = rest.partition(")")
    arrays = re.findall(r"([a-z]+\d*)\[([\d,]*)\]", rtype)
    dims = [int(d) for d in arrays[0][1].split(",") if d] if arrays else []
    target = re.search(r'custom_call_target="([^"]*)"', attrs)
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    nbytes = sum(BYTES.get(t, 4) * math.prod(int(d) for d in shape.split(",") if d)
                 for t, shape in arrays)
    ins = Instr(name=m.group(1), opcode=opcode, dtypes=frozenset(t for t, _ in arrays),
                elements=math.prod(dims), nbytes=nbytes,
                operands=re.findall(r"%([\w.\-]+)", args),
                op_name=op_name.group(1).split(";")[0] if op_name else "",
                target=target.group(1) if target else "",
                called=re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", attrs))
    instrs[ins.name] = ins
    computations[computation].append(ins)
  return instrs, computations


FLOATS = {"f32", "bf16", "f16", "f64"}
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s64": 8, "u64": 8,
         "f64": 8}  # and 4
DATA_MOVEMENT = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "dynamic-slice",
                 "dynamic-update-slice", "pad", "concatenate", "reverse", "parameter", "constant",
                 "tuple", "get-tuple-element", "iota", "fusion"}  # fusion: a fused body's wrapper
CONTROL = {"conditional", "while", "call"}


def pass_of(ins: Instr, kernel_sizes: dict[str, int]) -> str:
  """forward / backward-data / backward-weights of a product (or forward, recomputed: in the
  backward pass of a ``dfpjax.recompute`` region), from its name stack and size.

  JAX names the products its transpose rules write ``.../transpose(jvp(Model))/<module path>/
  <primitive>``; of a layer's two backward products, the weight gradient is the one with as many
  elements as the layer's kernel. XLA:CPU drops the name of the weight-gradient convolutions it
  rewrites (``convolution-window-dilated``): without a name, a product as large as some kernel is
  taken for a weight gradient.
  """
  if not ins.op_name:
    return "backward-weights" if ins.elements in kernel_sizes.values() else "unnamed"
  if "transpose(" not in ins.op_name:
    return "forward"
  if "/rematted_computation/" in ins.op_name:  # a dfpjax.recompute region's, in the backward pass
    return "forward, recomputed"
  # Scopes of the module path only: not a recompute region's checkpoint or its method's name.
  scopes = [s for s in ins.op_name.split("/")
            if "(" not in s and "." not in s and s != "checkpoint"]
  for start in range(len(scopes)):
    for stop in range(len(scopes), start, -1):
      size = kernel_sizes.get("/".join(scopes[start:stop]))
      if size is not None:
        return "backward-weights" if ins.elements == size else "backward-data"
  return "backward"


def _direction(ins: Instr) -> str:
  return "backward" if "transpose(" in ins.op_name else "forward"


class Categorizer:
  """The category of each executed instruction, from the module's HLO (first rule that applies):

  * ``quantization: <forward or backward>``: a custom call to dfpjax's quantization kernel
    (``dfpjax_quantize``); XLA code that reads floating point and writes INT16 (rounding to
    mantissas, with whatever XLA fused into it); a max-reduction to one element (a per-tensor
    abs-max) and what feeds only such reductions (``|x|``).
  * ``channel sums: <forward or backward>``: a custom call to ``dfpjax.channel_sums``'s kernel
    (``dfpjax_channel_sums``: BatchNorm's statistics in the examples' DFP runs).
  * ``DFP kernel: <pass>``: a custom call to one of dfpjax's other targets (``dfpjax_*``).
  * ``INT16 data movement``: INT16 in or out and no float input: patches, pads, layout copies.
  * ``XLA conv: <pass>``, ``XLA dot: <pass>``: contains a float convolution / dot.
  * ``pooling`` (reduce-window, select-and-scatter), ``reductions`` (other reduces).
  * ``scalars and control flow``: conditionals, loops, and results of at most 16 elements (DFP's
    exponent arithmetic, the step counter, RNG keys).
  * ``transposes and copies``: nothing but data movement; ``elementwise fusions``: the rest.
  """

  def __init__(self, hlo_text: str, kernel_sizes: dict[str, int]):
    self.instrs, self.computations = parse_hlo(hlo_text)
    self.kernel_sizes = kernel_sizes
    self._body = {}
    users = collections.defaultdict(list)
    for ins in self.instrs.values():
      for o in ins.operands:
        users[o].append(ins)
    self.amax_inputs = {name for name, us in users.items() if all(map(self._is_amax, us))}

  def body(self, ins: Instr) -> frozenset[str]:
    """Opcodes of the computations ``ins`` runs inside itself (fusion bodies, reducers)."""
    if ins.name not in self._body:
      self._body[ins.name] = frozenset().union(*(
          {i.opcode for i in self.computations[c]} | self.body_of(c) for c in ins.called))
    return self._body[ins.name]

  def body_of(self, computation: str) -> frozenset[str]:
    return frozenset().union(*(self.body(i) for i in self.computations[computation]))

  def _is_amax(self, ins: Instr) -> bool:
    ops = self.body(ins) | {ins.opcode}
    return ins.elements == 1 and "reduce" in ops and "maximum" in ops

  @staticmethod
  def quantization(ins: Instr) -> str:
    return f"quantization: {_direction(ins)}"

  def __call__(self, name: str) -> str:
    ins = self.instrs[name]
    if ins.target == "dfpjax_quantize":
      return self.quantization(ins)
    if ins.target == "dfpjax_channel_sums":
      return f"channel sums: {_direction(ins)}"
    if ins.target.startswith("dfpjax"):
      return f"DFP kernel: {pass_of(ins, self.kernel_sizes)}"
    operand_types = frozenset().union(*(self.instrs[o].dtypes for o in ins.operands
                                        if o in self.instrs))
    if "s16" in ins.dtypes | operand_types:
      return self.quantization(ins) if operand_types & FLOATS else "INT16 data movement"
    ops = self.body(ins) | {ins.opcode}
    if "convolution" in ops:
      return f"XLA conv: {pass_of(ins, self.kernel_sizes)}"
    if "dot" in ops:
      return f"XLA dot: {pass_of(ins, self.kernel_sizes)}"
    if ops & {"reduce-window", "select-and-scatter"}:
      return "pooling"
    if self._is_amax(ins) or name in self.amax_inputs:
      return self.quantization(ins)
    if "reduce" in ops:
      return "reductions"
    if ins.opcode in CONTROL or ins.elements <= 16:
      return "scalars and control flow"
    if ops <= DATA_MOVEMENT:
      return "transposes and copies"
    return "elementwise fusions"


def profile_categories(trace_dir: str, hlo_text: str, kernel_sizes: dict[str, int],
                       steps: int) -> dict[str, float]:
  """Milliseconds per step by category, from the self times of the traced HLO instructions."""
  module = re.match(r"HloModule (\S+?),", hlo_text).group(1)
  path, = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    events = [e for e in json.load(f)["traceEvents"]
              if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == module]
  # Instructions nest (a conditional's branches run inside it): keep each one's self time.
  self_us = collections.Counter()
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[e["tid"]].append(e)
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []
    for e in thread:
      while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
        stack.pop()
      if stack:
        self_us[stack[-1]["args"]["hlo_op"]] -= e["dur"]
      self_us[e["args"]["hlo_op"]] += e["dur"]
      stack.append(e)
  categorize = Categorizer(hlo_text, kernel_sizes)
  ms = collections.Counter()
  for name, us in self_us.items():
    ms[categorize(name) if name in categorize.instrs else "other"] += us / 1e3 / steps
  return dict(ms)



# Instructions that write nothing of their own: views, tuples and the module's inputs.
NO_WRITE = {"parameter", "constant", "get-tuple-element", "bitcast", "tuple"}


def written_categories(hlo_text: str, kernel_sizes: dict[str, int]) -> dict[str, tuple[int, float]]:
  """Per category: how many of the entry computation's instructions run each step and the MiB
  their results take (what they write), from the HLO text alone."""
  categorize = Categorizer(hlo_text, kernel_sizes)
  entry = re.search(r"^ENTRY %([\w.\-]+)", hlo_text, re.MULTILINE).group(1)
  count, written = collections.Counter(), collections.Counter()
  for ins in categorize.computations[entry]:
    if ins.opcode not in NO_WRITE:
      count[categorize(ins.name)] += 1
      written[categorize(ins.name)] += ins.nbytes / 2**20
  return {c: (count[c], written[c]) for c in count}
