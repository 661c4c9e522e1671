"""WSSL Bbox-Seg: the dense-CRF segmentation estimated from boxes (``bbox_seg_labels``)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.data import weak_labels
from jaxseg.losses import box as box_lib


@functools.lru_cache(maxsize=None)
def _labels_fn(**kwargs):
  return jax.jit(functools.partial(box_lib.bbox_seg_labels, **kwargs))


def _scene(h, w, *, loose, seed=0, noise=1.0):
  """A flat-coloured disk on a smooth striped gradient, and a box ``loose`` times its size.

  Returns (image float32 [1,H,W,3] in [0,1], boxes [1,2,4], classes [1,2], object mask [H,W],
  box mask [H,W]); the second box slot is padding.
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  c0, c1 = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
  image = c0 + (c1 - c0) * (xx / w)[..., None] + 15 * np.sin(yy / 4.0)[..., None]
  cy, cx, r = 0.5 * h, 0.45 * w, 0.2 * min(h, w)
  obj = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
  image[obj] = [235.0, 25.0, 60.0]
  image = np.clip(image + rng.normal(0, noise, image.shape), 0, 255) / 255.0
  ys, xs = np.nonzero(obj)
  half_h, half_w = loose * (np.ptp(ys) + 1) / 2, loose * (np.ptp(xs) + 1) / 2
  my, mx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
  box = [max(0, round(my - half_h)), max(0, round(mx - half_w)),
         min(h - 1, round(my + half_h)), min(w - 1, round(mx + half_w))]
  in_box = np.zeros((h, w), bool)
  in_box[box[0]:box[2] + 1, box[1]:box[3] + 1] = True
  boxes = np.array([[box, [0, 0, 0, 0]]], np.float32)
  classes = np.array([[2, -1]], np.int32)
  return image[None].astype(np.float32), boxes, classes, obj, in_box


def _iou(a, b):
  return np.sum(a & b) / np.sum(a | b)


@pytest.mark.parametrize("loose", [1.3, 1.5])
def test_recovers_a_flat_object_from_a_loose_box(loose):
  image, boxes, classes, obj, in_box = _scene(40, 40, loose=loose)
  assert 0.2 < _iou(in_box, obj) < 0.6  # the box itself is a poor mask
  labels = np.asarray(_labels_fn(num_classes=4)(image, boxes, classes))[0]
  assert _iou(labels == 2, obj) > 0.8
  assert _iou(labels == 2, obj) > _iou(in_box, obj) + 0.25
  assert np.all(labels[~in_box] == 0)  # outside every box: background
  assert set(np.unique(labels)) <= {0, 2}


def test_reduced_resolution_keeps_the_edges():
  """The CRF at <= 600 pixels of a 48x64 image, upsampled guided by the image."""
  image, boxes, classes, obj, in_box = _scene(48, 64, loose=1.4, seed=1, noise=4.0)
  assert box_lib.crf_resolution(48, 64, 600) == (21, 28)
  labels = np.asarray(_labels_fn(num_classes=3, max_pixels=600)(image, boxes, classes))[0]
  assert _iou(labels == 2, obj) > 0.8 > _iou(in_box, obj) + 0.25
  assert np.all(labels[~in_box] == 0)


def test_labels_are_background_or_a_covering_box_class_and_jit_does_not_recompile():
  image, boxes, classes, _, _ = _scene(32, 32, loose=1.4, seed=2)
  fn = _labels_fn(num_classes=5, max_pixels=500)
  rng = np.random.default_rng(3)
  for _ in range(2):  # new boxes, same shapes: one compilation
    y0, x0 = rng.integers(0, 14, 2)
    boxes = np.array([[[y0, x0, y0 + 15, x0 + 15], [20, 20, 31, 31]]], np.float32)
    classes = np.array([[1, 4]], np.int32)
    labels = np.asarray(fn(image, boxes, classes))[0]
    allowed = np.zeros((32, 32, 5), bool)
    allowed[..., 0] = True
    for (b0, b1, b2, b3), k in zip(boxes[0].astype(int), classes[0]):
      allowed[b0:b2 + 1, b1:b3 + 1, k] = True
    assert np.all(np.take_along_axis(allowed, labels[..., None], -1))
  assert fn._cache_size() == 1


def test_invalid_pixels_get_the_ignore_label():
  image, boxes, classes, obj, _ = _scene(24, 24, loose=1.3, seed=4)
  valid = np.ones((1, 24, 24), bool)
  valid[:, :, 20:] = False
  labels = np.asarray(_labels_fn(num_classes=3)(image, boxes, classes, valid=valid))[0]
  assert np.all(labels[:, 20:] == 255) and np.all(labels[:, :20] != 255)


def test_crf_resolution():
  assert box_lib.crf_resolution(64, 64, None) == (64, 64)
  assert box_lib.crf_resolution(30, 40, 1600) == (30, 40)
  h, w = box_lib.crf_resolution(120, 160, 1600)
  assert h * w <= 1600 and abs(h / w - 0.75) < 0.03 and h * w > 1500
  with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
    box_lib.bbox_seg_labels(np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 1, 4), np.float32),
                            np.zeros((1, 1), np.int32), 2, max_pixels=0)


def test_joint_bilateral_upsample_follows_the_guide():
  guide = np.zeros((1, 16, 16, 3), np.float32)
  guide[:, :, 7:] = 200.0  # an edge that falls inside a low-resolution cell
  small = np.asarray(jax.image.resize(guide, (1, 4, 4, 3), "linear", antialias=True))
  values = (small[..., :1] > 100).astype(np.float32)
  values = np.concatenate([1 - values, values], -1)
  up = np.asarray(box_lib.joint_bilateral_upsample(jnp.asarray(values), jnp.asarray(small),
                                                   jnp.asarray(guide), sigma_rgb=10.0))
  np.testing.assert_allclose(up.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(up.argmax(-1)[0], (guide[0, ..., 0] > 100).astype(int))


def test_data_helper_renumbers_the_classes():
  """`weak_labels.box_seg_from_boxes` runs the CRF on background + the boxes' classes only."""
  image, _, _, _, _ = _scene(24, 32, loose=1.3, seed=5)
  boxes = np.array([[2, 3, 15, 17], [10, 14, 22, 30], [0, 0, 0, 0]], np.float32)
  classes = np.array([3, 1, -1], np.int32)
  ours = weak_labels.box_seg_from_boxes(np.round(image[0] * 255).astype(np.uint8), boxes,
                                        classes, max_pixels=None)
  direct = _labels_fn(num_classes=5)(jnp.asarray(np.round(image * 255) / 255, jnp.float32),
                                     boxes[None], classes[None])
  assert ours.dtype == np.int32 and ours.shape == (24, 32)
  np.testing.assert_array_equal(ours, np.asarray(direct)[0])
  empty = weak_labels.box_seg_from_boxes(np.zeros((4, 5, 3), np.uint8), np.zeros((2, 4)),
                                         np.array([-1, -1]))
  np.testing.assert_array_equal(empty, np.zeros((4, 5)))
