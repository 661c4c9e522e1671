"""Process set-up that must happen before JAX starts its backends.

``configure(config)`` (called by ``train.py`` and ``eval.py`` before anything touches a device):

* **Host devices.** ``config.host_devices`` splits the CPU into that many XLA devices
  (``--xla_force_host_platform_device_count``) and the jitted step shards the batch over them
  as over GPUs; ``"auto"`` takes the largest divisor of the per-process train and eval batch
  sizes not above the usable cores. The default is 1: on the 2-core development machine two
  devices ran the benchmark's batch-2 steps at 0.55-0.71x the one-device speed (README:
  measured figures), XLA's own thread pool already filling the cores. The flag only shapes
  the CPU platform: on a GPU or TPU machine nothing changes.
* **Persistent compilation cache.** Compiled programs are stored under
  ``config.compilation_cache`` (default ``~/.cache/jaxseg/xla``, ``$JAXSEG_CACHE_DIR`` overrides;
  ``""`` disables), so a second run of a recipe (resume, eval) loads instead of recompiling.
"""
import os
from typing import Optional

HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def default_cache_dir() -> str:
  """``$JAXSEG_CACHE_DIR`` or ``~/.cache/jaxseg/xla``."""
  return os.environ.get("JAXSEG_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
      "jaxseg", "xla")


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def host_device_count(batch_sizes, requested="auto", cores: Optional[int] = None) -> int:
  """How many host (CPU) devices to split the step over.

  Args:
    batch_sizes: per-process batch sizes that every device must divide (train, eval).
    requested: ``"auto"`` (largest common divisor of ``batch_sizes`` not above ``cores``) or a
      positive int (used as given; it must divide every batch size).
    cores: usable cores (default: this process's CPU affinity).

  Raises:
    ValueError: a requested count that is not a positive int or does not divide a batch size.
  """
  sizes = [int(b) for b in batch_sizes if b]
  if requested != "auto":
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
      raise ValueError(f"host_devices must be 'auto' or a positive int, got {requested!r}")
    bad = [b for b in sizes if b % requested]
    if bad:
      raise ValueError(f"host_devices={requested} does not divide the batch size(s) {bad}")
    return requested
  cores = usable_cores() if cores is None else cores
  for n in range(max(1, cores), 0, -1):
    if all(b % n == 0 for b in sizes):
      return n
  return 1


def set_host_device_count(n: int) -> int:
  """Add ``--xla_force_host_platform_device_count=n`` to ``XLA_FLAGS`` (before backends start).

  A count the user already put in ``XLA_FLAGS`` is kept. Returns the count in effect.

  Raises:
    RuntimeError: JAX's backends are already initialised (the flag would be ignored).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  for tok in flags.split():
    if tok.startswith(HOST_DEVICE_FLAG + "="):
      return int(tok.split("=", 1)[1])
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("set_host_device_count must run before JAX initialises its backends "
                       "(before the first jax.devices() or computation)")
  os.environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICE_FLAG}={n}".strip()
  return n


def enable_compilation_cache(path: Optional[str] = None) -> Optional[str]:
  """Turn on JAX's persistent compilation cache in ``path`` (default ``default_cache_dir()``).

  ``path=""`` leaves it off. Returns the directory used, or None.
  """
  import jax
  path = default_cache_dir() if path is None else path
  if not path:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def configure(config, num_processes: int = 1) -> dict:
  """Host devices and compilation cache for a run of ``config`` (see the module docstring).

  Reads ``config.host_devices`` ("auto" | int, default 1), ``config.batch_size``,
  ``config.eval_batch_size`` (global sizes, divided by ``num_processes``) and
  ``config.compilation_cache`` (path | "" | None for the default). The host device count is
  left alone when the backends already started (an interactive session).
  Returns what was set: ``{"host_devices": n or None, "compilation_cache": dir or None}``.
  """
  sizes = [config.get("batch_size", 0) // num_processes,
           config.get("eval_batch_size", 0) // num_processes]
  n = host_device_count(sizes, config.get("host_devices", 1))
  out = {"host_devices": None, "compilation_cache": None}
  if not _backends_started():
    out["host_devices"] = set_host_device_count(n)
  out["compilation_cache"] = enable_compilation_cache(config.get("compilation_cache", None))
  return out


def _backends_started() -> bool:
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()
