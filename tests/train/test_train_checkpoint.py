"""Checkpoints: exact round trip, clear errors for missing or corrupt ones, nothing lost."""
import os
import pathlib

import jax
import numpy as np
import optax
import pytest

import jaxseg
from jaxseg.train import CheckpointError, Checkpointer


def _state(seed=0):
  model = jaxseg.models.build("unet", num_classes=3, features=4, depth=2)
  return jaxseg.train.create_train_state(jax.random.key(seed), model, optax.adam(1e-3),
                                         np.zeros((1, 16, 16, 3), np.float32))


def _trained_state():
  state = _state()
  step = jaxseg.train.make_train_step(jaxseg.losses.cross_entropy, donate=False)
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((2, 16, 16, 3), dtype=np.float32),
           "mask": rng.integers(0, 3, (2, 16, 16)).astype(np.int32)}
  state, _ = step(jaxseg.train.replicate_on_mesh(state, step.mesh), batch, jax.random.key(0))
  return state


def test_round_trip_restores_everything(tmp_path):
  state = _trained_state()
  ck = Checkpointer(str(tmp_path / "ck"))
  ck.save(state, rng=jax.random.key(7), data_step=1)
  ck.wait()
  restored, rng, meta = ck.restore(_state(seed=1))
  ck.close()
  assert meta["data_step"] == 1 and int(restored.step) == 1
  np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(7)))
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state, state.batch_stats)),
                  jax.tree.leaves((restored.params, restored.opt_state, restored.batch_stats))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Checkpointer(str(tmp_path / "nope"), read_only=True)
  ck = Checkpointer(str(tmp_path / "empty"))
  with pytest.raises(CheckpointError, match="no checkpoint found"):
    ck.restore(_state())
  ck.close()


def _files(root):
  return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*"))


def _three_checkpoints(directory):
  """Checkpoints of steps 1, 2, 3 (different parameters each) and their parameter leaves."""
  ck = Checkpointer(str(directory), max_to_keep=5)
  state, leaves = _trained_state(), {}
  for step in (1, 2, 3):
    state = state.replace(step=step, params=jax.tree.map(lambda x: x + 1.0, state.params))
    ck.save(state, rng=jax.random.key(step), data_step=step)
    leaves[step] = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  ck.close()
  return leaves


def _zero_array_files(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:
    p.write_bytes(b"\x00" * p.stat().st_size)


def _drop_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()


def _half_written(step_dir):
  for p in sorted(step_dir.rglob("*"), reverse=True):  # a copy that stopped after `meta`
    if "state" in p.relative_to(step_dir).parts:
      p.unlink() if p.is_file() else p.rmdir()


def _truncate_array_files(step_dir):
  for p in (step_dir / "state").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


CORRUPTIONS = {"zeroed array files": _zero_array_files, "missing _METADATA": _drop_metadata,
               "half-written step folder": _half_written,
               "truncated array files": _truncate_array_files}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_the_newest_intact_and_is_moved_aside(tmp_path, corrupt):
  leaves = _three_checkpoints(tmp_path / "ck")
  CORRUPTIONS[corrupt](tmp_path / "ck" / "3")
  bad_files = _files(tmp_path / "ck" / "3")
  ck = Checkpointer(str(tmp_path / "ck"))
  with pytest.warns(jaxseg.train.CheckpointWarning,
                    match=r"corrupt checkpoint of step 3; moved to .*ck\.corrupt/3; using step 2"):
    restored, rng, meta = ck.restore(_state())
  ck.close()
  assert meta["step"] == 2 and int(restored.step) == 2
  np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(2)))
  for a, b in zip(leaves[2], jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  # Moved aside whole, never deleted; the intact ones stay.
  assert _files(tmp_path / "ck.corrupt" / "3") == bad_files
  assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["1", "2"]


def test_read_only_restore_skips_a_corrupt_checkpoint_without_touching_it(tmp_path):
  _three_checkpoints(tmp_path / "ck")
  _zero_array_files(tmp_path / "ck" / "3")
  before = _files(tmp_path)
  ck = Checkpointer(str(tmp_path / "ck"), read_only=True)
  with pytest.warns(jaxseg.train.CheckpointWarning, match="step 3; using step 2"):
    _, _, meta = ck.restore(_state())
  assert meta["step"] == 2
  with pytest.raises(CheckpointError, match=r"/3 is corrupt"):  # asked for by number: no fallback
    ck.restore(_state(), step=3)
  ck.close()
  assert _files(tmp_path) == before


def test_every_checkpoint_corrupt_is_a_clear_error(tmp_path):
  ck = Checkpointer(str(tmp_path / "ck"))
  ck.save(_trained_state(), rng=jax.random.key(0), data_step=1)
  ck.close()
  _zero_array_files(tmp_path / "ck" / "1")
  ck = Checkpointer(str(tmp_path / "ck"), read_only=True)
  with pytest.warns(jaxseg.train.CheckpointWarning, match="no older checkpoint is left"):
    with pytest.raises(CheckpointError, match="every checkpoint in .* is corrupt"):
      ck.restore(_state())
  ck.close()


def test_checkpoint_of_another_model_is_refused_and_not_moved(tmp_path):
  ck = Checkpointer(str(tmp_path / "ck"))
  ck.save(_trained_state(), rng=jax.random.key(0), data_step=1)
  ck.close()
  before = _files(tmp_path)
  other = jaxseg.train.create_train_state(
      jax.random.key(0), jaxseg.models.build("unet", num_classes=3, features=8, depth=2),
      optax.adam(1e-3), np.zeros((1, 16, 16, 3), np.float32))
  ck = Checkpointer(str(tmp_path / "ck"))
  with pytest.raises(jaxseg.train.CheckpointMismatchError,
                     match=r"another model or optimizer.*arrays differ in shape \(params/\S+: "
                           r"saved \(\d+,\) vs model \(\d+,\)"):
    ck.restore(other)
  ck.close()
  assert _files(tmp_path) == before


def _fail_json_writes(monkeypatch):
  """Make the next checkpoint write fail as a full disk does, in orbax's background commit."""
  import errno
  import orbax.checkpoint as ocp

  async def no_space(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", no_space)


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous_one(tmp_path,
                                                                             monkeypatch):
  state = _trained_state()
  ck = Checkpointer(str(tmp_path / "ck"), max_to_keep=1)
  ck.save(state, rng=jax.random.key(0), data_step=1)
  ck.wait()
  _fail_json_writes(monkeypatch)
  with pytest.raises(CheckpointError, match=r"step 2 failed .*No space left.*previous checkpoint "
                                            r"\(step 1\) .* is intact; the disk is full"):
    ck.save(state.replace(step=2), rng=jax.random.key(0), data_step=2)
    ck.wait()
  monkeypatch.undo()
  ck.close()
  ck = Checkpointer(str(tmp_path / "ck"), read_only=True)
  restored, _, meta = ck.restore(_state())
  ck.close()
  assert meta["step"] == 1 and int(restored.step) == 1
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
