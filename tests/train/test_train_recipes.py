"""Every recipe's config loads, and the real-data recipes train a few steps end to end."""
import importlib
import json

import pytest

from jaxseg.train import loop
from tests.train.test_train_loop import assert_metrics_match_split

RECIPES = ["unet_shapes", "segnet_camvid", "unet_isbi2012", "deeplabv3plus_camvid", "pspnet_camvid"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_variants_load(name):
  module = importlib.import_module(f"jaxseg.configs.{name}")
  full = module.get_config()
  assert full.num_steps > 0 and full.batch_size > 0
  for variant in ("smoke",) + (("cpu",) if name != "unet_shapes" else ()):
    small = module.get_config(variant)
    assert small.num_steps < full.num_steps
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("nope")


@pytest.mark.parametrize("name, classes, fixture", [
    ("segnet_camvid", 11, "camvid_dir"),
    ("deeplabv3plus_camvid", 11, "camvid_dir"),
    ("pspnet_camvid", 11, "camvid_dir"),
    ("unet_isbi2012", 2, "isbi_dir"),
])
def test_real_data_recipe_smoke(name, classes, fixture, request, tmp_path):
  request.getfixturevalue(fixture)  # skips with a reason when the shared data is absent
  config = importlib.import_module(f"jaxseg.configs.{name}").get_config("smoke")
  config.data_dir = str(tmp_path / "tfds")
  summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert len([k for k in summary if k.startswith("iou/")]) == classes
  saved = json.loads((tmp_path / "run" / f"{config.eval_split}_metrics.json").read_text())
  assert_metrics_match_split(summary, saved["confusion_matrix"],
                             loop.load_split(config, config.eval_split))
  assert (tmp_path / "run" / "validation_overlays.png").is_file()
