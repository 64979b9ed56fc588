"""The ImageNet examples' train step in FP32 and in DFP, with peak memory and profiles (issue 7).

    python benchmarks/train_step.py                        # ResNet-50 at 224, batch 16 and 32
    python benchmarks/train_step.py --networks resnet18,googlenet,vgg16,alexnet --batches 16
    python benchmarks/train_step.py --quick                # 32x32 images, batch 8: a try-out
    python benchmarks/train_step.py --json rows.json > table.md
    python benchmarks/train_step.py --modes flax-dfp,torch-fp32 --rounds 3   # on a noisy host

Every configuration runs in a process of its own, so that its peak resident memory (VmHWM, read
after the timed steps and before profiling) is its own and a crash or --timeout loses one row:
  flax-fp32   examples/imagenet/train.py's ``train_step``, jitted with the state donated and the
              config's XLA options (``train.compiler_options``), as the trainer runs it
  flax-dfp    the same step through ``train.make_dfp_step`` (``dfpjax.dfp_transform``): every
              convolution and matmul in INT16 DFP, forward and backward
  torch-fp32, torch-bf16
              ResNet-50 only, when PyTorch is importable (``pip install -e ".[bench]"``): the
              ResNet-50 v1.5 of torch_resnet.py (torchvision is not needed), channels_last, SGD
              with momentum, in FP32 and under bf16 autocast; a reference, not part of dfpjax
Images and labels are random (no input pipeline). Each step is timed alone after compilation and
one warm-up step; the table gives the median over --steps, images/s relative to flax-fp32 of the
same network and batch in this run, the CPUs the timed steps kept busy on average (below the
machine's count when others share it), and their minor page faults and system seconds per step
(with glibc's default malloc settings XLA's large buffers are mapped afresh and faulted in on
every step; docs/examples.md names the settings that spare those faults, and the header says which
are set). The frameworks do not share their best malloc settings (PyTorch's steps are fastest under
the trainer's old ones, DFP's under glibc's huge pages: docs/performance.md): ``--env`` gives a
mode's processes variables of their own, and the report names them per row.
On a shared machine the host's load drifts over the minutes a run takes, and it falls on whichever
configuration runs then: ``--rounds R`` runs the configurations R times, round-robin (each round a
fresh process per configuration, the profile in the first round only), so that the drift falls on
all of them alike; a row then pools the timed steps of all its rounds (its median is over them),
its peak memory is the largest of its rounds', and the notes give each round's median.
Progress goes to stderr, the markdown report to stdout; its header gives the CPU, its SIMD flags
and the DFP kernel path (``dfpjax.kernel_info``).

Each Flax step's instructions and the bytes they write are counted by category from its HLO
(hlo_profile.py): the step's work, independent of the machine's load. The Flax steps are then
profiled over --profile-steps more steps with ``jax.profiler.trace``, by
category of HLO instruction (hlo_profile.py). Shares are of the summed time of all instructions,
which can exceed the step's wall time when XLA runs independent instructions on several threads.

A memory table gives, per configuration, the resident memory before the first step (runtime,
model, state), the peak after compiling (Flax), the peak after the timed steps, and XLA's own
account of the compiled step (``memory_analysis``: argument, output, aliased and temporary bytes).

The report ends with one line per network and batch: the DFP step against Flax FP32 and against
the faster of PyTorch FP32 and bf16 (when those rows exist), with each one's peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import hlo_profile  # plain Python; jax, dfpjax and torch load only in the processes that use them

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORKS = ("resnet50", "resnet18", "googlenet", "vgg16", "alexnet")
FLAX_MODES = ("flax-fp32", "flax-dfp")
TORCH_MODES = ("torch-fp32", "torch-bf16")
NUM_CLASSES = 1000


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def proc_status_bytes(field: str) -> int:
  """``VmHWM`` (peak resident memory so far) or ``VmRSS`` (now) of this process, in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(f"{field}:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_bytes() -> int:
  return proc_status_bytes("VmHWM")


def usage_now() -> tuple[float, int, float]:
  """This process's CPU seconds (user and system), minor page faults and system seconds so far,
  from one snapshot."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime, usage.ru_minflt, usage.ru_stime


def time_steps(run_step, steps: int) -> dict:
  """Seconds of the first call (warm-up) and of each of ``steps`` further calls, the CPUs the
  timed steps kept busy on average (less than the machine's count on a shared machine), and
  their minor page faults and system CPU seconds per step."""
  start = time.perf_counter()
  run_step()
  first = time.perf_counter() - start
  log(f"  warm-up step {first:.1f} s")
  times, (cpu_start, faults_start, system_start) = [], usage_now()
  for i in range(steps):
    start = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - start)
    log(f"  step {i + 1}/{steps}: {times[-1]:.2f} s")
  cpu, faults, system = usage_now()
  return {"first_step_s": first, "step_s": times,
          "cpus_used": (cpu - cpu_start) / sum(times),
          "faults_per_step": (faults - faults_start) / steps,
          "system_s_per_step": (system - system_start) / steps}


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
    step_fn = train.make_dfp_step(step_fn, config)
    sites = str(dfpjax.report(step_fn, state, batch))
    result["note"] = f"dfpjax.report: {sites.splitlines()[-1]}"
    log(f"  {result['note']}")
  result["rss_start"] = proc_status_bytes("VmRSS")
  log("  compiling")
  start = time.perf_counter()
  compiled = jax.jit(step_fn, donate_argnums=0, compiler_options=train.compiler_options(config)
                     ).lower(state, batch).compile()
  result["compile_s"] = time.perf_counter() - start
  result["peak_rss_compile"] = peak_rss_bytes()
  memory = compiled.memory_analysis()
  result["xla_bytes"] = {kind: getattr(memory, f"{kind}_size_in_bytes")
                         for kind in ("argument", "output", "alias", "temp")}
  log(f"  compiled in {result['compile_s']:.1f} s; XLA's buffers, MiB: " + ", ".join(
      f"{kind} {size / 2**20:.0f}" for kind, size in result["xla_bytes"].items()))
  hlo = compiled.as_text()
  if dfp and 'custom_call_target="dfpjax' not in hlo:
    raise RuntimeError("the DFP step calls no dfpjax kernel; its timing would be XLA's")
  train.release_freed_memory()  # as the trainer does after its first (compiling) step

  def run_step():
    nonlocal state
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)

  kernel_sizes = {"/".join(k.key for k in path[:-1]): leaf.size
                  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
                  if leaf.ndim > 1}
  result["written"] = hlo_profile.written_categories(hlo, kernel_sizes)
  result.update(time_steps(run_step, spec["steps"]))
  result["peak_rss"] = peak_rss_bytes()
  save(result)  # the timings survive a profile cut short by --timeout
  if spec["profile_steps"]:
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
      result["profile_ms"] = hlo_profile.profile_categories(trace_dir, hlo, kernel_sizes,
                                                            spec["profile_steps"])
      save(result)


def torch_worker(spec: dict, save) -> None:
  import torch_resnet

  run_step, note = torch_resnet.make_train_step(spec["batch"], spec["image_size"], NUM_CLASSES,
                                                bf16=spec["mode"] == "torch-bf16")
  rss_start = proc_status_bytes("VmRSS")
  result = {**time_steps(run_step, spec["steps"]), "rss_start": rss_start}
  result["peak_rss"] = peak_rss_bytes()
  result["note"] = note
  save(result)


# ---------------------------------------------------------------------------------- the report


def run_config(spec: dict, timeout: float) -> dict:
  """One configuration in a fresh process: what it measured, and why it stopped early if it did."""
  log(f"{spec['mode']} {spec['network']} batch {spec['batch']} at {spec['image_size']}px")
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), out.name]
    try:
      status = subprocess.run(cmd, cwd=REPO, timeout=timeout, stdout=sys.stderr,
                              env={**os.environ, **spec["env"]}).returncode
      failure = f"worker exited with status {status}" if status else ""
    except subprocess.TimeoutExpired:
      failure = f"timed out after {timeout:.0f} s"
    result = {**spec, **(json.load(out) if os.path.getsize(out.name) else {})}
  if failure and "step_s" not in result:
    return {**result, "error": failure}
  if failure:
    result["note"] = f"{result.get('note', '')}; no profile: {failure}".lstrip("; ")
  return result


def merge_round(row: dict, later: dict) -> dict:
  """Row ``row`` (its rounds so far) with one more round's result: the timed steps pooled, the
  per-step counters weighted by steps, the largest peak memory, each round's median kept; a
  failed round is named in the notes and leaves the others' numbers."""
  medians = row.get("round_medians_s",
                    [statistics.median(row["step_s"])] if "step_s" in row else [None])
  if "error" in later:
    note = f"{row.get('note', '')}; round {len(medians) + 1}: {later['error']}"
    return {**row, "round_medians_s": medians + [None], "note": note.lstrip("; ")}
  if "step_s" not in row:  # every round before failed: this one's numbers, the failures noted
    rounds = "round 1" if len(medians) == 1 else f"rounds 1-{len(medians)}"
    note = f"{later.get('note', '')}; {rounds}: {row.get('error', 'no steps')}"
    return {**later, "round_medians_s": medians + [statistics.median(later["step_s"])],
            "note": note.lstrip("; ")}
  n, m = len(row["step_s"]), len(later["step_s"])
  merged = {**row, "step_s": row["step_s"] + later["step_s"],
            "round_medians_s": medians + [statistics.median(later["step_s"])]}
  for key in ("cpus_used", "faults_per_step", "system_s_per_step"):
    merged[key] = (row[key] * n + later[key] * m) / (n + m)
  for key in ("peak_rss", "peak_rss_compile"):
    if key in later:
      merged[key] = max(row.get(key, 0), later[key])
  return merged


def assignments(env: dict) -> str:
  """"NAME=VALUE NAME=VALUE", as a shell would take them."""
  return " ".join(f"{k}={v}" for k, v in env.items())


def environments_note(envs: list[tuple[str, dict]]) -> str:
  """What --env adds for each mode's processes: "torch: MALLOC_ARENA_MAX=1; flax-dfp: ..."."""
  return "; ".join(f"{modes}: {assignments(env)}" for modes, env in envs)


def machine_header(torch_note: str, envs: list[tuple[str, dict]]) -> str:
  """The machine and software facts that a reader needs to weigh the numbers."""
  import jax
  # common loads dfpjax: not in the workers' way.
  from common import cpu_flags, cpu_model, kernel_paths, malloc_settings
  kernel = kernel_paths()
  forced = f" (DFPJAX_ISA={os.environ['DFPJAX_ISA']})" if os.environ.get("DFPJAX_ISA") else ""
  git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout
  dirty = " (working tree modified)" if git("status", "--porcelain", "--untracked-files=no") else ""
  return (f"{datetime.date.today()}, {cpu_model()}, {os.cpu_count()} CPUs, flags "
          f"{' '.join(cpu_flags()) or '(no AVX2 or later)'}, DFP kernel path "
          f"{kernel['selected_isa']}{forced}, load average {os.getloadavg()[0]:.1f} at the start, "
          f"jax {jax.__version__}, dfpjax at {git('rev-parse', '--short', 'HEAD').strip()}{dirty}; "
          f"{malloc_settings()}{f' (--env {environments_note(envs)})' if envs else ''}; "
          f"{torch_note}")


def summary_table(rows: list[dict]) -> str:
  baseline = {(r["network"], r["batch"]): r for r in rows
              if r["mode"] == "flax-fp32" and "error" not in r}
  lines = ["| network | batch | step | compile s | warm-up step s | s/step (median of n) | "
           "images/s | vs Flax FP32 | peak RSS GiB | CPUs used | page faults/step | system s/step |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    head = f"| {r['network']} | {r['batch']} | {r['mode']} |"
    if "error" in r:
      lines.append(f"{head} {r['error']} | | | | | | | | |")
      continue
    step = statistics.median(r["step_s"])
    base = baseline.get((r["network"], r["batch"]))
    ratio = f"{statistics.median(base['step_s']) / step:.2f}x" if base else "n/a"
    compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "(eager)"
    lines.append(f"{head} {compile_s} | {r['first_step_s']:.1f} | {step:.2f} (n={len(r['step_s'])})"
                 f" | {r['batch'] / step:.2f} | {ratio} | {r['peak_rss'] / 2**30:.2f} | "
                 f"{r['cpus_used']:.1f} | {r['faults_per_step']:,.0f} | {r['system_s_per_step']:.2f} |")
  return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
  """Where each configuration's peak memory comes from: the process before its first step (the
  runtime, the model and the state), the peak after compiling (Flax) and after the timed steps,
  and XLA's buffers of the compiled step (arguments, outputs, the outputs aliased to donated
  arguments, and temporaries: the activations kept for the backward pass and the like)."""
  gib = lambda r, k: f"{r[k] / 2**30:.2f}" if k in r else "n/a"
  lines = ["| network | batch | step | RSS before the steps GiB | peak after compiling GiB | "
           "peak RSS GiB | XLA argument / output / alias / temp MiB |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    if "peak_rss" not in r:
      continue
    xla = (" / ".join(f"{v / 2**20:.0f}" for v in r["xla_bytes"].values())
           if "xla_bytes" in r else "n/a")
    lines.append(f"| {r['network']} | {r['batch']} | {r['mode']} | {gib(r, 'rss_start')} | "
                 f"{gib(r, 'peak_rss_compile')} | {gib(r, 'peak_rss')} | {xla} |")
  return "\n".join(lines)


def written_table(rows: list[dict]) -> str:
  """Per category, the instructions of each compiled Flax step and the MiB they write: the
  step's work from its HLO alone, the same on a busy machine as on an idle one."""
  counted = [r for r in rows if r.get("written")]
  if not counted:
    return ""
  categories = sorted({c for r in counted for c in r["written"]},
                      key=lambda c: -max(r["written"].get(c, (0, 0))[1] for r in counted))
  lines = ["| category | " + " | ".join(f"{r['network']} b{r['batch']} {r['mode']}: "
                                        "instructions, MiB" for r in counted) + " |",
           "|---" * (len(counted) + 1) + "|"]
  for c in categories + ["all"]:
    cells = [r["written"].get(c, (0, 0)) if c != "all" else
             tuple(map(sum, zip(*r["written"].values()))) for r in counted]
    lines.append(f"| {c} | " + " | ".join(f"{n}, {mib:.0f}" for n, mib in cells) + " |")
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


def comparison_table(rows: list[dict]) -> str:
  """Per network and batch: the DFP step against Flax FP32 and the faster PyTorch step.

  Speed-ups are the other step's median time over DFP's (> 1: DFP faster); PyTorch's is that of
  whichever of FP32 and bf16 autocast was faster, named in the cell.
  """
  ok = {(r["network"], r["batch"], r["mode"]): r for r in rows if "step_s" in r}
  keys = list(dict.fromkeys((r["network"], r["batch"]) for r in rows))
  lines = ["| network | batch | DFP s/step | vs Flax FP32 | vs PyTorch (faster of FP32, bf16) | "
           "peak RSS GiB: DFP / Flax FP32 / PyTorch |", "|---|---|---|---|---|---|"]
  median = lambda r: statistics.median(r["step_s"])
  gib = lambda r: f"{r['peak_rss'] / 2**30:.2f}" if r else "n/a"
  for network, batch in keys:
    dfp = ok.get((network, batch, "flax-dfp"))
    if dfp is None:
      why = next((r.get("error", "") for r in rows
                  if (r["network"], r["batch"], r["mode"]) == (network, batch, "flax-dfp")),
                 "not run")
      lines.append(f"| {network} | {batch} | DFP {why} | | | |")
      continue
    fp32 = ok.get((network, batch, "flax-fp32"))
    torch_rows = [ok[k] for k in ((network, batch, m) for m in TORCH_MODES) if k in ok]
    torch = min(torch_rows, key=median, default=None)
    vs_fp32 = f"{median(fp32) / median(dfp):.2f}x" if fp32 else "n/a"
    vs_torch = (f"{median(torch) / median(dfp):.2f}x ({torch['mode'].split('-')[1]}, "
                f"{median(torch):.2f} s)" if torch else "n/a")
    lines.append(f"| {network} | {batch} | {median(dfp):.2f} | {vs_fp32} | {vs_torch} | "
                 f"{gib(dfp)} / {gib(fp32)} / {gib(torch)} |")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  # common loads dfpjax: here, in the parent process only, not in the workers' way.
  # pylint: disable-next=g-import-not-at-top
  from common import (names_of, non_negative_int, positive_float, positive_int, positive_ints,
                      writable_path)
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--networks", type=names_of(NETWORKS), default=["resnet50"],
                      help=f"comma-separated, of {','.join(NETWORKS)} (default resnet50)")
  # --quick sets only what is not given: its defaults are None here.
  parser.add_argument("--batches", type=positive_ints,
                      help="comma-separated batch sizes (default 16,32; --quick 8)")
  parser.add_argument("--image-size", type=positive_int, help="default 224; --quick 32")
  parser.add_argument("--modes", type=names_of(FLAX_MODES + TORCH_MODES),
                      default=list(FLAX_MODES + TORCH_MODES),
                      help="comma-separated, of flax-fp32,flax-dfp,torch-fp32,torch-bf16 "
                           "(torch rows only for resnet50, and only when torch is importable)")
  parser.add_argument("--steps", type=step_counts,
                      help="timed steps after the warm-up: N (default 3; --quick 2), optionally "
                           "followed by MODE=N for modes that take fewer, e.g. 3,torch-bf16=1 "
                           "where bf16 has no hardware support and a step takes minutes")
  parser.add_argument("--profile-steps", type=non_negative_int, default=1,
                      help="profiled steps of each Flax configuration (0: no profile)")
  parser.add_argument("--trace-dir", help="keep each profile (perfetto_trace.json.gz, for "
                      "Perfetto's UI) and the step's HLO text (hlo.txt) in a folder of this one")
  parser.add_argument("--timeout", type=positive_float, default=1800,
                      help="seconds allowed to one configuration's process")
  parser.add_argument("--quick", action="store_true",
                      help="32x32 images, batch 8, 2 steps, where not given: a try-out, not a "
                           "measurement")
  parser.add_argument("--env", action="append", default=[], type=mode_environment,
                      metavar="MODES:NAME=VALUE[,NAME=VALUE...]",
                      help="environment variables for one mode's processes (MODES: a mode, or "
                           "flax / torch for both of theirs), added to this process's; repeat "
                           "for other modes. Each framework under its best malloc settings, e.g. "
                           "--env flax-dfp:GLIBC_TUNABLES=glibc.malloc.hugetlb=1 --env "
                           "torch:MALLOC_ARENA_MAX=1")
  parser.add_argument("--rounds", type=positive_int, default=1,
                      help="run every configuration this many times, round-robin, pooling each "
                           "one's steps (default 1)")
  parser.add_argument("--json", type=writable_path, help="also write the raw results to this file")
  args = parser.parse_args(argv)
  args.batches = args.batches or ([8] if args.quick else [16, 32])
  args.image_size = args.image_size or (32 if args.quick else 224)
  args.steps = args.steps or {None: 2 if args.quick else 3}
  unknown = set(args.steps) - {None} - set(FLAX_MODES + TORCH_MODES)
  unknown |= {modes for modes, _ in args.env} - set(FLAX_MODES + TORCH_MODES) - {"flax", "torch"}
  if unknown:
    parser.error(f"unknown modes: {sorted(unknown)}")
  return args


def mode_environment(text: str) -> tuple[str, dict]:
  """``--env``: ``(modes, {name: value})`` from "MODES:NAME=VALUE,NAME=VALUE"."""
  modes, sep, items = text.partition(":")
  items = items.split(",")
  if not sep or any("=" not in item or item.startswith("=") for item in items):
    raise argparse.ArgumentTypeError(f"expected MODES:NAME=VALUE[,NAME=VALUE...], got {text!r}")
  return modes, dict(item.partition("=")[::2] for item in items)


def environment_of(mode: str, envs: list[tuple[str, dict]]) -> dict:
  """The variables ``--env`` sets for a mode's processes (later flags win)."""
  result = {}
  for modes, env in envs:
    if modes in (mode, mode.split("-")[0]):
      result.update(env)
  return result


def step_counts(text: str) -> dict:
  """``--steps``: ``{None: N, mode: N, ...}`` from "N,MODE=N,..." (the default count first)."""
  default, *overrides = text.split(",")
  steps = {None: int(default)}
  for item in overrides:
    mode, sep, count = item.partition("=")
    if not sep:
      raise argparse.ArgumentTypeError(f"expected MODE=N after the first count, got {item!r}")
    steps[mode] = int(count)
  if min(steps.values()) < 1:
    raise argparse.ArgumentTypeError(f"step counts must be positive, got {text!r}")
  return steps


def steps_note(steps: dict) -> str:
  """"3 steps" or "3 steps (torch-bf16: 1)"."""
  others = ", ".join(f"{mode}: {n}" for mode, n in steps.items() if mode is not None)
  return f"{steps[None]} steps" + (f" ({others})" if others else "")


def main(argv=None) -> None:
  args = parse_args(argv)
  try:
    import torch
    torch_note = f"torch {torch.__version__}"
  except ImportError:
    torch_note = "torch is not installed: no PyTorch rows (pip install -e '.[bench]')"
    log(torch_note)
  specs = [{"network": n, "batch": b, "mode": m, "image_size": args.image_size,
            "steps": args.steps.get(m, args.steps[None]), "profile_steps": args.profile_steps,
            "trace_dir": args.trace_dir and os.path.abspath(args.trace_dir),
            "env": environment_of(m, args.env)}
           for n in args.networks for b in args.batches for m in args.modes
           if m in FLAX_MODES or (n == "resnet50" and torch_note.startswith("torch "))]
  header = machine_header(torch_note, args.env)
  rows = [None] * len(specs)
  for round_ in range(args.rounds):
    if args.rounds > 1:
      log(f"round {round_ + 1} of {args.rounds}")
    for i, spec in enumerate(specs):
      result = run_config(spec if round_ == 0 else {**spec, "profile_steps": 0}, args.timeout)
      rows[i] = result if round_ == 0 else merge_round(rows[i], result)
      others = [r for j, r in enumerate(rows) if r is not None and j != i]
      log(summary_table(others + [rows[i]]).splitlines()[-1])  # the others: its baseline
      if args.json:  # after every row: a run stopped from outside keeps what it measured
        with open(args.json, "w") as f:
          json.dump({"header": header, "rows": [r for r in rows if r is not None]}, f, indent=1)
  header += f"; load average {os.getloadavg()[0]:.1f} at the end"
  rounds = f", pooled over {args.rounds} rounds run round-robin" if args.rounds > 1 else ""
  print(f"{header}\n\nTrain step at {args.image_size}x{args.image_size}, random data, medians of "
        f"{steps_note(args.steps)}{rounds} after compilation and one warm-up step:\n\n"
        f"{summary_table(rows)}")
  print()
  for r in rows:
    notes = [f"environment {assignments(r['env'])}"] if r["env"] else []
    if "round_medians_s" in r:
      notes.append("medians of the rounds " + " / ".join(
          "failed" if m is None else f"{m:.2f}" for m in r["round_medians_s"]) + " s")
    notes += [r["note"]] if r.get("note") else []
    if notes:
      print(f"- {r['network']} b{r['batch']} {r['mode']}: {'; '.join(notes)}")
  print(f"\nMemory:\n\n{memory_table(rows)}")
  written = written_table(rows)
  if written:
    print(f"\nInstructions per step and the MiB they write, by category (from the HLO):"
          f"\n\n{written}")
  profiles = profile_table(rows)
  if profiles:
    print(f"\nProfile, ms per step by category (self time of HLO instructions, "
          f"{args.profile_steps} traced step(s)):\n\n{profiles}")
  print(f"\nDFP against the references (speed-up = their s/step / DFP's, > 1: DFP faster):\n\n"
        f"{comparison_table(rows)}")
  if args.env:
    print(f"\nModes' own environment variables (--env), added to the header's: "
          f"{environments_note(args.env)}")


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
