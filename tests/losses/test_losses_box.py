"""Box losses: rasterisation, WSSL E-steps, Bbox-Seg unaries, BoxInst terms, global means.

The dense-CRF Bbox-Seg labels (``bbox_seg_labels``) are tested in test_losses_box_seg.py."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxseg.losses import box_loss
from jaxseg.losses import box as box_lib


@functools.lru_cache(maxsize=None)
def _terms(**kwargs):
  return jax.jit(functools.partial(box_lib.boxinst_terms, **kwargs))


@functools.lru_cache(maxsize=None)
def _em_adapt(**kwargs):
  """bbox_em_adapt_targets compiled once per keyword set (eager dispatch of its loops is slow)."""
  return jax.jit(functools.partial(box_lib.bbox_em_adapt_targets, **kwargs))


def _boxes():
  boxes = np.array([[[2, 3, 9, 12], [12, 1, 18, 7], [0, 0, 0, 0]],
                    [[4, 4, 15, 15], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
  classes = np.array([[1, 3, -1], [2, -1, -1]], np.int32)
  return boxes, classes


def _numpy_class_masks(boxes, classes, c, h, w):
  out = np.zeros((boxes.shape[0], h, w, c), bool)
  for n in range(boxes.shape[0]):
    for (y0, x0, y1, x1), k in zip(boxes[n].astype(int), classes[n]):
      if k >= 0:
        out[n, y0:y1 + 1, x0:x1 + 1, k] = True
  return out


def test_rasterisation_is_inclusive_and_skips_padding():
  boxes, classes = _boxes()
  ours = box_lib.class_box_masks(jnp.asarray(boxes), jnp.asarray(classes), 4, 20, 20)
  np.testing.assert_array_equal(ours, _numpy_class_masks(boxes, classes, 4, 20, 20))
  masks = box_lib.rasterize_boxes(jnp.asarray(boxes), jnp.asarray(classes), 20, 20)
  assert int(masks[0, 0].sum()) == 8 * 10 and int(masks[0, 2].sum()) == 0


def test_em_fixed_large_biases_give_the_box_labels():
  rng = np.random.default_rng(0)
  boxes, classes = _boxes()
  logits = rng.normal(0, 1, (2, 20, 20, 4)).astype(np.float32)
  labels = box_lib.bbox_em_fixed_targets(jnp.asarray(logits), boxes, classes, bg_bias=100.0,
                                         fg_bias=1000.0)
  expected = np.zeros((2, 20, 20), int)
  masks = _numpy_class_masks(boxes, classes, 4, 20, 20)
  for k in range(1, 4):
    expected[masks[..., k]] = k
  np.testing.assert_array_equal(labels, expected)
  # With the proto biases, confident network scores win over the biases.
  logits = np.zeros((2, 20, 20, 4), np.float32)
  logits[..., 2] = 10.0
  labels = box_lib.bbox_em_fixed_targets(jnp.asarray(logits), boxes, classes)
  assert bool(jnp.all(labels == 2))
  # Exactly the bias arithmetic at a neutral network: bg (1) loses to fg (2) inside boxes.
  labels = box_lib.bbox_em_fixed_targets(jnp.zeros((2, 20, 20, 4)), boxes, classes)
  np.testing.assert_array_equal(labels, expected)


def test_em_fixed_loss_is_cross_entropy_on_the_targets():
  rng = np.random.default_rng(1)
  boxes, classes = _boxes()
  logits = rng.normal(0, 1, (2, 20, 20, 4)).astype(np.float32)
  batch = {"boxes": boxes, "box_classes": classes}
  labels = np.asarray(box_lib.bbox_em_fixed_targets(jnp.asarray(logits), boxes, classes))
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  expected = -np.mean(np.take_along_axis(logp, labels[..., None], -1))
  assert float(box_loss(logits, batch, mode="em_fixed")) == pytest.approx(expected, rel=1e-5)
  grad = jax.grad(functools.partial(box_loss, mode="em_fixed"))(jnp.asarray(logits), batch)
  onehot = np.eye(4)[labels]
  np.testing.assert_allclose(grad, (np.exp(logp) - onehot) / labels.size, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_em_adapt_guarantees_the_portion_for_two_classes(seed):
  rng = np.random.default_rng(seed)
  boxes = np.array([[[3, 3, 12, 12]]], np.float32)
  classes = np.array([[2]], np.int32)
  logits = rng.normal(0, 1, (1, 16, 16, 4)).astype(np.float32)
  logits[..., seed % 4] += 5.0  # the network strongly prefers one class (maybe absent)
  portion = 0.3
  labels = np.asarray(_em_adapt(bg_portion=portion, fg_portion=portion)(
      jnp.asarray(logits), boxes, classes))
  in_box = _numpy_class_masks(boxes, classes, 4, 16, 16)[0, ..., 2]
  assert np.sum(labels == 0) >= int(np.floor(portion * 256))  # bg: of the image
  assert np.sum(labels == 2) >= int(np.floor(portion * 100))  # class 2: of its box
  assert not np.any((labels == 2) & ~in_box)
  assert set(np.unique(labels)) <= {0, 2}  # absent classes never win


@pytest.mark.parametrize("seed", range(3))
def test_em_adapt_keeps_a_small_box_class_inside_its_box(seed):
  """A 5% box: the class may only be taken inside it, and gets its portion of the box."""
  rng = np.random.default_rng(seed)
  h, w = 40, 40
  boxes = np.array([[[10, 20, 18, 28], [0, 0, 0, 0]]], np.float32)  # 9 x 9 = 81 px (5%)
  classes = np.array([[2, -1]], np.int32)
  logits = rng.normal(0, 1, (1, h, w, 4)).astype(np.float32)
  logits[..., 2] += 6.0  # the network calls everything class 2
  if seed == 2:
    logits[..., 2] -= 12.0  # ... or nothing
  labels = np.asarray(_em_adapt()(jnp.asarray(logits), boxes, classes))
  in_box = _numpy_class_masks(boxes, classes, 4, h, w)[0, ..., 2]
  assert int(np.sum((labels[0] == 2) & ~in_box)) == 0
  assert int(np.sum((labels[0] == 2) & in_box)) >= int(np.floor(0.2 * 81))
  assert int(np.sum(labels[0] == 0)) >= int(np.floor(0.2 * h * w))
  loss = jax.jit(functools.partial(box_loss, mode="em_adapt"))(
      jnp.asarray(logits), {"boxes": boxes, "box_classes": classes})
  assert np.isfinite(float(loss))


def test_em_adapt_last_class_and_valid_pixels():
  rng = np.random.default_rng(7)
  boxes = np.array([[[0, 0, 5, 5], [6, 6, 9, 9]]], np.float32)
  classes = np.array([[1, 3]], np.int32)
  logits = rng.normal(0, 1, (1, 10, 10, 4)).astype(np.float32)
  logits[..., 0] += 4.0
  valid = np.zeros((1, 10, 10), bool)
  valid[:, :8, :] = True
  labels = np.asarray(_em_adapt(fg_portion=0.5)(jnp.asarray(logits), boxes, classes, valid))
  # Quotas count valid pixels of the class's boxes: 36 for class 1, 2 x 4 = 8 for class 3.
  assert np.sum((labels == 1) & valid) >= 18 and np.sum((labels == 3) & valid) >= 4
  assert np.all(labels[~valid] == 255)


def _reference_bbox_seg(boxes, classes, c, h, w, erode_scale=0.2):
  """A loop-and-erode reimplementation of WSSL's MATLAB (without the occluder bias)."""
  prob = np.full((h, w, c), 1e-12)
  count = np.zeros((h, w, c))
  outside = np.ones((h, w), bool)
  for (y0, x0, y1, x1), k in zip(boxes.astype(int), classes):
    if k < 0:
      continue
    outside[y0:y1 + 1, x0:x1 + 1] = False
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    core = np.zeros((h, w), bool)
    if bh * bw < 121 or bh < 10 or bw < 10:
      core[y0:y1 + 1, x0:x1 + 1] = True
    else:
      mask = np.zeros((h, w), bool)
      mask[y0:y1 + 1, x0:x1 + 1] = True
      mask[0], mask[-1], mask[:, 0], mask[:, -1] = False, False, False, False
      core = ndi.binary_erosion(mask, np.ones((3, 3)))
      while core.sum() / mask.sum() >= erode_scale + 0.05:
        core = ndi.binary_erosion(core, np.ones((3, 3)))
    fg = np.where(core, 0.75, 0.5)[y0:y1 + 1, x0:x1 + 1]
    prob[y0:y1 + 1, x0:x1 + 1, k] += fg
    prob[y0:y1 + 1, x0:x1 + 1, 0] += 1 - fg
    count[y0:y1 + 1, x0:x1 + 1, k] += 1
    count[y0:y1 + 1, x0:x1 + 1, 0] += 1
  prob[outside, 0] += 1 - 1e-12
  count[outside, 0] += 1
  prob = np.where(count > 0, prob / np.maximum(count, 1), prob)
  return prob / prob.sum(-1, keepdims=True)


def test_bbox_unary_targets_match_the_erosion_loop():
  boxes = np.array([[[2, 2, 21, 21], [10, 12, 29, 35], [0, 20, 13, 39], [30, 1, 34, 5]]],
                   np.float32)  # plain, overlapping, touching the border, too small
  classes = np.array([[1, 2, 1, 3]], np.int32)
  ours = box_lib.bbox_unary_targets(jnp.asarray(boxes), jnp.asarray(classes), 4, 36, 40)
  ref = _reference_bbox_seg(boxes[0], classes[0], 4, 36, 40)
  np.testing.assert_allclose(np.asarray(ours)[0], ref, atol=1e-6)
  # A 20x20 box: 6 erosions leave an 8x8 core (16% < 25%) at P = 0.75.
  assert float(ours[0, 8, 8, 1]) == pytest.approx(0.75, abs=1e-6)
  assert float(ours[0, 7, 7, 1]) == pytest.approx(0.5, abs=1e-6)
  assert float(ours[0, 35, 39, 0]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("h,w", [(10, 10), (12, 30), (57, 13), (100, 100)])
def test_erosion_steps_closed_form(h, w):
  steps = 1
  while (h - 2 * steps) * (w - 2 * steps) >= 0.25 * h * w:
    steps += 1
  assert float(box_lib._erosion_steps(jnp.float32(h), jnp.float32(w), 0.25)) == steps


def test_bbox_soft_loss_is_soft_cross_entropy():
  rng = np.random.default_rng(2)
  boxes, classes = _boxes()
  logits = rng.normal(0, 1, (2, 20, 20, 4)).astype(np.float32)
  target = np.asarray(box_lib.bbox_unary_targets(jnp.asarray(boxes), jnp.asarray(classes), 4,
                                                 20, 20))
  expected = -np.mean(np.sum(target * np.asarray(jax.nn.log_softmax(logits, -1)), -1))
  ours = box_loss(logits, {"boxes": boxes, "box_classes": classes}, mode="bbox_soft")
  assert float(ours) == pytest.approx(expected, rel=1e-5)


def test_bbox_seg_loss_is_cross_entropy_on_the_precomputed_labels():
  rng = np.random.default_rng(12)
  logits = rng.normal(0, 1, (2, 12, 12, 4)).astype(np.float32)
  box_seg = rng.integers(0, 4, (2, 12, 12)).astype(np.int32)
  box_seg[0, :3] = 255
  valid = np.ones((2, 12, 12), bool)
  valid[1, :, 10:] = False
  fn = jax.jit(functools.partial(box_loss, mode="bbox_seg"))
  got = float(fn(jnp.asarray(logits), {"box_seg": box_seg, "valid": valid}))  # no boxes needed
  logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float64), -1))
  keep = (box_seg != 255) & valid
  nll = -np.take_along_axis(logp, np.where(keep, box_seg, 0)[..., None], -1)[..., 0]
  assert got == pytest.approx(nll[keep].mean(), rel=1e-5)
  with pytest.raises(ValueError, match=r"needs batch\['box_seg'\].*label_kinds.*bbox_seg_labels"):
    box_loss(logits, {"boxes": np.zeros((2, 1, 4), np.float32),
                      "box_classes": np.zeros((2, 1), np.int32)}, mode="bbox_seg")
  with pytest.raises(ValueError, match=r"batch\['box_seg'\] must have shape"):
    box_loss(logits, {"box_seg": box_seg[:, :6]}, mode="bbox_seg")


def test_rgb_to_lab_matches_skimage():
  skcolor = pytest.importorskip("skimage.color")
  rng = np.random.default_rng(3)
  rgb = rng.random((4, 5, 3)).astype(np.float32)
  rgb[0, 0] = [0, 0, 0]
  rgb[0, 1] = [1, 1, 1]
  rgb[0, 2] = [0.01, 0.02, 0.005]  # the linear branches
  np.testing.assert_allclose(box_lib.rgb_to_lab(jnp.asarray(rgb)), skcolor.rgb2lab(rgb), atol=2e-3)


def _boxinst_batch(seed, size=16):
  rng = np.random.default_rng(seed)
  image = np.zeros((1, size, size, 3), np.float32)
  image[:, 3:11, 4:13] = [0.9, 0.1, 0.1]
  image = np.clip(image + rng.normal(0, 0.01, image.shape), 0, 1).astype(np.float32)
  boxes = np.array([[[3, 4, 10, 12], [0, 0, 0, 0]]], np.float32)
  classes = np.array([[1, -1]], np.int32)
  return {"image": image, "boxes": boxes, "box_classes": classes}


def test_boxinst_projection_zero_when_mask_is_the_box_and_pairwise_zero_when_saturated():
  batch = _boxinst_batch(0)
  in_box = _numpy_class_masks(batch["boxes"], batch["box_classes"], 2, 16, 16)[..., 1]
  logits = np.where(in_box[..., None], [-40.0, 40.0], [40.0, -40.0]).astype(np.float32)
  proj, pair = _terms()(jnp.asarray(logits), batch)
  assert float(proj) == pytest.approx(0.0, abs=1e-4)
  saturated = np.broadcast_to(np.array([-40.0, 40.0], np.float32), (1, 16, 16, 2))
  _, pair = _terms()(jnp.asarray(saturated), batch)
  assert float(pair) == pytest.approx(0.0, abs=1e-5)


def test_boxinst_pairwise_matches_brute_force():
  skcolor = pytest.importorskip("skimage.color")
  batch = _boxinst_batch(1)
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 2, (1, 16, 16, 3)).astype(np.float32)
  _, pair = _terms(color_threshold=0.3)(jnp.asarray(logits), batch)
  lab = skcolor.rgb2lab(batch["image"][0].astype(np.float64))
  p = np.asarray(jax.nn.softmax(logits.astype(np.float64), -1))[0]
  in_box = _numpy_class_masks(batch["boxes"], batch["box_classes"], 3, 16, 16)[0]
  total, edges = 0.0, 0
  for y in range(16):
    for x in range(16):
      for dy in (-2, 0, 2):
        for dx in (-2, 0, 2):
          yy, xx = y + dy, x + dx
          if (dy, dx) == (0, 0) or not (0 <= yy < 16 and 0 <= xx < 16):
            continue
          if np.exp(-np.linalg.norm(lab[y, x] - lab[yy, xx]) / 2) < 0.3:
            continue
          for k in range(3):
            if in_box[y, x, k]:
              same = p[y, x, k] * p[yy, xx, k] + (1 - p[y, x, k]) * (1 - p[yy, xx, k])
              total += -np.log(same)
              edges += 1
  assert edges > 0
  assert float(pair) == pytest.approx(total / edges, rel=1e-4)
  # The weight sum is the count of in-box directed edges with similarity >= tau.
  sim = box_lib.color_similarity(jnp.asarray(batch["image"]), jnp.ones((1, 16, 16)),
                                 box_lib.neighbour_offsets(3, 2))
  weights = (np.asarray(sim)[0] >= 0.3) * in_box[..., 1:2]
  assert int(weights.sum()) == edges


def test_boxinst_projection_matches_dice_by_hand():
  batch = _boxinst_batch(2)
  rng = np.random.default_rng(5)
  logits = rng.normal(0, 2, (1, 16, 16, 2)).astype(np.float32)
  proj, _ = _terms()(jnp.asarray(logits), batch)
  p = np.asarray(jax.nn.softmax(logits, -1))[0, ..., 1].astype(np.float64)
  b = _numpy_class_masks(batch["boxes"], batch["box_classes"], 2, 16, 16)[0, ..., 1].astype(float)
  dice = lambda x, t: 1 - 2 * np.sum(x * t) / (np.sum(x * x) + np.sum(t * t) + 1e-5)
  expected = dice(p.max(0), b.max(0)) + dice(p.max(1), b.max(1))
  assert float(proj) == pytest.approx(expected, rel=1e-5)


def test_boxinst_warmup_and_gradient():
  batch = dict(_boxinst_batch(3))
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(0, 1, (1, 16, 16, 2)).astype(np.float32))
  proj, pair = _terms()(logits, batch)
  fn = jax.jit(functools.partial(box_loss, mode="boxinst", warmup_steps=100,
                                 label_set_weight=0.5))
  label_set = float(box_lib.box_label_set_nll(logits, batch))
  for step, ramp in ((0, 0.0), (50, 0.5), (400, 1.0)):
    expected = float(proj) + ramp * float(pair) + 0.5 * label_set
    assert float(fn(logits, batch, step=jnp.int32(step))) == pytest.approx(expected, rel=1e-5)
  assert fn._cache_size() == 1
  grad = jax.jit(jax.grad(functools.partial(box_loss, mode="boxinst")))(logits, batch)
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0


@pytest.mark.parametrize("mode", ["bbox_seg", "bbox_soft", "em_fixed", "em_adapt"])
def test_wssl_modes_add_the_ramped_crf_term(mode):
  from jaxseg.losses import crf_pairwise
  boxes, classes = _boxes()
  rng = np.random.default_rng(9)
  logits = jnp.asarray(rng.normal(0, 1, (2, 20, 20, 4)).astype(np.float32))
  batch = {"boxes": boxes, "box_classes": classes,
           "image": rng.random((2, 20, 20, 3)).astype(np.float32),
           "box_seg": rng.integers(0, 4, (2, 20, 20)).astype(np.int32)}
  crf_kwargs = dict(kernel="local", radius=2, sigma_xy=3.0, sigma_rgb=20.0)
  base = float(jax.jit(functools.partial(box_loss, mode=mode))(logits, batch))
  pair = float(crf_pairwise(logits, batch, **crf_kwargs))
  with_crf = functools.partial(box_loss, mode=mode, crf_weight=0.3, crf_kwargs=crf_kwargs,
                               warmup_steps=100)
  got = float(jax.jit(with_crf)(logits, batch, step=25))
  assert pair > 0
  assert got == pytest.approx(base + 0.25 * 0.3 * pair, rel=1e-5)


def test_box_label_set_nll_by_hand():
  """Outside every box only background is allowed; inside, background or the boxes' classes."""
  boxes, classes = _boxes()
  rng = np.random.default_rng(8)
  logits = rng.normal(0, 2, (2, 20, 20, 4)).astype(np.float32)
  valid = np.ones((2, 20, 20), bool)
  valid[1, :, 17:] = False
  batch = {"boxes": boxes, "box_classes": classes, "valid": valid}
  got = float(jax.jit(box_lib.box_label_set_nll)(jnp.asarray(logits), batch))
  p = np.asarray(jax.nn.softmax(logits.astype(np.float64), -1))
  in_box = _numpy_class_masks(boxes, classes, 4, 20, 20)
  total, count = 0.0, 0
  for n in range(2):
    for y in range(20):
      for x in range(20):
        if valid[n, y, x]:
          allowed = [0] + [k for k in range(4) if in_box[n, y, x, k]]
          total -= np.log(p[n, y, x, allowed].sum())
          count += 1
  assert got == pytest.approx(total / count, rel=1e-5)
  # Background everywhere outside the boxes and the box class inside: only overlaps cost.
  perfect = np.where(in_box.any(-1, keepdims=True), 0.0, 30.0) * (np.arange(4) == 0)
  perfect = perfect + 30.0 * in_box
  assert float(box_lib.box_label_set_nll(jnp.asarray(perfect, jnp.float32), batch)) < 1e-6


def test_bad_inputs():
  boxes, classes = _boxes()
  logits = np.zeros((2, 20, 20, 4), np.float32)
  with pytest.raises(ValueError, match="unknown mode"):
    box_loss(logits, {"boxes": boxes, "box_classes": classes}, mode="boxsup")
  with pytest.raises(ValueError, match=r"needs batch\['boxes'\]"):
    box_loss(logits, {"box_classes": classes})
  with pytest.raises(ValueError, match=r"\[N,M,4\]"):
    box_loss(logits, {"boxes": boxes[..., :3], "box_classes": classes})
  with pytest.raises(ValueError, match="box_classes"):
    box_loss(logits, {"boxes": boxes, "box_classes": classes[:, :2]})
  with pytest.raises(TypeError, match="integer"):
    box_loss(logits, {"boxes": boxes, "box_classes": classes.astype(np.float32)})
  with pytest.raises(ValueError, match="background_class"):
    box_loss(logits, {"boxes": boxes, "box_classes": classes}, background_class=7)
  with pytest.raises(ValueError, match=r"needs batch\['image'\]"):
    box_loss(logits, {"boxes": boxes, "box_classes": classes}, mode="boxinst")
  with pytest.raises(ValueError, match="needs the training step"):
    box_loss(logits, {"boxes": boxes, "box_classes": classes, "image": np.zeros((2, 20, 20, 3))},
             mode="boxinst", warmup_steps=10)


def _sharded_mean(fn, logits, batch, shards):
  """The pmap train step's loss: the mean over shards of ``fn`` traced per shard under
  ``batch_sharded_over`` (vmap with an axis name stands in for the devices)."""
  from jaxseg.losses import _common

  def split(x):
    return jnp.asarray(x).reshape((shards, x.shape[0] // shards) + x.shape[1:])

  def per_shard(lg, b):
    with _common.batch_sharded_over("shards"):
      return fn(lg, b)

  sharded = jax.jit(jax.vmap(per_shard, axis_name="shards"))
  return float(jnp.mean(sharded(split(logits), {k: split(v) for k, v in batch.items()})))


@pytest.mark.parametrize("mode", ["boxinst", "bbox_soft"])
def test_sharded_box_losses_normalise_by_the_global_count(mode):
  """Shards with very different box areas: the mean of the per-shard losses is the global one."""
  rng = np.random.default_rng(11)
  image = rng.random((4, 16, 16, 3)).astype(np.float32)
  image[:, 4:12, 4:12] = [0.9, 0.1, 0.1]
  boxes = np.array([[[4, 4, 11, 11]], [[0, 0, 15, 15]], [[2, 2, 3, 3]], [[5, 5, 6, 6]]],
                   np.float32)
  classes = np.array([[1], [2], [1], [-1]], np.int32)
  valid = np.ones((4, 16, 16), bool)
  valid[0, :, 12:] = False
  batch = {"image": image, "boxes": boxes, "box_classes": classes, "valid": valid}
  logits = jnp.asarray(rng.normal(0, 2, (4, 16, 16, 3)).astype(np.float32))
  fn = functools.partial(box_loss, mode=mode)
  whole = float(jax.jit(fn)(logits, batch))
  assert _sharded_mean(fn, logits, batch, 2) == pytest.approx(whole, rel=1e-5)
  label_set = float(jax.jit(box_lib.box_label_set_nll)(logits, batch))
  assert _sharded_mean(box_lib.box_label_set_nll, logits, batch, 2) == pytest.approx(
      label_set, rel=1e-5)
