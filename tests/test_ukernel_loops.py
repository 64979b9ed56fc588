"""The microkernels' inner loops as built: B loads, A broadcasts, dot products, pointer steps.

No CI machine can time every path, but each can read what the compiler made of it (the kernel
library is installed unstripped; ``benchmarks/ukernel_loops.py`` prints the same loops with
llvm-mca's cycles). GCC's partial redundancy elimination once turned the ``avx512_vnni`` float32
tiles' loop into 65 instructions, 32 of them accumulator copies, and stored ten ``avx_vnni``
accumulators to the stack on every pair: 1.35-2.6x slower on cores that run two zmm dot products
a cycle (docs/development.md, "Reading the microkernels' inner loops"), invisible on this CPU.
"""

import pathlib
import platform
import shutil
import sys

import pytest

from dfpjax import cpu_ffi

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Per path: the dot products of one pair's loop body (its tile's accumulators), unrolled loops
# holding a multiple of them.
DOTS_PER_PAIR = {"avx2": 12, "avx_vnni": 12, "avx512_vnni": 16}


@pytest.fixture(scope="module")
def tool():
  if platform.machine() not in ("x86_64", "AMD64"):
    pytest.skip("the microkernels read here are the x86 paths'")
  if cpu_ffi.emulated_isas():
    pytest.skip(f"an emulated build: its {cpu_ffi.emulated_isas()} loops are SIMDe's")
  if shutil.which("objdump") is None:
    pytest.fail("objdump (binutils, which built the kernel) is needed to read its loops")
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import ukernel_loops  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  return ukernel_loops


@pytest.fixture(scope="module")
def loops(tool):
  return tool.microkernel_loops(tool.disassembly(tool.library_path()))


@pytest.mark.parametrize("path", sorted(DOTS_PER_PAIR))
@pytest.mark.parametrize("entry", ["ukernel", "ukernel_f32", "ukernel_f32_stream"])
def test_every_entry_has_a_clean_inner_loop(loops, path, entry):
  found = [l for l in loops if (l.path, l.entry) == (path, entry)]
  assert found, f"no {path} {entry} loop with dot products in the kernel library"
  for l in found:
    assert l.dots % DOTS_PER_PAIR[path] == 0, l[:6]
    assert (l.copies, l.stack) == (0, 0), (
        f"{path} {entry}: {l.copies} vector register copies and {l.stack} stack accesses among "
        f"{l.instructions} instructions beside {l.dots} dot products:\n"
        + "\n".join(f"  {i.mnemonic} {i.operands}" for i in l.body))


def test_the_loop_reader_counts_copies_and_stack_accesses(tool):
  # A loop of the old avx512_vnni float32 tile's kind, abridged.
  text = """
0000000000001000 <ukernel_f32>:
    1000:\tvmovdqu64 (%r14),%zmm1
    1006:\tvmovdqa32 %zmm18,%zmm0
    100c:\tvpbroadcastd (%r12),%zmm2
    1013:\tvpdpwssd %zmm1,%zmm2,%zmm0
    1019:\tvmovdqa32 %zmm0,0x988(%rsp)
    1024:\tvmovdqa64 %zmm0,%zmm18
    102a:\tcmp    %r15,%rsi
    102d:\tjne    1000 <ukernel_f32+0x0>
    1033:\tret
"""
  loop, = tool.microkernel_loops(text)
  assert loop[:6] == ("avx512_vnni", "ukernel_f32", 8, 1, 2, 1)


def test_an_empty_cpu_model_is_refused(tool, capsys):
  # It used to drop the models and say llvm-mca was not installed.
  with pytest.raises(SystemExit) as exit_:
    tool.main(["--mcpu", ""])
  assert exit_.value.code == 2
  assert "--mcpu" in capsys.readouterr().err.splitlines()[-1]
