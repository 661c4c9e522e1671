"""The training loop end to end: exact resume, train.py / eval.py in a subprocess."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.configs import unet_shapes
from jaxseg.train import Checkpointer, loop

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOKE = f"{REPO}/jaxseg/configs/unet_shapes.py:smoke"


def _smoke(data_dir, **over):
  config = unet_shapes.get_config("smoke")
  config.data_dir = data_dir
  config.update(over)
  return config


def _final_params(workdir):
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  config = loop.load_config(workdir)
  src = loop.load_split(config, config.train_split)
  model = loop.build_model(config, src.num_classes)
  target = loop.initial_state(config, model, config.num_steps, tuple(config.crop_size),
                              jax.random.key(0))
  state, rng, meta = ck.restore(target)
  ck.close()
  return state, meta


def assert_metrics_match_split(metrics, cm, source):
  """``metrics`` (mIoU, pixel accuracy, per-class IoU) are those of ``cm``, recomputed here, and
  ``cm`` counts every labelled (non-255) pixel of ``source`` once, in the row of its true class."""
  cm = np.asarray(cm, np.int64)
  labels = np.concatenate([np.asarray(source[i]["mask"]).ravel() for i in range(len(source))])
  np.testing.assert_array_equal(cm.sum(1), np.bincount(labels[labels != 255], minlength=len(cm)))
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  iou = np.full(len(cm), np.nan)
  iou[union > 0] = tp[union > 0] / union[union > 0]
  np.testing.assert_allclose([metrics[f"iou/{n}"] for n in source.class_names], iou)
  assert metrics["miou"] == pytest.approx(np.nanmean(iou))
  assert metrics["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())


def test_interrupted_run_resumes_exactly(tmp_path, data_dir):
  k = 4
  config = _smoke(data_dir, num_steps=2 * k, checkpoint_every=100, eval_every=100, log_every=2)
  straight = tmp_path / "straight"
  loop.train_and_evaluate(config, str(straight))
  resumed = tmp_path / "resumed"
  assert loop.train_and_evaluate(config, str(resumed), stop_at_step=k) == {}
  assert Checkpointer(str(resumed / "checkpoints"), read_only=True).latest_step() == k
  loop.train_and_evaluate(config, str(resumed))
  a, meta_a = _final_params(str(straight))
  b, meta_b = _final_params(str(resumed))
  assert meta_a["step"] == meta_b["step"] == 2 * k
  leaves_a = jax.tree.leaves((a.params, a.batch_stats, a.opt_state))
  leaves_b = jax.tree.leaves((b.params, b.batch_stats, b.opt_state))
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # A run that stopped after k steps differs from the full run: the comparison has teeth.
  init = loop.initial_state(config, loop.build_model(config, 5), config.num_steps,
                            tuple(config.crop_size), jax.random.key(0))
  assert any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(init.params)))
  assert "tensorflow" not in sys.modules


def _run(script, *args, env_extra=None):
  env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
  return subprocess.run([sys.executable, str(REPO / script), *args], cwd=str(REPO), env=env,
                        capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_train_and_eval_scripts_end_to_end(tmp_path, data_dir):
  workdir = tmp_path / "run"
  r = _run("train.py", f"--config={SMOKE}", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
           "--config.num_steps=40")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mIoU" in r.stdout and "background" in r.stdout
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [l["train/loss"] for l in lines if "train/loss" in l]
  assert len(losses) >= 4 and np.mean(losses[-2:]) < np.mean(losses[:2])
  assert any("val/miou" in l for l in lines)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "validation_overlays.png").stat().st_size > 0
  assert (workdir / "checkpoints" / "40").is_dir()

  r = _run("eval.py", f"--workdir={workdir}", "--split=train")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "train split" in r.stdout and "mIoU" in r.stdout
  result = json.loads((workdir / "eval_train_metrics.json").read_text())
  config = loop.load_config(str(workdir))
  assert len(result["confusion_matrix"]) == 5
  assert_metrics_match_split(result, result["confusion_matrix"], loop.load_split(config, "train"))
  assert (workdir / "eval_train_overlays.png").is_file()

  # DeepLab-style dense-CRF post-processing, switched on from the command line.
  r = _run("eval.py", f"--workdir={workdir}", "--config.crf.enabled=True",
           "--config.crf.iterations=3")
  assert r.returncode == 0, r.stderr[-3000:]
  crf = json.loads((workdir / "eval_validation_metrics.json").read_text())
  validation = loop.load_split(config, "validation")
  assert_metrics_match_split(crf, crf["confusion_matrix"], validation)
  # The same checkpoint scored without CRF at the end of training: same pixels, other predictions.
  plain = json.loads((workdir / "validation_metrics.json").read_text())
  assert_metrics_match_split(plain, plain["confusion_matrix"], validation)
  assert not np.array_equal(crf["confusion_matrix"], plain["confusion_matrix"])


def test_eval_without_workdir_is_a_clear_error(tmp_path):
  r = _run("eval.py", f"--workdir={tmp_path / 'missing'}")
  assert r.returncode != 0
  assert "does not exist" in r.stderr and "train first" in r.stderr


def test_eval_of_a_workdir_without_checkpoints(tmp_path, data_dir):
  loop.save_config(_smoke(data_dir), str(tmp_path))
  with pytest.raises(Exception, match="does not exist|no checkpoint"):
    loop.evaluate_workdir(str(tmp_path))


def test_diverged_run_stops_and_keeps_the_finite_checkpoint(tmp_path, data_dir, monkeypatch):
  from jaxseg.losses import cross_entropy

  def nan_from_step_5(logits, batch, *, step):
    # Declaring `step` makes the train step pass state.step (the batch carries data only).
    ce = cross_entropy(logits, batch)
    return jnp.where(step >= 5, jnp.nan, ce)

  monkeypatch.setattr(loop, "build_loss", lambda config, src=None: nan_from_step_5)
  config = _smoke(data_dir, num_steps=12, checkpoint_every=4, eval_every=100, log_every=100)
  with pytest.raises(FloatingPointError, match=r"step 8: .*last checkpoint \(step 4\)"):
    loop.train_and_evaluate(config, str(tmp_path))
  ck = Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
  assert ck.all_steps() == [4]
  ck.close()
  state, _ = _final_params(str(tmp_path))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
