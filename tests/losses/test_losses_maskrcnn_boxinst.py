"""Box-supervised Mask R-CNN: box mask targets and ``maskrcnn_loss(mask_loss="boxinst")``.

References are independent of the code under test: ``torchvision.ops.roi_align`` of a box
rasterised by hand, Dice computed by hand on a tiny case, a brute-force NumPy double loop over
pixel pairs written from BoxInst's pairwise formula with ``skimage.color.rgb2lab`` colours,
finite differences, and the warm-up ramp's closed form.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg.losses as losses
from jaxseg.losses import _common
from jaxseg.losses.maskrcnn import BOXINST_TERMS, TERMS, maskrcnn_loss, maskrcnn_loss_terms
from jaxseg.models.detection import roi_heads
from jaxseg.train.step import loss_takes_step

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
skcolor = pytest.importorskip("skimage.color")
from torchvision.ops import roi_align as tv_roi_align  # noqa: E402

C = 3  # classes, background included
# Run op by op: the per-op compiles are cached per shape, so the tests share one shape
# (2 images x 2 RoIs x M x M) and each later call costs milliseconds.
BOXINST = functools.partial(maskrcnn_loss_terms, mask_loss="boxinst")


def _detector_outputs(n):
  """Small valid RPN and box-head outputs (their terms do not interact with the mask's)."""
  rng = np.random.default_rng(100 + n)
  a, s = 6, 4
  return {
      "rpn_logits": rng.normal(size=(n, a)).astype(np.float32),
      "rpn_deltas": rng.normal(size=(n, a, 4)).astype(np.float32),
      "rpn_labels": np.tile(np.asarray([1, 0, 0, -1, 0, 1], np.int32), (n, 1)),
      "rpn_targets": rng.normal(size=(n, a, 4)).astype(np.float32),
      "class_logits": rng.normal(size=(n, s, C)).astype(np.float32),
      "box_deltas": rng.normal(size=(n, s, 4)).astype(np.float32),
      "roi_labels": np.tile(np.asarray([1, 2, 0, 0], np.int32), (n, 1)),
      "roi_valid": np.ones((n, s), bool),
      "roi_targets": rng.normal(size=(n, s, 4)).astype(np.float32),
  }


def _outputs(logits, targets, valid, colors=None):
  logits = np.asarray(logits, np.float32)
  if colors is None:
    colors = np.full(logits.shape + (3,), 0.5, np.float32)
  return {**_detector_outputs(logits.shape[0]), "mask_logits": logits,
          "mask_targets": np.asarray(targets, np.float32), "mask_valid": np.asarray(valid),
          "mask_colors": np.asarray(colors, np.float32)}


def _logit(p):
  p = np.clip(np.asarray(p, np.float64), 1e-13, 1 - 1e-13)
  return np.log(p / (1 - p)).astype(np.float32)


# ----------------------------------------------------------------------------
# Box mask targets
# ----------------------------------------------------------------------------

def test_box_mask_targets_are_roi_align_of_the_rasterised_box():
  h, w = 40, 56
  gt = np.asarray([[3, 4, 20, 30], [10, 0, 39, 55], [25, 40, 31, 47]], np.float32)  # inclusive
  rois = np.asarray([[2.0, 3.5, 22.0, 33.0], [12.3, 1.0, 38.7, 50.2], [24.0, 38.0, 33.0, 50.0],
                     [0.0, 0.0, 40.0, 56.0], [5.0, 5.0, 9.0, 9.0]], np.float32)
  matched = np.asarray([0, 1, 2, 1, 0], np.int32)
  valid = np.asarray([True, True, True, True, False])
  out = np.asarray(jax.jit(roi_heads.box_mask_targets, static_argnums=4)(
      gt, rois, matched, valid, (h, w)))

  masks = np.zeros((len(gt), h, w), np.float32)
  for k, (y0, x0, y1, x1) in enumerate(gt.astype(int)):
    masks[k, y0:y1 + 1, x0:x1 + 1] = 1.0  # inclusive rows y0..y1, cols x0..x1
  xyxy = torch.tensor(rois[:, [1, 0, 3, 2]])
  idx = torch.tensor(matched, dtype=torch.float32)[:, None]
  ref = tv_roi_align(torch.tensor(masks)[:, None], torch.cat([idx, xyxy], 1), (28, 28), 1.0,
                     sampling_ratio=-1, aligned=False)[:, 0].numpy()
  assert out.shape == (5, 28, 28) and out.dtype == np.float32
  np.testing.assert_allclose(out[:4], ref[:4], atol=1e-5)
  assert not out[4].any()  # invalid slot
  assert ref[3].max() == pytest.approx(1.0) and 0 < ref[3].mean() < 1  # a footprint, not ones


def test_box_mask_targets_use_inclusive_pixel_boxes():
  """On an RoI whose 28 bins sample the 28 pixel centres, the target is the raster itself."""
  gt = np.asarray([[1, 2, 1, 2], [3, 4, 10, 6], [20, 0, 27, 27]], np.float32)
  rois = np.full((3, 4), -0.5, np.float32) + np.asarray([0, 0, 28, 28], np.float32)
  out = np.asarray(roi_heads.box_mask_targets(gt, rois, np.arange(3, dtype=np.int32),
                                              np.ones(3, bool), (28, 28)))
  expected = np.zeros((3, 28, 28), np.float32)
  expected[0, 1, 2] = 1  # a one-pixel box
  expected[1, 3:11, 4:7] = 1  # rows 3..10, cols 4..6
  expected[2, 20:, :] = 1
  np.testing.assert_allclose(out, expected, atol=1e-6)


# ----------------------------------------------------------------------------
# Projection term
# ----------------------------------------------------------------------------

def test_projection_hand_computed_dice():
  m = 10
  box = np.zeros((m, m), np.float32)
  box[1:3, 1:3] = 1.0
  # Image 0: slot 0 m = 0.5 everywhere, slot 1 padding (NaN logits must not count).
  # Image 1: slot 0 m = sigmoid(2) on row 0 only.
  logits = np.zeros((2, 2, m, m), np.float32)
  logits[0, 1] = np.nan
  logits[1, 0] = -40.0
  logits[1, 0, 0] = 2.0
  targets = np.stack([np.stack([box, np.full_like(box, np.nan)]), np.stack([box, box])])
  valid = np.asarray([[True, False], [True, False]])
  terms = BOXINST(_outputs(logits, targets, valid))

  # max_y and max_x of the box are both [0, 1, 1, 0, ..., 0].
  t = np.asarray([0.0, 1.0, 1.0] + [0.0] * 7)
  dice = lambda x: 1 - 2 * np.sum(x * t) / (np.sum(x * x) + np.sum(t * t) + 1e-5)
  half = np.full(m, 0.5)
  s = 1 / (1 + np.exp(-2.0))
  first = dice(half) + dice(half)
  second = dice(np.full(m, s)) + dice(np.asarray([s] + [0.0] * 9))  # max_y: all s; max_x: row 0
  assert first == pytest.approx(2 * (1 - 2 * 1.0 / (10 * 0.25 + 2 + 1e-5)))
  assert float(terms["loss_mask_projection"]) == pytest.approx((first + second) / 2, rel=1e-5)


def test_projection_is_zero_for_the_box_footprint_and_positive_otherwise():
  gt = np.asarray([[5, 3, 17, 20]], np.float32)
  rois = np.asarray([[2.0, 1.0, 21.5, 24.0]], np.float32)
  b = np.asarray(roi_heads.box_mask_targets(gt, rois, np.zeros(1, np.int32), np.ones(1, bool),
                                            (32, 32)))[None]  # [1, 1, 28, 28], soft edges
  assert 0 < b.mean() < 1 and ((b > 0) & (b < 1)).any()
  valid = np.asarray([[True, False], [False, False]])  # b in slot (0, 0); the rest padding

  def proj(logits):
    pad = lambda x: np.pad(x, ((0, 1), (0, 1), (0, 0), (0, 0)))
    return float(BOXINST(_outputs(pad(logits), pad(b), valid))["loss_mask_projection"])

  assert proj(_logit(b)) < 1e-5
  # Any mask with the box's projections scores 0 too: a cross through the box.
  cross = np.zeros_like(b)
  rows, cols = np.flatnonzero(b.max(axis=3)[0, 0]), np.flatnonzero(b.max(axis=2)[0, 0])
  cross[0, 0, rows, cols[len(cols) // 2]] = b[0, 0, rows, cols[len(cols) // 2]]
  cross[0, 0, rows[len(rows) // 2], cols] = b[0, 0, rows[len(rows) // 2], cols]
  assert proj(_logit(cross)) < 1e-5  # b is separable: the lines carry its whole profile
  shrunk = np.zeros_like(b)
  shrunk[..., 10:20, 8:18] = 1.0
  assert proj(_logit(shrunk)) > 0.1
  assert proj(np.zeros_like(b)) > 0.1  # m = 0.5 everywhere


# ----------------------------------------------------------------------------
# Pairwise term
# ----------------------------------------------------------------------------

def _pairwise_case(seed=0, n=2, p=2, m=10):
  """Colours in flat patches (similar inside a patch, dissimilar across), random logits."""
  rng = np.random.default_rng(seed)
  palette = rng.uniform(0.1, 0.9, (4, 3))
  patch = rng.integers(0, 4, (n, p, m // 5 + 1, m // 5 + 1)).repeat(5, 2).repeat(5, 3)
  colors = palette[patch[:, :, :m, :m]] + rng.normal(0, 0.0005, (n, p, m, m, 3))
  logits = rng.normal(0, 2, (n, p, m, m)).astype(np.float32)
  targets = np.zeros((n, p, m, m), np.float32)
  targets[..., 2:8, 1:9] = 1.0
  targets[..., 2:8, 1] = 0.5  # the edge column counts (b >= 0.5)
  targets[..., 1, 1:9] = 0.45  # that row does not
  valid = np.asarray([[True, True], [True, False]])[:n, :p]
  return logits, targets, valid, colors.clip(0, 1).astype(np.float32)


def _brute_force_pairwise(logits, targets, valid, colors, tau=0.3, size=3, dilation=2):
  """sum over pairs (i, j) with j - i in the dilated kernel, b_i >= 0.5 and S_ij >= tau of
  -log(p_i p_j + (1 - p_i)(1 - p_j)), divided by the number of such pairs."""
  r = size // 2
  kernel = {(dy * dilation, dx * dilation) for dy in range(-r, r + 1) for dx in range(-r, r + 1)}
  kernel.discard((0, 0))
  total, count, margins = 0.0, 0, []
  n, p, m, _ = logits.shape
  for a in range(n):
    for k in range(p):
      if not valid[a, k]:
        continue
      lab = skcolor.rgb2lab(colors[a, k].astype(np.float64))
      prob = 1 / (1 + np.exp(-logits[a, k].astype(np.float64)))
      for yi in range(m):
        for xi in range(m):
          for yj in range(m):
            for xj in range(m):
              if (yj - yi, xj - xi) not in kernel or targets[a, k, yi, xi] < 0.5:
                continue
              sim = np.exp(-np.linalg.norm(lab[yi, xi] - lab[yj, xj]) / 2)
              margins.append(abs(sim - tau))
              if sim >= tau:
                pi, pj = prob[yi, xi], prob[yj, xj]
                total += -np.log(pi * pj + (1 - pi) * (1 - pj))
                count += 1
  return total / max(count, 1), count, min(margins)


def test_pairwise_matches_brute_force_pairs():
  logits, targets, valid, colors = _pairwise_case()
  ref, count, margin = _brute_force_pairwise(logits, targets, valid, colors)
  assert count > 50 and margin > 1e-3  # both kinds of edges, none near the threshold
  logits[1, 1] = np.nan  # padding must not count
  got = float(BOXINST(_outputs(logits, targets, valid, colors),
                      pairwise_dilation=2)["loss_mask_pairwise"])
  assert got == pytest.approx(ref, rel=1e-4)
  # The default: the 8 nearest neighbours (dilation 1).
  logits[1, 1] = 0.0
  ref1, _, _ = _brute_force_pairwise(logits, targets, valid, colors, dilation=1)
  logits[1, 1] = np.nan
  got = float(BOXINST(_outputs(logits, targets, valid, colors))["loss_mask_pairwise"])
  assert got == pytest.approx(ref1, rel=1e-4) and abs(ref1 - ref) > 1e-3
  # A 5x5 kernel at dilation 1 and another threshold.
  logits[1, 1] = 0.0
  ref, _, margin = _brute_force_pairwise(logits, targets, valid, colors, tau=0.5, size=5,
                                         dilation=1)
  got = BOXINST(_outputs(logits, targets, valid, colors), color_threshold=0.5, pairwise_size=5,
                pairwise_dilation=1)["loss_mask_pairwise"]
  assert margin > 1e-3 and float(got) == pytest.approx(ref, rel=1e-4)


def test_pairwise_is_stable_for_saturated_logits():
  """Confident disagreeing neighbours give ~|logit| per edge, not inf; agreement gives ~0."""
  logits, targets, valid, colors = _pairwise_case()
  colors[:] = 0.5  # every edge similar
  sign = np.where(np.indices(logits.shape[2:]).sum(0) % 4 < 2, 1.0, -1.0)
  out_args = _outputs(np.float32(60.0) * sign * np.ones_like(logits), targets, valid, colors)
  out = BOXINST(out_args)
  assert np.isfinite(float(out["loss_mask_pairwise"])) and float(out["loss_mask_pairwise"]) > 10
  grads = jax.grad(lambda x: BOXINST(dict(out_args, mask_logits=x))["loss_mask_pairwise"])(
      jnp.asarray(np.float32(60.0) * sign * np.ones_like(logits)))
  assert np.isfinite(np.asarray(grads)).all()
  same = BOXINST(_outputs(np.full_like(logits, 60.0), targets, valid, colors))
  assert float(same["loss_mask_pairwise"]) < 1e-6


def test_gradient_matches_finite_differences():
  logits, targets, valid, colors = _pairwise_case(seed=3)
  rng = np.random.default_rng(3)
  # Logits spaced 1/30 apart so the small steps below never change a max-projection's argmax.
  logits = (rng.permutation(logits.size).reshape(logits.shape) / 30.0 - 3.3).astype(np.float32)
  out = _outputs(logits, targets, valid, colors)

  def f(x):
    t = BOXINST(dict(out, mask_logits=x))
    return t["loss_mask_projection"] + 0.7 * t["loss_mask_pairwise"]

  x = jnp.asarray(logits)
  g = np.asarray(jax.grad(f)(x))
  assert not g[1, 1].any()  # the padding slot gets no gradient
  direction = rng.uniform(-1, 1, logits.shape).astype(np.float32) * valid[..., None, None]
  eps = 0.01
  fd = (float(f(x + eps * direction)) - float(f(x - eps * direction))) / (2 * eps)
  assert fd == pytest.approx(float(np.sum(g * direction)), rel=2e-2)
  for idx in [(0, 0, 4, 3), (0, 1, 2, 7), (1, 0, 5, 5)]:
    e = np.zeros_like(logits)
    e[idx] = eps
    fd = (float(f(x + e)) - float(f(x - e))) / (2 * eps)
    assert fd == pytest.approx(g[idx], rel=5e-2, abs=1e-4), idx


# ----------------------------------------------------------------------------
# Warm-up, totals, the train step's step, settings
# ----------------------------------------------------------------------------

def test_warmup_ramp_and_total():
  logits, targets, valid, colors = _pairwise_case()
  out = _outputs(logits, targets, valid, colors)
  full = BOXINST(out)
  pair = float(full["loss_mask_pairwise"])
  assert pair > 0
  for step, factor in [(0, 0.0), (250, 0.25), (1000, 1.0), (5000, 1.0)]:
    t = BOXINST(out, warmup_steps=1000, step=jnp.asarray(step, jnp.int32), pairwise_weight=2.0)
    assert float(t["loss_mask_pairwise"]) == pytest.approx(2.0 * factor * pair, rel=1e-6)
  # BoxInst's default: 10k steps; no step (outside the train step) = the full weight.
  assert float(BOXINST(out, step=2500)["loss_mask_pairwise"]) == pytest.approx(pair / 4, rel=1e-6)
  assert float(BOXINST(out, warmup_steps=0, step=0)["loss_mask_pairwise"]) == pytest.approx(pair)
  assert set(full) == set(BOXINST_TERMS) and "loss_mask" not in full
  total = maskrcnn_loss(out, mask_loss="boxinst", step=500,
                        weights={"loss_mask_projection": 2.0, "loss_classifier": 0.5})
  t = BOXINST(out, step=500)
  expected = sum(t.values()) + t["loss_mask_projection"] - 0.5 * t["loss_classifier"]
  assert float(total) == pytest.approx(float(expected), rel=1e-6)


def test_bce_ignores_step_and_train_step_passes_it():
  logits, targets, valid, colors = _pairwise_case()
  out = _outputs(logits, np.clip(targets, 0, 1), valid, colors)
  plain = maskrcnn_loss(out)
  assert float(maskrcnn_loss(out, step=jnp.asarray(3))) == float(plain)
  assert set(maskrcnn_loss_terms(out, step=7)) == set(TERMS)
  assert loss_takes_step(losses.maskrcnn_loss)
  assert loss_takes_step(functools.partial(losses.maskrcnn_loss, mask_loss="boxinst"))


def test_sharded_normalisation_equals_jit():
  """Under the pmap step's global normalisation, shards with uneven positives and edges."""
  logits, targets, valid, colors = _pairwise_case()
  targets[1, 0, 2:8] = 0.0  # the second shard: one positive with only a few edges
  targets[1, 0, 4, 4] = 1.0
  out = _outputs(logits, targets, valid, colors)
  whole = {k: float(v) for k, v in BOXINST(out).items()}

  def per_shard(o):
    with _common.batch_sharded_over("shards"):
      return BOXINST(o)

  split = lambda x: jnp.asarray(x).reshape((2, 1) + x.shape[1:])
  terms = jax.jit(jax.vmap(per_shard, axis_name="shards"))(jax.tree.map(split, out))
  for k in ("loss_mask_projection", "loss_mask_pairwise"):
    assert float(jnp.mean(terms[k])) == pytest.approx(whole[k], rel=1e-5), k


def test_invalid_settings_and_outputs():
  logits, targets, valid, colors = _pairwise_case()
  out = _outputs(logits, targets, valid, colors)
  with pytest.raises(ValueError, match="mask_loss must be one of"):
    maskrcnn_loss(out, mask_loss="dice")
  missing = {k: v for k, v in out.items() if k != "mask_colors"}
  with pytest.raises(ValueError, match="mask_supervision='boxes'"):
    maskrcnn_loss(missing, mask_loss="boxinst")
  maskrcnn_loss(missing)  # "bce" does not need the colours
  with pytest.raises(ValueError, match=r"mask_colors'\] must be \[N, P, M, M, 3\]"):
    maskrcnn_loss(dict(out, mask_colors=colors[..., :2]), mask_loss="boxinst")
  with pytest.raises(ValueError, match="unknown loss terms"):
    maskrcnn_loss(out, mask_loss="boxinst", weights={"loss_mask": 1.0})
  with pytest.raises(ValueError, match="unknown loss terms"):
    maskrcnn_loss(out, weights={"loss_mask_pairwise": 1.0})
  for kwargs, match in [(dict(pairwise_weight=-1.0), "pairwise_weight"),
                        (dict(color_threshold=1.5), "color_threshold"),
                        (dict(pairwise_size=4), "pairwise_size"),
                        (dict(pairwise_dilation=0), "pairwise_dilation"),
                        (dict(warmup_steps=-5), "warmup_steps")]:
    with pytest.raises(ValueError, match=match):
      maskrcnn_loss(out, mask_loss="boxinst", **kwargs)
