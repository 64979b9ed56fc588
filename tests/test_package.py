"""The package's shape: JAX internals behind one door, the supported JAX range checked at
import, and layers that import only downward."""

import ast
import pathlib
import re
import subprocess
import sys
import tomllib

import jax
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from dfpjax import _jax_compat

PACKAGE = pathlib.Path(_jax_compat.__file__).parent

# numerics -> primitives (+ the cpu_ffi binding) -> transform: a module imports only its own
# layer or those below it, and none imports the top-level ``dfpjax`` package.
LAYERS = {"_jax_compat": 0, "numerics": 1, "cpu_ffi": 2, "primitives": 3, "transform": 4}


def _pyproject() -> dict:
  return tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())


def test_supported_range_is_the_one_pyproject_pins():
  (pinned,) = [r.specifier for r in map(Requirement, _pyproject()["project"]["dependencies"])
               if r.name == "jax"]
  supported = _jax_compat.supported_jax()
  assert supported.startswith(">=") and Requirement(f"jax{supported}").specifier == pinned


def test_the_kernel_builds_against_the_oldest_supported_jax_each_python_has():
  """A jaxlib refuses FFI handlers built against a newer jaxlib's headers (0.11.2 those of
  0.12), so the build takes the headers of the oldest JAX in range: jax 0.10.2 (wheels up to
  Python 3.13), else 0.11.2."""
  supported = SpecifierSet(_jax_compat.supported_jax())
  build = [Requirement(r) for r in _pyproject()["build-system"]["requires"]]
  for python, oldest in [("3.11", "0.10.2"), ("3.13", "0.10.2"), ("3.14", "0.11.2")]:
    pins = {r.name: str(r.specifier) for r in build if r.name in ("jax", "jaxlib")
            and r.marker is not None and r.marker.evaluate({"python_version": python})}
    assert pins == {"jax": f"=={oldest}", "jaxlib": f"=={oldest}"}, python
    assert oldest in supported
  assert not [r for r in build if r.name in ("jax", "jaxlib") and r.marker is None]


@pytest.mark.parametrize("version", ["0.10.2", "0.10.9", "0.11.0", "0.11.2"])
def test_a_supported_jax_passes(version):
  _jax_compat.check_jax_version(version, ">=0.10.2,<0.12")


@pytest.mark.parametrize("version", ["0.10.1", "0.12.0", "0.9.0"])
def test_an_unsupported_jax_is_a_clear_import_error(version):
  with pytest.raises(ImportError) as err:
    _jax_compat.check_jax_version(version, ">=0.10.2,<0.12")
  assert f"jax {version} is installed" in str(err.value)
  assert "supports jax>=0.10.2,<0.12" in str(err.value)


def test_importing_dfpjax_under_an_unsupported_jax_fails_naming_both_versions():
  supported = _jax_compat.supported_jax()
  unsupported = next(s.version for s in SpecifierSet(supported) if s.operator == "<")
  program = f"import jax; jax.__version__ = {unsupported!r}; import dfpjax"
  run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                       check=False)
  assert run.returncode != 0
  assert (f"ImportError: dfpjax supports jax{supported}, but jax {unsupported} is installed"
          in run.stderr)


def test_only_the_compat_module_names_jax_internals():
  mentions = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*")
                    if p.is_file() and p.suffix in (".py", ".c", ".cc", ".h", ".txt", ".md")
                    and "jax._src" in p.read_text(errors="replace"))
  assert mentions == ["_jax_compat.py"]


def _imports_jax_internals(path: pathlib.Path) -> bool:
  for node in ast.walk(ast.parse(path.read_text())):
    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
             else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
    if any(name == "jax._src" or name.startswith("jax._src.") for name in names):
      return True
  return False


def test_tests_examples_and_benchmarks_reach_jax_internals_only_through_the_compat_module():
  """What the tests need of JAX's internals (its staging flags, name stacks) they import from
  dfpjax._jax_compat, so that a JAX upgrade is mended in one place."""
  root = pathlib.Path(__file__).resolve().parent.parent  # the checkout these tests are in
  sources = [p for d in ("tests", "examples", "benchmarks") for p in (root / d).rglob("*.py")]
  assert len({p.relative_to(root).parts[0] for p in sources}) == 3, f"not a checkout: {root}"
  assert [str(p.relative_to(root)) for p in sources if _imports_jax_internals(p)] == []


def _imported_modules(path: pathlib.Path):
  """The dfpjax modules ``path`` imports (``from dfpjax import x`` names module x when x is
  one, else the top-level package)."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.split(".")[0] == "dfpjax")
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
        and node.module.split(".")[0] == "dfpjax":
      for alias in node.names:
        parts = [*node.module.split(".")[1:], alias.name]
        sub = PACKAGE.joinpath(*parts)
        is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
        yield ".".join(["dfpjax", *parts]) if is_module else node.module


def test_layers_import_only_downward():
  checked = 0
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts == ("__init__",):
      continue  # the top-level package re-exports the public API
    layer = LAYERS[parts[0]]
    for module in _imported_modules(path):
      target = module.split(".")
      assert len(target) > 1, f"{path.relative_to(PACKAGE)} imports the top-level dfpjax package"
      assert LAYERS[target[1]] <= layer, f"{path.relative_to(PACKAGE)} imports {module} (upward)"
      checked += 1
  assert checked > 20  # the walk saw the package's imports


def test_jax_version_is_supported_here():
  _jax_compat.check_jax_version(jax.__version__, _jax_compat.supported_jax())


def test_the_kernel_library_exports_its_c_api_and_nothing_inside():
  """Every function dfp_kernel.h declares, the FFI handlers jax.ffi registers and the FFI API
  version they were built for are exported; the library's internals (packing, bounds,
  microkernel entries, macro-loops) are not, so that nothing loaded beside it (another build of
  it, in benchmarks/conv_phases.c --against) can stand in for them."""
  from dfpjax import cpu_ffi

  lib = cpu_ffi._library()
  header = (PACKAGE / "cpu_ffi" / "src" / "dfp_kernel.h").read_text()
  declared = re.findall(r"^DFP_API [\w\s*]*?\b(dfp_\w+)\(", header, re.MULTILINE)
  undeclared = re.findall(r"^(?!DFP_API)[a-z][\w\s*]*?\b(dfp_\w+)\(", header, re.MULTILINE)
  assert len(declared) >= 13 and not undeclared  # every declared function carries DFP_API
  handlers = ["DfpQuantize", "DfpQuantizeGivenMax", "DfpDotGeneral", "DfpConv", "DfpMaxMagnitudes",
              "DfpChannelSums", "DfpFfiApiVersion"]
  assert [name for name in declared + handlers if not hasattr(lib, name)] == []
  internal = ["dfp_multiply_block", "dfp_pack_columns_portable", "dfp_norm_bounds_portable",
              "dfp_quantize_row_portable", "dfp_isa_config_for", "dfp_ukernel_portable", "dfp_serial"]
  assert [name for name in internal if hasattr(lib, name)] == []
