"""Mask R-CNN end to end through train.py's loop and eval.py's path: the shapes recipe's smoke
variant and a COCO-format folder, scored by COCO AP with instance overlays."""
import json
import pathlib

import numpy as np
import pytest

from jaxseg.configs import maskrcnn_shapes
from jaxseg.train import loop

COCO_FIXTURE = pathlib.Path(__file__).parents[1] / "data" / "fixtures" / "coco_tiny"
HEADLINE = ("box_AP", "box_AP50", "mask_AP", "mask_AP50")


@pytest.mark.slow
def test_shapes_smoke_recipe_trains_evaluates_and_reevaluates(tmp_path):
  config = maskrcnn_shapes.get_config("smoke")
  config.data_dir = str(tmp_path / "tfds")
  workdir = tmp_path / "run"
  summary = loop.train_and_evaluate(config, str(workdir))
  for key in HEADLINE:
    assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
  saved = json.loads((workdir / "validation_metrics.json").read_text())
  assert {k: saved[k] for k in HEADLINE} == {k: summary[k] for k in HEADLINE}
  assert saved["class_names"][0] == "background"
  assert (workdir / "validation_overlays.png").is_file()
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(l["train/loss"]) for l in lines if "train/loss" in l)
  # eval.py's path restores the checkpoint and scores the same split identically.
  again = loop.evaluate_workdir(str(workdir))
  assert {k: again[k] for k in HEADLINE} == {k: summary[k] for k in HEADLINE}
  assert (workdir / "eval_validation_overlays.png").is_file()


def test_recipe_variants_load():
  full = maskrcnn_shapes.get_config()
  assert full.model == "maskrcnn" and full.loss == "maskrcnn_loss"
  assert maskrcnn_shapes.get_config("smoke").num_steps < full.num_steps
  with pytest.raises(ValueError, match="unknown variant"):
    maskrcnn_shapes.get_config("nope")


@pytest.mark.slow
def test_coco_format_folder_trains_a_step(tmp_path):
  config = maskrcnn_shapes.get_config("smoke")
  config.dataset = "coco"
  config.data_dir = str(tmp_path / "tfds")
  config.builder_kwargs = dict(manual_dir=str(COCO_FIXTURE), max_instances=8)
  config.crop_size = (64, 64)  # the 40x56 images are padded (valid = False) to the canvas
  config.batch_size = config.eval_batch_size = 2  # the fixture has 3 train images
  config.num_steps = 2
  config.log_every = config.eval_every = config.checkpoint_every = 2
  summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
  for key in HEADLINE:
    assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
