"""Runs a snippet on simulated CPU devices in a subprocess (XLA fixes the device count when
it starts, so every count needs its own process) and reports what it compiled and computed.

The snippet sees ``jax``, ``jnp``, ``np``, ``P``, ``NamedSharding``, ``dfpjax``, ``mesh``
(``jax.make_mesh((devices,), ("data",))``, its axes explicit, the default, or auto) and
``report(name, value)``; it may call
``report_hlo(compiled)`` on a ``jax.jit(...).lower(...).compile()`` result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np

_PRELUDE = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import dfpjax
mesh = jax.make_mesh((len(jax.devices()),), ("data",),
                     axis_types=(jax.sharding.AxisType.{axis_type},))
_results, _hlo = {}, []
def report(name, value):
  value = np.ascontiguousarray(np.asarray(value).reshape(-1)).reshape(np.shape(value))
  raw = value.reshape(-1).view(np.uint8)
  _results[name] = [str(value.dtype), list(value.shape), raw.tobytes().hex()]
def report_hlo(compiled):
  _hlo.append(compiled.as_text())
"""

_EPILOGUE = """
print("@@RESULT@@" + json.dumps({"results": _results, "hlo": _hlo}))
"""



@dataclasses.dataclass
class Run:
  results: dict  # name -> numpy array, bit for bit
  hlo: list  # compiled HLO texts

  def all_gathers(self) -> list[str]:
    """The result types of every all-gather in the compiled HLO (e.g. ``f32[32,16]``)."""
    return [m.group(1) for text in self.hlo for m in re.finditer(r"= (\S+) all-gather\(", text)]


def run_on_devices(snippet: str, devices: int, timeout: float = 600, axis_type="Explicit",
                   xla_flags: str = "") -> Run:
  """Runs ``snippet`` with ``devices`` simulated CPU devices (and ``xla_flags`` besides the
  environment's); returns its reports."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), xla_flags,
                                           f"--xla_force_host_platform_device_count={devices}"]))
  env["JAX_PLATFORMS"] = "cpu"
  program = _PRELUDE.replace("{axis_type}", axis_type) + textwrap.dedent(snippet) + _EPILOGUE
  proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  if proc.returncode:
    raise RuntimeError(f"snippet failed on {devices} devices:\n{proc.stderr[-6000:]}")
  line = next(l for l in proc.stdout.splitlines() if l.startswith("@@RESULT@@"))
  data = json.loads(line[len("@@RESULT@@"):])
  results = {name: np.frombuffer(bytes.fromhex(hexed), np.dtype(dtype)).reshape(shape)
             for name, (dtype, shape, hexed) in data["results"].items()}
  return Run(results, data["hlo"])
