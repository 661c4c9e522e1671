"""jaxseg.ops.boxes against torchvision.ops and torchvision's detection BoxCoder."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as det_utils

from jaxseg import ops

# Jitted once per shape: eager dispatch of every primitive would dominate the test time.
_iou = jax.jit(ops.box_iou)
_area = jax.jit(ops.box_area)
_encode = jax.jit(ops.encode_boxes, static_argnums=2)
_decode = jax.jit(ops.decode_boxes, static_argnums=2)


def _random_boxes(rng, n, size=100.0, degenerate=0):
  """xyxy float32 boxes, some crossing the border, the last `degenerate` with zero area."""
  xy = rng.uniform(-10, size, (n, 2))
  wh = rng.uniform(0.5, size / 2, (n, 2))
  b = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
  if degenerate:
    b[-degenerate:, 2] = b[-degenerate:, 0]
  return b


def test_xyxy_swap_roundtrip_numpy_and_jax():
  b = np.array([[1., 2., 3., 4.]], np.float32)
  np.testing.assert_array_equal(ops.to_xyxy(b), [[2., 1., 4., 3.]])
  assert isinstance(ops.to_xyxy(b), np.ndarray)
  np.testing.assert_array_equal(ops.from_xyxy(ops.to_xyxy(jnp.asarray(b))), b)


def test_box_area_and_iou_match_torchvision():
  rng = np.random.default_rng(0)
  a = _random_boxes(rng, 13, degenerate=2)
  b = _random_boxes(rng, 7, degenerate=1)
  b[0] = a[0]  # an exact duplicate
  np.testing.assert_array_equal(np.asarray(_area(ops.from_xyxy(a))),
                                torchvision.ops.box_area(torch.from_numpy(a)).numpy())
  got = np.asarray(_iou(ops.from_xyxy(a), ops.from_xyxy(b)))
  want = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  assert np.isnan(want).any()  # torch's 0/0 between two empty boxes; ours is 0
  np.testing.assert_allclose(got, np.nan_to_num(want, nan=0.0), rtol=1e-6, atol=0)
  assert got.shape == (13, 7)
  assert got[0, 0] == 1.0


def test_box_iou_empty_union_is_zero_not_nan_and_grad_finite():
  z = jnp.array([[5., 5., 5., 5.]])
  assert float(_iou(z, z)[0, 0]) == 0.0
  g = jax.jit(jax.grad(lambda q: ops.box_iou(q, z).sum()))(z)
  assert np.all(np.isfinite(np.asarray(g)))


def test_box_iou_broadcasts_batch_axes():
  rng = np.random.default_rng(1)
  a = ops.from_xyxy(_random_boxes(rng, 10)).reshape(2, 5, 4)
  b = ops.from_xyxy(_random_boxes(rng, 3))
  got = np.asarray(_iou(a, b[None]))
  assert got.shape == (2, 5, 3)
  for i in range(2):
    want = torchvision.ops.box_iou(torch.from_numpy(ops.to_xyxy(a[i])),
                                   torch.from_numpy(ops.to_xyxy(b))).numpy()
    np.testing.assert_allclose(got[i], want, rtol=1e-6)


def test_box_iou_hand_computed():
  a = jnp.array([[0., 0., 10., 10.]])
  b = jnp.array([[5., 0., 15., 10.], [20., 20., 30., 30.]])
  np.testing.assert_allclose(np.asarray(_iou(a, b)), [[50. / 150., 0.]], rtol=1e-6)


@pytest.mark.parametrize("weights", [(1., 1., 1., 1.), (10., 10., 5., 5.)])
def test_encode_decode_match_box_coder(weights):
  rng = np.random.default_rng(2)
  gt = _random_boxes(rng, 20)
  ref = _random_boxes(rng, 20)
  wy, wx, wh, ww = weights
  coder = det_utils.BoxCoder((wx, wy, ww, wh))
  want = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(ref)).numpy()  # dx dy dw dh
  got = np.asarray(_encode(ops.from_xyxy(gt), ops.from_xyxy(ref), weights))
  np.testing.assert_allclose(got, want[:, [1, 0, 3, 2]], rtol=1e-5, atol=1e-6)

  deltas = rng.normal(0, 2, (20, 4)).astype(np.float32)
  deltas[0, 2:] = 10.0 * np.array([wh, ww])  # beyond the clamp
  want = coder.decode_single(torch.from_numpy(deltas[:, [1, 0, 3, 2]]),
                             torch.from_numpy(ref)).numpy()
  got = np.asarray(_decode(jnp.asarray(deltas), ops.from_xyxy(ref), weights))
  np.testing.assert_allclose(ops.to_xyxy(got), want, rtol=1e-5, atol=1e-4)
  # Round trip.
  enc = _encode(ops.from_xyxy(gt), ops.from_xyxy(ref), weights)
  np.testing.assert_allclose(np.asarray(_decode(enc, ops.from_xyxy(ref), weights)),
                             ops.from_xyxy(gt), rtol=1e-5, atol=1e-3)


def test_decode_broadcasts_class_specific_deltas():
  ref = jnp.array([[[0., 0., 10., 20.]]])  # [1, 1, 4]
  deltas = jnp.zeros((1, 3, 4))
  out = _decode(deltas, ref, (10., 10., 5., 5.))
  np.testing.assert_allclose(np.asarray(out), np.tile([[[0., 0., 10., 20.]]], (1, 3, 1)))
  big = _decode(jnp.array([[0., 0., 100., 0.]]), jnp.array([[0., 0., 16., 16.]]))
  np.testing.assert_allclose(np.asarray(big)[0, 2] - np.asarray(big)[0, 0], 1000.0, rtol=1e-5)
  assert ops.boxes.DEFAULT_BBOX_XFORM_CLIP == math.log(1000.0 / 16)


def test_clip_boxes_scalar_size_and_per_image_sizes():
  rng = np.random.default_rng(3)
  b = _random_boxes(rng, 8, size=60.0)
  want = torchvision.ops.clip_boxes_to_image(torch.from_numpy(b), (40, 50)).numpy()
  clip = jax.jit(ops.clip_boxes, static_argnums=1)
  np.testing.assert_array_equal(ops.to_xyxy(np.asarray(clip(ops.from_xyxy(b), (40, 50)))), want)
  batch = jnp.stack([ops.from_xyxy(b), ops.from_xyxy(b)])  # [2, 8, 4]
  sizes = jnp.array([[40, 50], [30, 20]])
  got = np.asarray(jax.jit(ops.clip_boxes)(batch, sizes))
  for i, (h, w) in enumerate([(40, 50), (30, 20)]):
    want = torchvision.ops.clip_boxes_to_image(torch.from_numpy(b), (h, w)).numpy()
    np.testing.assert_array_equal(ops.to_xyxy(got[i]), want)


def test_small_box_mask_matches_remove_small_boxes():
  rng = np.random.default_rng(4)
  b = _random_boxes(rng, 30, size=4.0, degenerate=3)
  keep = torchvision.ops.remove_small_boxes(torch.from_numpy(b), 1.0).numpy()
  mask = np.asarray(jax.jit(ops.small_box_mask, static_argnums=1)(ops.from_xyxy(b), 1.0))
  np.testing.assert_array_equal(np.nonzero(mask)[0], keep)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="last axis of size 4"):
    ops.box_iou(jnp.zeros((3, 3)), jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match="weights"):
    ops.encode_boxes(jnp.zeros((1, 4)), jnp.zeros((1, 4)), (1., 1., 1.))
  with pytest.raises(ValueError, match="size"):
    ops.clip_boxes(jnp.zeros((1, 4)), (1, 2, 3))
