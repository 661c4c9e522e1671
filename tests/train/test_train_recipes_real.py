"""The VOC 2012 and Cityscapes recipes: their configs load, and their smoke variants train two
steps end to end on tiny folders written in the datasets' layouts."""
import importlib
import json

import pytest

from jaxseg.train import loop
from tests.data.test_data_cityscapes import write_cityscapes_fixture
from tests.data.test_data_voc2012 import write_voc_fixture
from tests.train.test_train_loop import assert_metrics_match_split

RECIPES = ["deeplabv3plus_voc_scribbles", "pspnet_cityscapes"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_variants_load(name):
  module = importlib.import_module(f"jaxseg.configs.{name}")
  full = module.get_config()
  smoke = module.get_config("smoke")
  assert 0 < smoke.num_steps < full.num_steps and full.batch_size > smoke.batch_size
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("nope")


def test_recipe_settings():
  voc = importlib.import_module("jaxseg.configs.deeplabv3plus_voc_scribbles").get_config()
  assert (voc.crop_size, voc.batch_size, voc.optimizer.learning_rate) == ((513, 513), 12, 0.007)
  assert voc.num_steps == 60 * (10582 // 12) and voc.train_split == "train_aug"
  assert dict(voc.loss_kwargs) == dict(kernel="dense", sigma_rgb=15.0, sigma_xy=100.0, scale=0.5)
  psp = importlib.import_module("jaxseg.configs.pspnet_cityscapes").get_config()
  assert (psp.crop_size, psp.batch_size, psp.aux_weight) == ((713, 713), 16, 0.4)
  assert psp.model_kwargs.backbone == "resnet101" and psp.model_kwargs.output_stride == 8
  assert psp.inference.mode == "slide" and psp.inference.window == (713, 713)


@pytest.mark.slow
@pytest.mark.parametrize("name, classes, writer", [
    ("deeplabv3plus_voc_scribbles", 21, write_voc_fixture),
    ("pspnet_cityscapes", 19, write_cityscapes_fixture),
])
def test_recipe_smoke_on_fixture(name, classes, writer, tmp_path):
  writer(str(tmp_path / "raw"))
  config = importlib.import_module(f"jaxseg.configs.{name}").get_config("smoke")
  config.builder_kwargs.manual_dir = str(tmp_path / "raw")
  config.data_dir = str(tmp_path / "tfds")
  summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert len([k for k in summary if k.startswith("iou/")]) == classes
  saved = json.loads((tmp_path / "run" / f"{config.eval_split}_metrics.json").read_text())
  assert_metrics_match_split(summary, saved["confusion_matrix"],
                             loop.load_split(config, config.eval_split))
