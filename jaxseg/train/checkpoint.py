"""Orbax checkpoints holding everything an exact resume needs.

A checkpoint has two items: ``state`` (params, BatchNorm statistics, optimizer state and
step, saved as a sharded PyTree) and ``meta`` (JSON: the base RNG key, the data position
and free-form run information). Saving is asynchronous; the last ``max_to_keep`` are kept.
"""
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt or does not match the model."""


def _abstract(tree):
  def spec(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.tree.map(spec, tree)


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for train states.

  Args:
    directory: where step folders are written (created if missing unless ``read_only``).
    max_to_keep: how many of the latest checkpoints survive.
    async_save: save in a background thread (``wait()`` blocks until done).
    read_only: for evaluation: never creates or deletes anything on disk.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = epath.Path(directory).absolute()
    if read_only and not self.directory.exists():
      raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, state, *, rng: jax.Array, data_step: int, extra: Optional[Dict] = None,
           force: bool = False) -> bool:
    """Save ``state`` at ``state.step`` with the base RNG key and the data position."""
    step = int(jax.device_get(state.step))
    meta = {"step": step, "data_step": int(data_step),
            "rng": np.asarray(jax.random.key_data(rng)).tolist(),
            "rng_impl": str(jax.random.key_impl(rng)), **(extra or {})}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, target_state, step: Optional[int] = None) -> Tuple[Any, jax.Array, Dict]:
    """Restore into the structure (and shardings) of ``target_state``.

    Returns:
      (state, base rng key, meta dict).

    Raises:
      CheckpointError: no checkpoint, or one that is corrupt or does not fit the model.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    path = self.directory / str(step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target_state)), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; the caller needs one clear message.
      raise CheckpointError(
          f"checkpoint at {path} is corrupt or does not match the model/optimizer: "
          f"{type(e).__name__}: {str(e)[:500]}") from e
    meta = dict(restored["meta"])
    try:
      rng = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32),
                                     impl=meta.get("rng_impl", "threefry2x32"))
    except (KeyError, ValueError, TypeError) as e:
      raise CheckpointError(f"checkpoint at {path} has unreadable metadata: {e}") from e
    return restored["state"], rng, meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")
