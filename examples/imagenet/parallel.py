"""Data parallelism for the trainer: one mesh axis, "data", over every device of every process.

The global batch (``config.batch_size``) is split along "data" and the train state is replicated,
or with ``config.shard_state`` split ZeRO-style (``DataParallel.state_sharding``); ``jax.jit``
with these ``NamedSharding``s lets XLA's partitioner split the step and add the collectives of
the gradients and batch statistics. Each process loads only the rows of every global batch that
its own devices hold (``Loader(shard=...)``), and ``jax.make_array_from_process_local_data``
assembles the global batch from the processes' parts.

On one device this is the single-device trainer: the same computation, the same bits.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int):
  """Joins a run of ``num_processes`` processes (``jax.distributed.initialize``).

  Call it before any JAX computation. On CPU the processes exchange data through the gloo
  collectives (the CPU backend has no others across processes).
  """
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, num_processes={num_processes}), got {process_id}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """The mesh of a data-parallel run and its shardings."""
  mesh: jax.sharding.Mesh
  batch_size: int  # global, over all processes
  shard_state: bool = False  # see state_sharding

  @classmethod
  def over_all_devices(cls, batch_size: int, shard_state: bool = False) -> DataParallel:
    """A mesh over ``jax.devices()``; ``batch_size`` must divide evenly among them."""
    devices = jax.device_count()
    if batch_size % devices:
      raise ValueError(f"batch_size {batch_size} must be a multiple of the device count "
                       f"{devices} ({jax.process_count()} process(es)): each device takes an "
                       "equal part of the global batch")
    # Auto axes: XLA's partitioner decides where the rest of the step's values live.
    mesh = jax.make_mesh((devices,), (DATA_AXIS,), (jax.sharding.AxisType.Auto,))
    parallel = cls(mesh, batch_size, shard_state)
    parallel.check_process_rows()
    return parallel

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(DATA_AXIS))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def shard(self) -> tuple[int, int]:
    """(index, count) of this process's part of each global batch, for ``input_pipeline.Loader``."""
    return jax.process_index(), jax.process_count()

  def check_process_rows(self):
    """Process p's devices must hold rows [p * B / n, (p + 1) * B / n) of a global batch of B.

    That is the block the input pipeline loads for it; another device order would silently
    permute the batch (and change the results).
    """
    rows = set()
    for index in self.batch_sharding.addressable_devices_indices_map((self.batch_size,)).values():
      rows.update(range(self.batch_size)[index[0]])
    local = self.batch_size // jax.process_count()
    start = jax.process_index() * local
    if rows != set(range(start, start + local)):
      raise ValueError(f"the mesh gives process {jax.process_index()} rows {sorted(rows)} of the "
                       f"batch, not the block [{start}, {start + local}) that it loads")

  def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The batch sharded over "data", from this process's rows of it."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            self.batch_sharding, x, (self.batch_size,) + x.shape[1:]), local_batch)

  def state_sharding(self, tree):
    """The shardings of a train state's arrays (a tree of arrays or ``jax.ShapeDtypeStruct``s).

    Replicated, or with ``shard_state`` ZeRO-style: each convolution kernel (rank 3 or more,
    output features last, as Flax lays them out) and its momentum split over "data" along the
    output features where the device count divides them, so each device keeps and updates one
    block of every kernel. The DFP step then quantizes each block with the whole kernel's
    exponent, all-gathers INT16 mantissas for the products, and each device receives only its
    block of the kernel's gradient (a reduce-scatter of the exact sums). The output features
    are the one kernel dimension no activation shares in the DFP convolution's sharding rule:
    a split of another would spread onto the activations' channels. Dense kernels (their
    dimensions are the activations' features), biases and BatchNorm stay replicated.
    """
    devices = self.mesh.shape[DATA_AXIS]

    def sharding(leaf):
      rank = len(leaf.shape)
      if not self.shard_state or devices == 1 or rank < 3 or leaf.shape[-1] % devices:
        return self.replicated
      return NamedSharding(self.mesh, P(*(None,) * (rank - 1), DATA_AXIS))
    return jax.tree.map(sharding, tree)

  def abstract(self, tree):
    """``jax.eval_shape``'s tree with the state's shardings (what a restore should produce)."""
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                 sharding=sharding),
                        tree, self.state_sharding(tree))
