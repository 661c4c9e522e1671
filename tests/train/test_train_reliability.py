"""Crash safety of a training run: SIGKILL at any moment, corrupt checkpoints, another model's
workdir, a full disk. Every test checks that no work on disk is lost."""
import errno
import hashlib
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxseg.configs import unet_shapes
from jaxseg.train import CheckpointError, CheckpointWarning, loop

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOKE = f"{REPO}/jaxseg/configs/unet_shapes.py:smoke"


def _smoke(data_dir, **over):
  config = unet_shapes.get_config("smoke")
  config.data_dir = data_dir
  config.update(dict(eval_every=1000, log_every=2, **over))
  return config


def _tree_digest(root: pathlib.Path) -> dict:
  """{relative path: sha1 of the bytes} of every file under ``root``."""
  return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_states_equal(a, b):
  leaves_a = jax.tree.leaves((a.params, a.batch_stats, a.opt_state, a.step))
  leaves_b = jax.tree.leaves((b.params, b.batch_stats, b.opt_state, b.step))
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
  """An uninterrupted 6-step run checkpointed every 2 steps, and its final state."""
  workdir = tmp_path_factory.mktemp("straight")
  loop.train_and_evaluate(_smoke(data_dir, num_steps=6, checkpoint_every=2), str(workdir))
  return workdir, loop.restore_run(str(workdir)).state


def test_corrupt_latest_checkpoint_resumes_from_the_intact_one_exactly(tmp_path, data_dir,
                                                                       straight, capsys):
  config = _smoke(data_dir, num_steps=6, checkpoint_every=2)
  loop.train_and_evaluate(config, str(tmp_path), stop_at_step=4)
  ckpts = tmp_path / "checkpoints"
  for p in (ckpts / "4" / "state").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.write_bytes(b"\x00" * p.stat().st_size)
  bad = _tree_digest(ckpts / "4")
  with pytest.warns(CheckpointWarning, match=r"corrupt checkpoint of step 4; moved to "
                                             r".*checkpoints\.corrupt/4; using step 2"):
    loop.train_and_evaluate(config, str(tmp_path))
  assert "Resumed from" in capsys.readouterr().out
  assert _tree_digest(tmp_path / "checkpoints.corrupt" / "4") == bad  # moved, byte for byte
  # Steps 3-6 were trained again from step 2: the same result as the uninterrupted run.
  _assert_states_equal(loop.restore_run(str(tmp_path)).state, straight[1])


def test_eval_skips_a_corrupt_checkpoint_and_says_which_step_it_evaluated(tmp_path, data_dir,
                                                                          capsys):
  config = _smoke(data_dir, num_steps=4, checkpoint_every=2)
  loop.train_and_evaluate(config, str(tmp_path), stop_at_step=4)
  (tmp_path / "checkpoints" / "4" / "state" / "_METADATA").unlink()
  before = _tree_digest(tmp_path / "checkpoints")
  with pytest.warns(CheckpointWarning, match="corrupt checkpoint of step 4; using step 2"):
    summary = loop.evaluate_workdir(str(tmp_path))
  assert "Evaluated checkpoint step 2" in capsys.readouterr().out
  assert 0 <= summary["miou"] <= 1
  assert _tree_digest(tmp_path / "checkpoints") == before  # eval never moves or deletes


def test_workdir_of_another_model_is_refused_naming_both(tmp_path, data_dir, straight):
  workdir = straight[0]
  before = _tree_digest(workdir)
  other = _smoke(data_dir, num_steps=6, checkpoint_every=2)
  other.model_kwargs.features = 4
  with pytest.raises(ValueError, match=r"holds checkpoints of another configuration "
                                       r"\(model_kwargs: .*'features': 8.* there vs "
                                       r".*'features': 4.* here\).*new --workdir"):
    loop.train_and_evaluate(other, str(workdir))
  assert _tree_digest(workdir) == before  # config.json and every checkpoint untouched
  # remat and dtype do not change the arrays: such a run may resume there.
  assert loop.model_identity(_smoke(data_dir, dtype="bfloat16")) == loop.model_identity(
      _smoke(data_dir))


def test_checkpoints_without_config_of_another_model_are_refused(tmp_path, data_dir, straight):
  workdir = tmp_path / "run"
  import shutil
  shutil.copytree(straight[0] / "checkpoints", workdir / "checkpoints")
  before = _tree_digest(workdir)
  other = _smoke(data_dir, num_steps=6, checkpoint_every=2)
  other.model_kwargs.features = 4
  with pytest.raises(CheckpointError, match="holds another model or optimizer"):
    loop.train_and_evaluate(other, str(workdir))
  assert _tree_digest(workdir) == before  # not moved aside as "corrupt", no config written


def test_disk_full_while_saving_stops_with_a_clear_error(tmp_path, data_dir, monkeypatch):
  real_save = ocp.JsonCheckpointHandler._save_fn

  async def full_from_step_4(self, item, directory, *args, **kwargs):
    if item.get("step", 0) >= 4:
      raise OSError(errno.ENOSPC, "No space left on device")
    return await real_save(self, item, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_from_step_4)
  config = _smoke(data_dir, num_steps=8, checkpoint_every=2, keep_checkpoints=1)
  with pytest.raises(CheckpointError, match=r"checkpoint of step 4 failed .*No space left.*"
                                            r"previous checkpoint \(step 2\).*is intact"):
    loop.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  assert loop.restore_run(str(tmp_path)).step == 2


@pytest.mark.parametrize("change, error, message", [
    (dict(model="unett"), ValueError, r"unknown model 'unett'"),
    (dict(loss="cross_entropyy"), ValueError, r"cross_entropyy"),
    (dict(batch_size=0), ValueError, r"config.batch_size must be an integer >= 1, got 0"),
    (dict(checkpoint_every=-1), ValueError, r"config.checkpoint_every must be"),
], ids=["model", "loss", "batch", "interval"])
def test_a_run_that_fails_to_start_writes_nothing(tmp_path, data_dir, change, error, message):
  with pytest.raises(error, match=message):
    loop.train_and_evaluate(_smoke(data_dir, **change), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# SIGKILL at random moments, with bit-exact resume
# ---------------------------------------------------------------------------------------------

def _train_cmd(workdir, data_dir):
  return ([sys.executable, str(REPO / "train.py"), f"--config={SMOKE}", f"--workdir={workdir}",
           f"--config.data_dir={data_dir}", "--config.num_steps=24",
           "--config.checkpoint_every=3", "--config.eval_every=1000", "--config.log_every=3"])


def _env(cache_dir):
  # A private compilation cache: restarts skip most of the compile, as a real resume does.
  return dict(os.environ, PYTHONPATH=str(REPO), JAXSEG_CACHE_DIR=str(cache_dir))


def _saving(ckpt_dir: pathlib.Path) -> bool:
  return ckpt_dir.is_dir() and any("tmp" in p.name for p in ckpt_dir.iterdir())


def _run_and_kill(cmd, env, ckpt_dir: pathlib.Path, when: str, rng: random.Random) -> str:
  """Start ``cmd`` and SIGKILL it: ``when="saving"`` the moment an asynchronous save's temporary
  folder appears, ``"random"`` at a random time after the first checkpoint exists. Returns
  what happened: "killed while saving", "killed" or "finished"."""
  proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  delay = None
  while proc.poll() is None and time.time() < deadline:
    if when == "saving" and _saving(ckpt_dir):
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return "killed while saving"
    if when == "random" and delay is None and ckpt_dir.is_dir() and any(
        p.name.isdigit() for p in ckpt_dir.iterdir()):
      delay = time.time() + rng.uniform(0.0, 0.6)
    if delay is not None and time.time() >= delay:
      saving = _saving(ckpt_dir)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return "killed while saving" if saving else "killed"
    time.sleep(0.002)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return "finished"


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path, data_dir):
  env = _env(tmp_path / "xla-cache")
  straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
  r = subprocess.run(_train_cmd(straight_dir, data_dir), cwd=str(REPO), env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]

  rng = random.Random(0)
  cmd = _train_cmd(killed_dir, data_dir)
  ckpt_dir = killed_dir / "checkpoints"
  outcomes = [_run_and_kill(cmd, env, ckpt_dir, when, rng)
              for when in ("saving", "random", "saving", "random")]
  assert outcomes.count("killed while saving") >= 1, outcomes
  assert sum(o.startswith("killed") for o in outcomes) >= 3, outcomes
  r = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from" in r.stdout

  a, b = loop.restore_run(str(straight_dir)), loop.restore_run(str(killed_dir))
  assert a.step == b.step == 24
  _assert_states_equal(a.state, b.state)
  # Nothing half-written is left behind: no temporary folders, nothing set aside as corrupt.
  assert not _saving(ckpt_dir)
  assert not (killed_dir / "checkpoints.corrupt").exists()
