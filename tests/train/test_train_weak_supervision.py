"""Every weak loss trained end to end on the embedded dataset (small UNet, 300 steps).

The trainer sees only the loss's weak label kinds (never the mask); the validation masks score
it. Each run must reach at least 0.8 of the mIoU measured for it at this size and seed
(``MEASURED``, from this file's own runs on the development machine), and those that learn
must beat chance: the best constant prediction (every pixel background), whose mIoU is the
background IoU over the classes present (0.176 here).

The image-level losses do not learn here: trained from scratch, CCNN meets its area
constraints with diffuse probabilities (foreground probability 0.20 on object and background
pixels alike) -- a strict xfail that turns into an error the day it passes; EM-Adapt for tags
assigns its quota to arbitrary pixels (16.0, not trained here). From ImageNet features
(``deeplabv3plus_shapes.py``) CCNN stays at chance too (17.4 after 600 steps).

``scribble_em_loss`` and ``box_loss(mode="em_fixed")`` are not trained here: from scratch both
stay at chance (0.176 measured), where a bound of 0.8x the measured figure can only catch a
crash, which their unit tests (tests/losses, the loss contract) already catch in seconds.
"""
import numpy as np
import pytest

from jaxseg import data as data_lib
from jaxseg.configs import unet_shapes
from jaxseg.evaluation import metrics
from jaxseg.train import loop

BOXES = ("boxes", "box_classes")
# loss id -> (label kinds, loss, kwargs, mIoU measured at this size and seed)
WEAK = {
    "partial_cross_entropy": (("scribble",), "partial_cross_entropy", {}, 0.355),
    "scribble_loss": (("scribble",), "scribble_loss", {}, 0.404),
    "box_em_adapt": (BOXES, "box_loss", dict(mode="em_adapt"), 0.218),
    "box_bbox_soft": (BOXES, "box_loss", dict(mode="bbox_soft"), 0.240),
    "box_bbox_seg": (BOXES + ("box_seg",), "box_loss", dict(mode="bbox_seg"), 0.497),
    "box_boxinst": (BOXES, "box_loss", dict(mode="boxinst"), 0.214),
}
CHANCE_MARGIN = 0.05

CCNN_XFAIL = pytest.mark.xfail(
    strict=True, reason="CCNN does not learn on these scenes: from scratch it stays at chance "
    "(0.174 after 600 and 1200 steps), and from ImageNet MobileNetV2 features too "
    "(deeplabv3plus_shapes.py, 0.174 after 600 steps); see README")


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


@pytest.mark.slow
@CCNN_XFAIL
def test_ccnn_trains_above_chance(data_dir, tmp_path):
  config = _config(data_dir, "image_level_loss", ("tags",),
                   dict(fg_lower=0.02, bg_lower=0.5, bg_upper=0.95))
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary["miou"] > _chance(data_dir) + CHANCE_MARGIN, summary


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WEAK))
def test_weak_loss_trains_end_to_end(name, data_dir, tmp_path):
  kinds, loss, kwargs, measured = WEAK[name]
  summary = loop.train_and_evaluate(_config(data_dir, loss, kinds, kwargs), str(tmp_path))
  print(f"{name}: mIoU {summary['miou']:.4f}")
  assert measured is not None, f"{name}: measure first ({summary['miou']:.4f})"
  assert summary["miou"] >= 0.8 * measured, (summary, measured)
  chance = _chance(data_dir)
  if measured > chance + 2 * CHANCE_MARGIN:
    assert summary["miou"] > chance + CHANCE_MARGIN, (summary, chance)
