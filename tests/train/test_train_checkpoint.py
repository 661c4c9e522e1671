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
  state, _ = step(jaxseg.train.replicate(state, step.mesh), batch, jax.random.key(0))
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


def test_corrupt_checkpoint_is_a_clear_error_and_files_survive(tmp_path):
  ck = Checkpointer(str(tmp_path / "ck"))
  ck.save(_trained_state(), rng=jax.random.key(0), data_step=1)
  ck.close()
  files = [p for p in (tmp_path / "ck" / "1" / "state").rglob("*") if p.is_file()
           and p.stat().st_size > 0 and "metadata" not in p.name]
  assert files
  for p in files:
    p.write_bytes(b"\x00garbage" * 4)
  before = sorted(str(p) for p in (tmp_path / "ck").rglob("*"))
  ck = Checkpointer(str(tmp_path / "ck"), read_only=True)
  with pytest.raises(CheckpointError, match="corrupt or does not match"):
    ck.restore(_state())
  ck.close()
  assert sorted(str(p) for p in (tmp_path / "ck").rglob("*")) == before


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
  ck = Checkpointer(str(tmp_path / "ck"))
  ck.save(_trained_state(), rng=jax.random.key(0), data_step=1)
  ck.close()
  other = jaxseg.train.create_train_state(
      jax.random.key(0), jaxseg.models.build("unet", num_classes=3, features=8, depth=2),
      optax.adam(1e-3), np.zeros((1, 16, 16, 3), np.float32))
  ck = Checkpointer(str(tmp_path / "ck"), read_only=True)
  with pytest.raises(CheckpointError, match="corrupt or does not match"):
    ck.restore(other)
  ck.close()
