"""Orbax checkpoints holding everything an exact resume needs.

A checkpoint has two items: ``state`` (params, BatchNorm statistics, optimizer state and
step, saved as a sharded PyTree) and ``meta`` (JSON: the base RNG key, the data position
and free-form run information). Saving is asynchronous; the last ``max_to_keep`` are kept.

Orbax writes each step into a temporary folder and renames it when complete, so a process
killed mid-save leaves at most a temporary folder, removed by the next writable
``Checkpointer``. A step folder that is nevertheless unreadable (a zeroed or truncated array
file, a missing metadata file, a half-copied folder) is skipped by :meth:`Checkpointer.restore`
with a :class:`CheckpointWarning` naming it; a writable checkpointer moves it aside into
``<directory>.corrupt/`` (never deletes it), a read-only one leaves it where it is. A checkpoint
whose arrays have other names or shapes than the model's (another model or optimizer) is not
corruption: it raises :class:`CheckpointMismatchError` and nothing is moved.
"""
import errno
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt or does not match the model, or a save failed."""


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint holds another model's or optimizer's arrays."""


class CheckpointWarning(UserWarning):
  """A corrupt checkpoint was skipped (and moved aside) in favour of an older one."""


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree) -> Dict[str, Tuple[int, ...]]:
  """``{"params/conv/kernel": shape, ...}`` of a pytree or an orbax metadata tree."""
  return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()) or ())
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def describe_mismatch(saved: Dict[str, tuple], wanted: Dict[str, tuple], limit: int = 6) -> str:
  """Text naming the arrays missing, unexpected or mis-shaped between two ``_shapes`` dicts."""
  def order(names):  # parameters first: they say the most about which model it is
    return sorted(names, key=lambda k: (not k.startswith("params"), k))
  missing = order(set(wanted) - set(saved))
  unexpected = order(set(saved) - set(wanted))
  shaped = order(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
  parts = []
  if missing:
    parts.append(f"{len(missing)} arrays of the model are not in it ({', '.join(missing[:limit])})")
  if unexpected:
    parts.append(f"{len(unexpected)} arrays in it are not in the model "
                 f"({', '.join(unexpected[:limit])})")
  if shaped:
    parts.append(f"{len(shaped)} arrays differ in shape (" + ", ".join(
        f"{k}: saved {saved[k]} vs model {wanted[k]}" for k in shaped[:limit]) + ")")
  return "; ".join(parts)


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
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save,
        # Temporary folders of a save that was killed hold nothing a resume can use.
        cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))
    self._saving: Optional[int] = None

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
    self._raise_save_errors()  # a failure of the previous (asynchronous) save stops here
    self._saving = step
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # noqa: BLE001 - one clear error for every storage failure
      self._save_failed(step, e)
    if not saved:
      self._saving = None
    return saved

  def _raise_save_errors(self):
    """Surface the error of a pending asynchronous save (and wait for it to finish)."""
    if self._saving is None:
      return
    step = self._saving
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._save_failed(step, e)
    self._saving = None

  def _save_failed(self, step: int, error: Exception):
    self._saving = None
    # The failed step's partial temporary folder is never taken for a checkpoint (orbax
    # renames only complete saves); the next run's Checkpointer removes it.
    self.manager.reload()
    steps = [s for s in self.all_steps() if s != step]
    kept = (f"the previous checkpoint (step {max(steps)}) in {self.directory} is intact"
            if steps else f"no earlier checkpoint exists in {self.directory}")
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or "No space left" in str(error)
    hint = ("the disk is full: free space (or point --workdir elsewhere) and rerun the same "
            "command to resume" if full else "fix the cause and rerun the same command to resume")
    raise CheckpointError(f"saving the checkpoint of step {step} failed "
                          f"({type(error).__name__}: {str(error)[:300]}); {kept}; {hint}") from error

  def read_meta(self, step: int) -> Dict[str, Any]:
    """The JSON metadata of ``step`` alone (no arrays are read)."""
    try:
      return dict(self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint at {self.directory / str(step)} has unreadable "
                            f"metadata ({type(e).__name__}: {str(e)[:300]})") from e

  def _state_shapes(self, step: int) -> Dict[str, tuple]:
    """Names and shapes of the arrays saved at ``step`` (reads only orbax's metadata)."""
    handler = ocp.StandardCheckpointHandler()
    metadata = handler.metadata(self.directory / str(step) / "state")
    return _shapes(getattr(metadata, "tree", metadata))

  def _restore_step(self, target_state, step: int):
    path = self.directory / str(step)
    try:
      saved = self._state_shapes(step)
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable metadata
      raise CheckpointError(f"checkpoint at {path} is corrupt: its array metadata cannot be "
                            f"read ({type(e).__name__}: {str(e)[:300]})") from e
    mismatch = describe_mismatch(saved, _shapes(target_state))
    if mismatch:
      raise CheckpointMismatchError(
          f"checkpoint at {path} holds another model or optimizer than the one configured: "
          f"{mismatch}. Use a new --workdir for a different model")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target_state)), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - orbax raises many types; one clear message.
      raise CheckpointError(f"checkpoint at {path} is corrupt: "
                            f"{type(e).__name__}: {str(e)[:300]}") from e
    meta = dict(restored["meta"])
    try:
      rng = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32),
                                     impl=meta.get("rng_impl", "threefry2x32"))
    except (KeyError, ValueError, TypeError) as e:
      raise CheckpointError(f"checkpoint at {path} is corrupt: unreadable metadata ({e})") from e
    return restored["state"], rng, meta

  def _set_aside(self, step: int) -> Optional[str]:
    """Move the step folder into ``<directory>.corrupt/``; returns the new path."""
    if self.read_only or jax.process_index() != 0:
      return None
    aside = epath.Path(str(self.directory) + ".corrupt")
    aside.mkdir(parents=True, exist_ok=True)
    target, n = aside / str(step), 1
    while target.exists():
      target, n = aside / f"{step}-{n}", n + 1
    os.replace(os.fspath(self.directory / str(step)), os.fspath(target))
    self.manager.reload()
    return os.fspath(target)

  def restore(self, target_state, step: Optional[int] = None) -> Tuple[Any, jax.Array, Dict]:
    """Restore into the structure (and shardings) of ``target_state``.

    Args:
      target_state: a state of the configured model and optimizer (values unused).
      step: the step to restore; None means the newest intact checkpoint. Newer corrupt
        ones are skipped with a :class:`CheckpointWarning` naming them and, unless read-only,
        moved into ``<directory>.corrupt/``.

    Returns:
      (state, base rng key, meta dict); ``meta["step"]`` is the step restored.

    Raises:
      CheckpointMismatchError: the checkpoint holds arrays of another model/optimizer.
      CheckpointError: no checkpoint, the requested step is corrupt, or every one is.
    """
    if step is not None:
      if step not in self.all_steps():
        raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; it holds "
                              f"steps {self.all_steps()}")
      return self._restore_step(target_state, step)
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    bad: List[str] = []
    for s in steps:
      try:
        return self._restore_step(target_state, s)
      except CheckpointMismatchError:
        raise
      except CheckpointError as e:
        moved = self._set_aside(s)
        where = f"; moved to {moved}" if moved else ""
        older = [t for t in steps if t < s]
        then = f"using step {older[0]} instead" if older else "no older checkpoint is left"
        warnings.warn(f"skipping the corrupt checkpoint of step {s}{where}; {then}. {e}",
                      CheckpointWarning, stacklevel=2)
        bad.append(str(self.directory / str(s)))
    raise CheckpointError(f"every checkpoint in {self.directory} is corrupt ({', '.join(bad)})"
                          "; delete the workdir's checkpoints or use a new --workdir to start over")

  def wait(self):
    """Block until pending saves finish; raises :class:`CheckpointError` if one failed."""
    self._raise_save_errors()
    self.manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")
