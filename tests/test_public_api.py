"""The public API: ``dfpjax.kernel_info`` and the rule that benchmarks and examples use only it.

The layers import only downward and the benchmarks and examples sit on top: they may use the
names in ``dfpjax.__all__`` (and ``__version__``), never ``dfpjax.cpu_ffi``, ``dfpjax.primitives``
or an underscore name, so that what they measure and show is what a user can write.
"""

import ast
import pathlib

import pytest

import dfpjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
ISAS = ("portable", "avx2", "avx_vnni", "avx512_vnni")
KERNEL_INFO_KEYS = {"supported_isas", "emulated_isas", "best_isa", "selected_isa"}


def test_kernel_info_is_exported():
  assert "kernel_info" in dfpjax.__all__
  assert callable(dfpjax.kernel_info)


def test_kernel_info_describes_the_kernel_paths(monkeypatch):
  monkeypatch.delenv("DFPJAX_ISA", raising=False)
  info = dfpjax.kernel_info()
  assert KERNEL_INFO_KEYS <= set(info)
  assert isinstance(info["supported_isas"], tuple) and isinstance(info["emulated_isas"], tuple)
  assert "portable" in info["supported_isas"]  # plain C runs everywhere
  assert set(info["supported_isas"]) <= set(ISAS)
  assert set(info["emulated_isas"]) <= set(info["supported_isas"])
  # Unforced, a call takes the best native path: never an emulated one.
  assert info["best_isa"] in info["supported_isas"]
  assert info["best_isa"] not in info["emulated_isas"]
  assert info["selected_isa"] == info["best_isa"]


def test_kernel_info_follows_dfpjax_isa(isa):
  info = dfpjax.kernel_info()
  assert info["selected_isa"] == isa
  assert isa in info["supported_isas"]


def test_kernel_info_rejects_an_unknown_dfpjax_isa(monkeypatch):
  monkeypatch.setenv("DFPJAX_ISA", "sse2")
  with pytest.raises(ValueError, match="DFPJAX_ISA"):
    dfpjax.kernel_info()


def _private(name: str) -> bool:
  """A leading underscore, but not a dunder (a module's ``__path__`` is no private name)."""
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(source: str) -> list[tuple[int, str]]:
  """(line, what) for each place in ``source`` that reaches past dfpjax's public names or into
  an underscore name of the examples."""
  public = set(dfpjax.__all__) | {"__version__"}
  tree = ast.parse(source)
  example_aliases = set()  # names bound to the examples' modules and objects
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, f"import {a.name}") for a in node.names
                if a.name.startswith("dfpjax.")]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [a.name for a in node.names]
      if node.module.startswith("dfpjax.") or node.module == "dfpjax" and set(names) - public:
        found.append((node.lineno, f"from {node.module} import {', '.join(names)}"))
      if node.module.startswith("examples"):
        found += [(node.lineno, f"from {node.module} import {n}") for n in names
                  if _private(n)]
        example_aliases |= {a.asname or a.name for a in node.names}
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
      if node.value.id == "dfpjax" and node.attr not in public:
        found.append((node.lineno, f"dfpjax.{node.attr}"))
      if node.value.id in example_aliases and _private(node.attr):
        found.append((node.lineno, f"{node.value.id}.{node.attr}"))
  return sorted(found)


@pytest.mark.parametrize("folder", ["benchmarks", "examples"])
def test_benchmarks_and_examples_use_only_public_names(folder):
  files = sorted((ROOT / folder).rglob("*.py"))
  assert files, f"no Python files under {folder}/"
  found = [f"{path.relative_to(ROOT)}:{line}: {what}"
           for path in files for line, what in _private_uses(path.read_text())]
  assert not found, "private dfpjax names used:\n" + "\n".join(found)


def test_the_public_name_check_finds_private_uses():
  source = ("import dfpjax\nfrom dfpjax import cpu_ffi, quantize\nimport dfpjax.primitives\n"
            "from examples.imagenet import train\n"
            "print(dfpjax.cpu_ffi, dfpjax.quantize, train._private, train.__file__, "
            "dfpjax.__version__)\n")
  assert _private_uses(source) == [
      (2, "from dfpjax import cpu_ffi, quantize"), (3, "import dfpjax.primitives"),
      (5, "dfpjax.cpu_ffi"), (5, "train._private")]
