"""Dense-CRF eval post-processing (``config.crf``) on a synthetic scene with a known answer."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from jaxseg.evaluation import metrics
from jaxseg.train import loop

C = 4


def _scene(seed=0, h=64, w=80):
  """Flat-coloured regions and a "network" that misplaces every boundary and has salt noise.

  Classes 0 (top) and 1 (bottom) share a colour, like road and sidewalk: only the network
  separates them. Classes 2 (disc) and 3 (rectangle) have their own colours. The logits are the
  truth shifted by (3, -3) pixels, one-hot * 4 blurred with sigma 2, plus N(0, 0.7) noise and
  +4 on a random class at 5% of the pixels.
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  mask = np.zeros((h, w), np.int32)
  mask[yy >= 34] = 1
  mask[(yy - 24) ** 2 + (xx - 24) ** 2 < 14 ** 2] = 2
  mask[(yy > 28) & (yy < 54) & (xx > 46) & (xx < 72)] = 3
  colours = np.array([[0.3, 0.55, 0.35], [0.3, 0.55, 0.35], [0.85, 0.35, 0.3], [0.3, 0.35, 0.8]])
  image = np.clip(colours[mask] + rng.normal(0, 0.03, (h, w, 3)), 0, 1).astype(np.float32)
  shifted = np.roll(mask, (3, -3), axis=(0, 1))
  logits = ndimage.gaussian_filter(4.0 * np.eye(C)[shifted], (2, 2, 0))
  logits += rng.normal(0, 0.7, logits.shape)
  salt = rng.random((h, w)) < 0.05
  logits[salt, rng.integers(0, C, salt.sum())] += 4.0
  return image[None], mask[None], logits[None].astype(np.float32)


def _iou(scores, mask):
  cm = metrics.confusion_matrix(jnp.argmax(scores, -1), jnp.asarray(mask), C)
  return metrics.summarize(cm)


@pytest.mark.parametrize("method", ["grid", "exact"])
def test_crf_postprocess_raises_miou_over_the_network(method):
  image, mask, logits = _scene()
  config = ml_collections.ConfigDict()
  config.crf = dict(enabled=True, method=method)
  postprocess = loop.make_postprocess(config)
  batch = {"image": image, "mask": mask, "valid": np.ones(mask.shape, bool)}
  refined = jax.jit(postprocess)(jnp.asarray(logits), batch)
  raw, crf = _iou(logits, mask), _iou(refined, mask)
  # Measured: mIoU 0.669 raw, 0.949 grid / 0.947 exact. Raw kernel sums (the old mean field)
  # gave 0.632, below the network: they erased class 1 (IoU 0.0), which only the unary marks.
  assert raw["miou"] == pytest.approx(0.67, abs=0.02)
  assert crf["miou"] > raw["miou"] + 0.2, (raw, crf)
  assert crf["iou/1"] > 0.8 and crf["iou/2"] > 0.95 and crf["iou/3"] > 0.95, crf


def test_crf_postprocess_is_off_unless_enabled():
  config = ml_collections.ConfigDict()
  config.crf = dict(enabled=False)
  assert loop.make_postprocess(config) is None
