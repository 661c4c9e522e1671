"""Every weak loss trains the small UNet on the embedded dataset above chance.

The trainer sees only the weak label kind of each loss (never the mask); the validation
masks score it. "Chance" is the best constant prediction (every pixel background), whose
mIoU is the background IoU divided by the number of classes present (0.176 here); a run
must beat it by 0.05 mIoU (about 30%) after 300 steps.

The image-level (CCNN) loss does not yet: trained from scratch on this dataset it stays at
chance (bench/weak_supervision.py, 600 steps): with CCNN's soft posterior (hardness 1) the
network meets the area constraints with diffuse probabilities and never predicts a
foreground pixel; with the size mode's hardness 1000 it predicts ~6% foreground, in the
wrong places (IoU < 0.01). Its case is a strict expected failure that turns into an error
the day it starts to pass.
"""
import numpy as np
import pytest

from jaxseg import data as data_lib
from jaxseg.configs import unet_shapes
from jaxseg.evaluation import metrics
from jaxseg.train import loop

WEAK = {
    "partial_cross_entropy": (("scribble",), {}),
    "scribble_loss": (("scribble",), dict(kernel="local", pairwise_weight=0.1, sigma_xy=6.0,
                                          sigma_rgb=5.8, radius=3)),
    "box_loss": (("boxes", "box_classes"), dict(mode="bbox_seg")),
    "image_level_loss": (("tags",), dict(fg_lower=0.02, bg_lower=0.5, bg_upper=0.95)),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_weak"))


def _config(data_dir, loss, kinds, kwargs):
  config = unet_shapes.get_config("smoke")
  config.data_dir = data_dir
  config.builder_kwargs = dict(num_train=512, num_validation=48)
  config.model_kwargs = dict(features=16, depth=3)
  config.batch_size = 16
  config.num_steps = 300
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.log_every = 100
  config.optimizer = dict(name="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=20,
                          weight_decay=1e-4)
  config.loss, config.label_kinds, config.loss_kwargs = loss, kinds, kwargs
  return config


def _chance(data_dir):
  src = data_lib.load("jaxseg_shapes", "validation", data_dir=data_dir, num_train=512,
                      num_validation=48)
  masks = np.stack([src[i]["mask"] for i in range(len(src))])
  cm = np.asarray(metrics.confusion_matrix(np.zeros_like(masks), masks, src.num_classes))
  return metrics.summarize(cm)["miou"]


CCNN_XFAIL = pytest.mark.xfail(
    strict=True, reason="CCNN image-level loss stays at chance mIoU on the shapes dataset "
    "(measured: 0.174 after 600 and 1200 steps); a known shortfall, see README")


@pytest.mark.slow
@pytest.mark.parametrize("loss", [
    "box_loss", pytest.param("image_level_loss", marks=CCNN_XFAIL), "partial_cross_entropy",
    "scribble_loss"])
def test_weak_loss_trains_above_chance(loss, data_dir, tmp_path):
  kinds, kwargs = WEAK[loss]
  summary = loop.train_and_evaluate(_config(data_dir, loss, kinds, kwargs), str(tmp_path))
  chance = _chance(data_dir)
  assert summary["miou"] > chance + 0.05, (summary, chance)
