"""Meshes and moving host data onto (possibly multi-host) devices."""
import collections
import warnings
from typing import Callable, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D data-parallel mesh over ``devices`` (default: every device of every host)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate_on_mesh(tree, mesh: Mesh):
  """Place a pytree on every device of ``mesh`` as global arrays of the same shapes.

  For the jit step (which does this itself for a state that is not yet on the mesh). Unlike
  ``jaxseg.train.pmap_replicate`` no axis is added. Every process must hold the same values.
  """
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def replicate(tree, mesh: Mesh):
  """Deprecated name of :func:`replicate_on_mesh`."""
  warnings.warn("jaxseg.train.replicate is now replicate_on_mesh (pmap_replicate adds a device "
                "axis for the pmap step)", DeprecationWarning, stacklevel=2)
  return replicate_on_mesh(tree, mesh)


def shard_batch(batch, mesh: Mesh):
  """Turn this process's slice of the global batch into global arrays sharded on ``data``.

  Each process passes its own ``[B_local, ...]`` arrays; the result has leading size
  ``B_local * process_count``. ``B_local`` must be divisible by the local device count.
  Arrays that already carry the data sharding pass through.
  """
  sharding = data_sharding(mesh)
  n_local = len(mesh.local_devices)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % n_local:
      raise ValueError(
          f"per-process batch size {x.shape[0] if x.ndim else '(scalar)'} is not divisible by "
          f"the {n_local} local devices of the mesh")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)


def prefetch_to_device(batches: Iterable, mesh: Mesh, size: int = 2,
                       check: Optional[Callable] = None) -> Iterator:
  """Yield ``shard_batch(b, mesh)`` for each host batch ``b``, keeping ``size`` batches ahead.

  Transfers are asynchronous, so the next batches travel to the devices while the current
  step runs. ``check(b)`` (e.g. ``validate_batch`` with the class count) runs on each host
  batch before it is sent, so errors still name the bad batch.
  """
  if size < 1:
    raise ValueError(f"prefetch size must be >= 1, got {size}")
  it = iter(batches)
  queue = collections.deque()

  def enqueue():
    batch = next(it)
    if check is not None:
      check(batch)
    queue.append(shard_batch(batch, mesh))

  for _ in range(size):
    try:
      enqueue()
    except StopIteration:
      break
  while queue:
    out = queue.popleft()
    try:
      enqueue()
    except StopIteration:
      pass
    yield out


def to_local_numpy(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, as NumPy, in order."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    key = s.index[0].start
    if key not in seen:
      seen.add(key)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows, axis=0)
