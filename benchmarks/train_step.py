"""The ImageNet examples' train step in FP32 and in DFP, with peak memory and profiles (issue 7).

    python benchmarks/train_step.py                        # ResNet-50 at 224, batch 16 and 32
    python benchmarks/train_step.py --networks resnet18,googlenet,vgg16,alexnet --batches 16
    python benchmarks/train_step.py --quick                # 32x32 images, batch 8: a try-out
    python benchmarks/train_step.py --json rows.json > table.md

Every configuration runs in a process of its own, so that its peak resident memory (VmHWM, read
after the timed steps and before profiling) is its own and a crash or --timeout loses one row:
  flax-fp32   examples/imagenet/train.py's ``train_step``, jitted with the state donated, as the
              trainer runs it
  flax-dfp    the same step through ``train.make_dfp_step`` (``dfpjax.dfp_transform``): every
              convolution and matmul in INT16 DFP, forward and backward
  torch-fp32, torch-bf16
              ResNet-50 only, when PyTorch is importable (``pip install -e ".[bench]"``): a
              ResNet-50 v1.5 written below (torchvision is not needed), channels_last, SGD with
              momentum, in FP32 and under bf16 autocast; a reference, not part of dfpjax
Images and labels are random (no input pipeline). Each step is timed alone after compilation and
one warm-up step; the table gives the median over --steps, images/s relative to flax-fp32 of the
same network and batch in this run, and the CPUs the timed steps kept busy on average (below the
machine's count when others share it). Progress goes to stderr, the markdown report to stdout.

The Flax steps are then profiled over --profile-steps more steps with ``jax.profiler.trace``: its
Chrome-trace JSON has one event per executed HLO instruction (thunk), which the compiled module's
HLO text (``Compiled.as_text()``) maps to a category; see ``Categorizer``. Shares are of the summed
time of all instructions, which can exceed the step's wall time when XLA runs independent
instructions on several threads.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import glob
import gzip
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORKS = ("resnet50", "resnet18", "googlenet", "vgg16", "alexnet")
FLAX_MODES = ("flax-fp32", "flax-dfp")
TORCH_MODES = ("torch-fp32", "torch-bf16")
NUM_CLASSES = 1000


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def time_steps(run_step, steps: int) -> dict:
  """Seconds of the first call (warm-up) and of each of ``steps`` further calls, and the CPUs
  the timed steps kept busy on average (less than the machine's count on a shared machine)."""
  start = time.perf_counter()
  run_step()
  first = time.perf_counter() - start
  log(f"  warm-up step {first:.1f} s")
  times, cpu_start = [], cpu_seconds()
  for i in range(steps):
    start = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - start)
    log(f"  step {i + 1}/{steps}: {times[-1]:.2f} s")
  return {"first_step_s": first, "step_s": times,
          "cpus_used": (cpu_seconds() - cpu_start) / sum(times)}


# ------------------------------------------------------------------------------ HLO categories


@dataclasses.dataclass
class Instr:
  name: str
  opcode: str
  dtypes: frozenset[str]  # element types of the result (all of a tuple's)
  elements: int  # of the first array of the result
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
    ins = Instr(name=m.group(1), opcode=opcode, dtypes=frozenset(t for t, _ in arrays),
                elements=math.prod(dims), operands=re.findall(r"%([\w.\-]+)", args),
                op_name=op_name.group(1).split(";")[0] if op_name else "",
                target=target.group(1) if target else "",
                called=re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", attrs))
    instrs[ins.name] = ins
    computations[computation].append(ins)
  return instrs, computations


FLOATS = {"f32", "bf16", "f16", "f64"}
DATA_MOVEMENT = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "dynamic-slice",
                 "dynamic-update-slice", "pad", "concatenate", "reverse", "parameter", "constant",
                 "tuple", "get-tuple-element", "iota", "fusion"}  # fusion: a fused body's wrapper
CONTROL = {"conditional", "while", "call"}


def pass_of(ins: Instr, kernel_sizes: dict[str, int]) -> str:
  """forward / backward-data / backward-weights of a product, from its name stack and size.

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
  scopes = [s for s in ins.op_name.split("/") if "(" not in s]
  for start in range(len(scopes)):
    for stop in range(len(scopes), start, -1):
      size = kernel_sizes.get("/".join(scopes[start:stop]))
      if size is not None:
        return "backward-weights" if ins.elements == size else "backward-data"
  return "backward"


class Categorizer:
  """The category of each executed instruction, from the module's HLO (first rule that applies):

  * ``quantization: <forward or backward>``: a custom call to dfpjax's quantization kernel
    (``dfpjax_quantize``); XLA code that reads floating point and writes INT16 (rounding to
    mantissas, with whatever XLA fused into it); a max-reduction to one element (a per-tensor
    abs-max) and what feeds only such reductions (``|x|``).
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
    return f"quantization: {'backward' if 'transpose(' in ins.op_name else 'forward'}"

  def __call__(self, name: str) -> str:
    ins = self.instrs[name]
    if ins.target == "dfpjax_quantize":
      return self.quantization(ins)
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


# ------------------------------------------------------------------------------------- workers


def flax_worker(spec: dict, save) -> None:
  import jax
  import numpy as np
  import dfpjax
  from examples.imagenet import train
  from examples.imagenet.main import load_config

  dfp = spec["mode"] == "flax-dfp"
  config = dataclasses.replace(load_config(spec["network"]), batch_size=spec["batch"], dfp=dfp)
  model = train.create_model(config, NUM_CLASSES)
  state = train.create_train_state(config, model, spec["image_size"],
                                   train.create_learning_rate_fn(config, 100))
  rng = np.random.default_rng(0)
  size = (spec["batch"], spec["image_size"], spec["image_size"], 3)
  batch = {"image": rng.normal(size=size).astype(np.float32),
           "label": rng.integers(0, NUM_CLASSES, spec["batch"]).astype(np.int32)}
  step_fn = functools.partial(train.train_step, aux_loss_weight=config.aux_loss_weight)
  result = {}
  if dfp:
    sites = str(dfpjax.report(step_fn, state, batch,
                              config=dfpjax.DFPConfig(keep_float=config.dfp_keep_float)))
    result["note"] = f"dfpjax.report: {sites.splitlines()[-1]}"
    log(f"  {result['note']}")
    step_fn = train.make_dfp_step(step_fn, config)
  log("  compiling")
  start = time.perf_counter()
  compiled = jax.jit(step_fn, donate_argnums=0).lower(state, batch).compile()
  result["compile_s"] = time.perf_counter() - start
  log(f"  compiled in {result['compile_s']:.1f} s")
  hlo = compiled.as_text()
  if dfp and 'custom_call_target="dfpjax' not in hlo:
    raise RuntimeError("the DFP step calls no dfpjax kernel; its timing would be XLA's")

  def run_step():
    nonlocal state
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)

  result.update(time_steps(run_step, spec["steps"]))
  result["peak_rss"] = peak_rss_bytes()
  save(result)  # the timings survive a profile cut short by --timeout
  if spec["profile_steps"]:
    kernel_sizes = {"/".join(k.key for k in path[:-1]): leaf.size
                    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
                    if leaf.ndim > 1}
    with tempfile.TemporaryDirectory() as tmp:
      trace_dir = tmp
      if spec["trace_dir"]:
        trace_dir = os.path.join(spec["trace_dir"],
                                 f"{spec['network']}-b{spec['batch']}-{spec['mode']}")
        os.makedirs(trace_dir, exist_ok=True)
        with open(os.path.join(trace_dir, "hlo.txt"), "w") as f:
          f.write(hlo)
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(spec["profile_steps"]):
          run_step()
        result["profiled_step_s"] = (time.perf_counter() - start) / spec["profile_steps"]
      result["profile_ms"] = profile_categories(trace_dir, hlo, kernel_sizes,
                                                spec["profile_steps"])
      save(result)


def torch_resnet50(nn):
  """ResNet-50 v1.5 (stride on the 3x3 conv), torchvision's layout: 25,557,032 parameters."""

  class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
      super().__init__()
      cout = 4 * width
      self.body = nn.Sequential(
          nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
          nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
          nn.ReLU(inplace=True), nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
      self.proj = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                   if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
      return (self.body(x) + self.proj(x)).relu_()

  layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1)]
  cin = 64
  for stage, blocks in enumerate((3, 4, 6, 3)):
    for block in range(blocks):
      layers.append(Bottleneck(cin, 64 * 2**stage, 2 if stage and not block else 1))
      cin = 256 * 2**stage
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, NUM_CLASSES)]
  return nn.Sequential(*layers)


def torch_worker(spec: dict, save) -> None:
  import torch

  torch.manual_seed(0)
  model = torch_resnet50(torch.nn).to(memory_format=torch.channels_last).train()
  # The examples' recipe: SGD, momentum 0.9, weight decay 1e-4 (here on every parameter).
  opt = torch.optim.SGD(model.parameters(), lr=0.1 * spec["batch"] / 256, momentum=0.9,
                        weight_decay=1e-4)
  x = torch.randn(spec["batch"], 3, spec["image_size"], spec["image_size"]).to(
      memory_format=torch.channels_last)
  y = torch.randint(0, NUM_CLASSES, (spec["batch"],))
  bf16 = spec["mode"] == "torch-bf16"

  def run_step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

  result = time_steps(run_step, spec["steps"])
  result["peak_rss"] = peak_rss_bytes()
  params = sum(p.numel() for p in model.parameters())
  result["note"] = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                    f"{params:,} parameters")
  save(result)


# ---------------------------------------------------------------------------------- the report


def run_config(spec: dict, timeout: float) -> dict:
  """One configuration in a fresh process: what it measured, and why it stopped early if it did."""
  log(f"{spec['mode']} {spec['network']} batch {spec['batch']} at {spec['image_size']}px")
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), out.name]
    try:
      status = subprocess.run(cmd, cwd=REPO, timeout=timeout, stdout=sys.stderr).returncode
      failure = f"worker exited with status {status}" if status else ""
    except subprocess.TimeoutExpired:
      failure = f"timed out after {timeout:.0f} s"
    result = {**spec, **(json.load(out) if os.path.getsize(out.name) else {})}
  if failure and "step_s" not in result:
    return {**result, "error": failure}
  if failure:
    result["note"] = f"{result.get('note', '')}; no profile: {failure}".lstrip("; ")
  return result


def machine_header(torch_note: str) -> str:
  import jax
  cpu = {}
  with open("/proc/cpuinfo") as f:
    for line in f:
      if not line.strip():
        break
      key, _, value = line.partition(":")
      cpu[key.strip()] = value.strip()
  git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout
  dirty = " (working tree modified)" if git("status", "--porcelain", "--untracked-files=no") else ""
  return (f"{datetime.date.today()}, {cpu.get('model name', platform.processor())} (family "
          f"{cpu.get('cpu family', '?')}, model {cpu.get('model', '?')}), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the start, jax {jax.__version__}, dfpjax at "
          f"{git('rev-parse', '--short', 'HEAD').strip()}{dirty}; {torch_note}")


def summary_table(rows: list[dict]) -> str:
  baseline = {(r["network"], r["batch"]): r for r in rows
              if r["mode"] == "flax-fp32" and "error" not in r}
  lines = ["| network | batch | step | compile s | warm-up step s | s/step (median of n) | "
           "images/s | vs Flax FP32 | peak RSS GiB | CPUs used |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    head = f"| {r['network']} | {r['batch']} | {r['mode']} |"
    if "error" in r:
      lines.append(f"{head} {r['error']} | | | | | | |")
      continue
    step = statistics.median(r["step_s"])
    base = baseline.get((r["network"], r["batch"]))
    ratio = f"{statistics.median(base['step_s']) / step:.2f}x" if base else "n/a"
    compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "(eager)"
    lines.append(f"{head} {compile_s} | {r['first_step_s']:.1f} | {step:.2f} (n={len(r['step_s'])})"
                 f" | {r['batch'] / step:.2f} | {ratio} | {r['peak_rss'] / 2**30:.2f} | "
                 f"{r['cpus_used']:.1f} |")
  return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
  profiled = [r for r in rows if r.get("profile_ms")]
  if not profiled:
    return ""
  categories = sorted({c for r in profiled for c in r["profile_ms"]},
                      key=lambda c: -max(r["profile_ms"].get(c, 0) for r in profiled))
  lines = ["| category | " + " | ".join(f"{r['network']} b{r['batch']} {r['mode']} ms (%)"
                                        for r in profiled) + " |",
           "|---" * (len(profiled) + 1) + "|"]
  totals = [sum(r["profile_ms"].values()) for r in profiled]
  for c in categories:
    cells = [f"{r['profile_ms'].get(c, 0):.0f} ({100 * r['profile_ms'].get(c, 0) / t:.1f}%)"
             for r, t in zip(profiled, totals)]
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  lines.append("| sum of instruction times | " + " | ".join(f"{t:.0f}" for t in totals) + " |")
  lines.append("| wall time of a profiled step | " + " | ".join(
      f"{1e3 * r['profiled_step_s']:.0f}" for r in profiled) + " |")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--networks", default="resnet50",
                      help=f"comma-separated, of {','.join(NETWORKS)} (default resnet50)")
  parser.add_argument("--batches", help="comma-separated batch sizes (default 16,32; --quick 8)")
  parser.add_argument("--image-size", type=int, help="default 224; --quick 32")
  parser.add_argument("--modes", default=",".join(FLAX_MODES + TORCH_MODES),
                      help="comma-separated, of flax-fp32,flax-dfp,torch-fp32,torch-bf16 "
                           "(torch rows only for resnet50, and only when torch is importable)")
  parser.add_argument("--steps", type=int, help="timed steps after the warm-up (default 3)")
  parser.add_argument("--profile-steps", type=int, default=1,
                      help="profiled steps of each Flax configuration (0: no profile)")
  parser.add_argument("--trace-dir", help="keep each profile (perfetto_trace.json.gz, for "
                      "Perfetto's UI) and the step's HLO text (hlo.txt) in a folder of this one")
  parser.add_argument("--timeout", type=float, default=1800,
                      help="seconds allowed to one configuration's process")
  parser.add_argument("--quick", action="store_true",
                      help="32x32 images, batch 8, 2 steps: a try-out, not a measurement")
  parser.add_argument("--json", help="also write the raw results to this file")
  args = parser.parse_args(argv)
  args.batches = [int(b) for b in (args.batches or ("8" if args.quick else "16,32")).split(",")]
  args.image_size = args.image_size or (32 if args.quick else 224)
  args.steps = args.steps or (2 if args.quick else 3)
  args.networks = args.networks.split(",")
  args.modes = args.modes.split(",")
  unknown = set(args.networks) - set(NETWORKS) | set(args.modes) - set(FLAX_MODES + TORCH_MODES)
  if unknown:
    parser.error(f"unknown networks or modes: {sorted(unknown)}")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  try:
    import torch
    torch_note = f"torch {torch.__version__}"
  except ImportError:
    torch_note = "torch is not installed: no PyTorch rows (pip install -e '.[bench]')"
    log(torch_note)
  specs = [{"network": n, "batch": b, "mode": m, "image_size": args.image_size,
            "steps": args.steps, "profile_steps": args.profile_steps,
            "trace_dir": args.trace_dir and os.path.abspath(args.trace_dir)}
           for n in args.networks for b in args.batches for m in args.modes
           if m in FLAX_MODES or (n == "resnet50" and torch_note.startswith("torch "))]
  header = machine_header(torch_note)
  rows = []
  for spec in specs:
    rows.append(run_config(spec, args.timeout))
    log(summary_table(rows).splitlines()[-1])
    if args.json:  # after every row: a run stopped from outside keeps what it measured
      with open(args.json, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
  header += f"; load average {os.getloadavg()[0]:.1f} at the end"
  print(f"{header}\n\nTrain step at {args.image_size}x{args.image_size}, random data, medians of "
        f"{args.steps} steps after compilation and one warm-up step:\n\n{summary_table(rows)}")
  print()
  for r in rows:
    if r.get("note"):
      print(f"- {r['network']} b{r['batch']} {r['mode']}: {r['note']}")
  profiles = profile_table(rows)
  if profiles:
    print(f"\nProfile, ms per step by category (self time of HLO instructions, "
          f"{args.profile_steps} traced step(s)):\n\n{profiles}")


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.path.insert(0, REPO)  # the examples package
    spec = json.loads(sys.argv[2])

    def save(result):
      with open(sys.argv[3], "w") as f:
        json.dump(result, f)
    (torch_worker if spec["mode"].startswith("torch") else flax_worker)(spec, save)
  else:
    main()
