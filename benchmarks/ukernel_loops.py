"""The microkernels' inner loops as the compiler built them, and the cycles CPU models predict.

    python benchmarks/ukernel_loops.py                                  # every path's loops
    python benchmarks/ukernel_loops.py --mcpu icelake-server,alderlake  # llvm-mca's CPU models

A path's speed can only be timed on a CPU that has it; its inner loop can be read anywhere. This
disassembles the installed kernel library (binutils' ``objdump``) and finds, in each microkernel
entry of ``ukernel.h``'s contract (``ukernel``: int64 sums; ``ukernel_f32`` and
``ukernel_f32_stream``: float32 tiles), the innermost loops that hold its dot products; the path
is told by them (``vpdpwssd`` on zmm: ``avx512_vnni``, on ymm: ``avx_vnni``; ``vpmaddwd`` on ymm:
``avx2``). Per loop: its instructions, dot products, vector register-to-register copies and
stack accesses (the register allocator's: a clean loop has none), and where LLVM's ``llvm-mca``
is installed, the cycles per iteration its scheduling model of each ``--mcpu`` predicts and the
dot products per cycle that gives (the rate the loop allows on that CPU, before caches,
packing and threads). Run it on a release build (an emulated build's loops are SIMDe's).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import re
import shutil
import subprocess
import tempfile

ENTRIES = ("ukernel", "ukernel_f32", "ukernel_f32_stream")
DOTS = ("vpdpwssd", "vpmaddwd")
_FUNCTION = re.compile(r"^[0-9a-f]+ <([^>]+)>:$")
_INSTRUCTION = re.compile(r"^\s+([0-9a-f]+):\s+(?:\{vex\}\s+)?(\S+)\s*(.*)$")  # {vex}: vpdpwssd's VEX form
_VECTOR_COPY = re.compile(r"%[xyz]mm\d+,%[xyz]mm\d+")

Instruction = collections.namedtuple("Instruction", "address mnemonic operands")


def library_path() -> str:
  spec = importlib.util.find_spec("dfpjax.cpu_ffi._kernel")
  if spec is None or spec.origin is None:
    raise SystemExit("dfpjax's kernel library is not built: install dfpjax (README.md) first")
  return spec.origin


def functions(objdump_text: str) -> list[tuple[str, list[Instruction]]]:
  """(symbol, instructions) of each function in the disassembly, in order."""
  result = []
  for line in objdump_text.splitlines():
    if m := _FUNCTION.match(line):
      result.append((m.group(1), []))
    elif (m := _INSTRUCTION.match(line)) and result:
      result[-1][1].append(Instruction(int(m.group(1), 16), m.group(2),
                                       re.sub(r"\s*<.*>", "", m.group(3))))
  return result


def _backward_target(ins: Instruction) -> int | None:
  if ins.mnemonic.startswith("j") and ins.mnemonic != "jmp":
    target = re.match(r"([0-9a-f]+)$", ins.operands)
    if target and int(target.group(1), 16) < ins.address:
      return int(target.group(1), 16)
  return None


def inner_loops(body: list[Instruction]) -> list[list[Instruction]]:
  """The innermost loops (a backward branch with no other inside) that hold a dot product."""
  index = {ins.address: i for i, ins in enumerate(body)}
  loops = []
  for end, ins in enumerate(body):
    target = _backward_target(ins)
    if target is None or target not in index:
      continue
    loop = body[index[target]:end + 1]
    if any(_backward_target(i) is not None for i in loop[:-1]):
      continue
    if any(i.mnemonic in DOTS for i in loop):
      loops.append(loop)
  return loops


def path_of(loop: list[Instruction]) -> str:
  dots = [i for i in loop if i.mnemonic in DOTS]
  if any(i.mnemonic == "vpdpwssd" and "%zmm" in i.operands for i in dots):
    return "avx512_vnni"
  if any(i.mnemonic == "vpdpwssd" for i in dots):
    return "avx_vnni"
  return "avx2" if any("%ymm" in i.operands for i in dots) else "portable"


Loop = collections.namedtuple("Loop", "path entry instructions dots copies stack body")


def microkernel_loops(objdump_text: str) -> list[Loop]:
  """Each microkernel entry's innermost dot-product loops: their path, entry, instruction and
  dot product counts, vector register-to-register copies and stack accesses."""
  return [Loop(path_of(loop), name, len(loop), sum(i.mnemonic in DOTS for i in loop),
               sum(i.mnemonic.startswith("vmov") and bool(_VECTOR_COPY.fullmatch(i.operands))
                   for i in loop),
               sum("(%rsp)" in i.operands for i in loop), loop)
          for name, body in functions(objdump_text) if name in ENTRIES for loop in inner_loops(body)]


def disassembly(lib: str) -> str:
  return subprocess.run(["objdump", "-d", "--no-show-raw-insn", lib], capture_output=True, text=True,
                        check=True).stdout


def mca_cycles(loop: list[Instruction], mcpu: str, iterations: int = 200) -> float | None:
  """llvm-mca's cycles per iteration of the loop body (its closing branch left out), or None
  where that CPU lacks the loop's instructions."""
  with tempfile.NamedTemporaryFile("w", suffix=".s") as source:
    source.write("".join(f"{i.mnemonic} {i.operands}\n" for i in loop[:-1]))
    source.flush()
    run = subprocess.run(["llvm-mca", f"-mcpu={mcpu}", f"-iterations={iterations}", source.name],
                         capture_output=True, text=True)
  if run.returncode:
    return None
  return int(re.search(r"Total Cycles:\s+(\d+)", run.stdout).group(1)) / iterations


def compilers(lib: str) -> str:
  """Who built the library, from its .comment section ("GCC: (...) 12.2.0")."""
  if shutil.which("readelf") is None:
    return "compiler unknown (no readelf)"
  dump = subprocess.run(["readelf", "-p", ".comment", lib], capture_output=True, text=True).stdout
  return "; ".join(sorted(set(re.findall(r"\]\s+(.+)", dump)))) or "compiler unknown"


def _cycles_cell(dots: int, cycles: float | None) -> str:
  return "-" if cycles is None else f"{cycles:.1f} ({dots / cycles:.2f})"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mcpu", default="icelake-server,alderlake",
                      help="comma-separated llvm-mca CPU models (llvm-mca -mcpu=help lists them)")
  args = parser.parse_args(argv)
  if not all(args.mcpu.split(",")):
    parser.error(f"--mcpu: expected comma-separated CPU models, got {args.mcpu!r}")
  if shutil.which("objdump") is None:
    raise SystemExit("objdump (binutils) is needed to read the kernel library")
  mcpus = args.mcpu.split(",") if shutil.which("llvm-mca") else []
  for mcpu in mcpus:
    if mca_cycles([Instruction(0, "nop", ""), Instruction(1, "jmp", "0")], mcpu) is None:
      raise SystemExit(f"--mcpu: llvm-mca has no model of {mcpu!r} (llvm-mca -mcpu=help lists them)")
  lib = library_path()
  rows = [[loop.path, loop.entry, loop.instructions, loop.dots, loop.copies, loop.stack]
          + [_cycles_cell(loop.dots, mca_cycles(loop.body, m)) for m in mcpus]
          for loop in microkernel_loops(disassembly(lib))]
  if not rows:
    raise SystemExit(f"no microkernel symbols in {lib} (a stripped build?)")
  mca = (subprocess.run(["llvm-mca", "--version"], capture_output=True, text=True).stdout
         .splitlines() or ["llvm-mca"])[0].strip() if mcpus else "no llvm-mca"
  print(f"{lib}, built by {compilers(lib)}; {mca}\n")
  print("| path | entry | instructions | dot products | vector register copies | stack accesses |"
        + "".join(f" {m}: cycles/iteration (dots/cycle) |" for m in mcpus))
  print("|---" * (6 + len(mcpus)) + "|")
  for row in sorted(rows, key=lambda r: (r[0], r[1])):
    print("| " + " | ".join(map(str, row)) + " |")
  if mcpus:
    print("\n-: that CPU model lacks the loop's instructions")
  else:
    print("\nllvm-mca is not installed (Debian: llvm): no predicted cycles")


if __name__ == "__main__":
  main()
