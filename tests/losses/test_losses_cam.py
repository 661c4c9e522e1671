"""Class-activation-map losses for image-level tags: the pseudo-mask E-step and the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.losses import cam_loss, cam_pseudo_labels, cross_entropy
from jaxseg.losses.cam import class_activation_maps, multilabel_loss, pooled_scores


def _scene(size=32):
  """A red square (class 2) on a grey background; tags: background + class 2 of 4."""
  image = np.full((1, size, size, 3), 0.5, np.float32)
  truth = np.zeros((1, size, size), np.int32)
  truth[0, 8:22, 10:24] = 2
  image[truth == 2] = [0.9, 0.1, 0.1]
  tags = np.array([[1, 0, 1, 0]], np.float32)
  return {"image": image, "tags": tags}, truth


def test_cams_are_relu_logits_over_their_peak_for_tagged_foreground_only():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (1, 6, 5, 4)).astype(np.float32)
  tags = jnp.asarray([[True, False, True, True]])
  cams = np.asarray(class_activation_maps(jnp.asarray(logits), tags, jnp.ones((1, 6, 5))))
  for c in (2, 3):
    act = np.maximum(logits[0, ..., c], 0)
    np.testing.assert_allclose(cams[0, ..., c], act / act.max(), rtol=1e-6)
  assert np.all(cams[..., 0] == 0) and np.all(cams[..., 1] == 0)  # background, untagged


def test_pseudo_labels_snap_a_coarse_activation_to_the_object():
  """A blurred, off-centre activation blob (what a stride-16 classifier gives) becomes the
  object's exact outline through the dense CRF, and no untagged class appears."""
  batch, truth = _scene()
  yy, xx = np.mgrid[:32, :32]
  blob = np.exp(-((yy - 13.0) ** 2 + (xx - 19.0) ** 2) / (2 * 6.0 ** 2))
  logits = np.zeros((1, 32, 32, 4), np.float32)
  logits[0, :, :, 2] = 5.0 * blob
  logits[0, :, :, 3] = 4.0  # an untagged class scoring everywhere
  raw = np.where(blob > 0.3, 2, 0)[None]
  labels = np.asarray(cam_pseudo_labels(jnp.asarray(logits), batch))
  iou = lambda a: np.sum((a == 2) & (truth == 2)) / np.sum((a == 2) | (truth == 2))
  assert iou(labels) > iou(raw) + 0.15, (iou(raw), iou(labels))
  assert iou(labels) > 0.9
  assert not np.any(labels == 3) and not np.any(labels == 1)


def test_untagged_images_and_padding_are_ignored():
  batch, _ = _scene()
  batch["tags"] = np.array([[1, 0, 0, 0]], np.float32)  # background only
  labels = np.asarray(cam_pseudo_labels(jnp.zeros((1, 32, 32, 4)), batch))
  assert np.all(labels == 255)
  batch, _ = _scene()
  batch["valid"] = np.ones((1, 32, 32), bool)
  batch["valid"][:, 28:] = False
  labels = np.asarray(cam_pseudo_labels(jnp.zeros((1, 32, 32, 4)), batch))
  assert np.all(labels[:, 28:] == 255)


def test_multilabel_term_is_bce_of_mean_logits_without_background():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 1, (2, 5, 7, 3)).astype(np.float32)
  tags = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  s = logits.mean(axis=(1, 2))
  bce = -(tags * np.log(1 / (1 + np.exp(-s))) + (1 - tags) * np.log(1 - 1 / (1 + np.exp(-s))))
  hand = bce[:, 1:].mean()
  ours = multilabel_loss(jnp.asarray(logits), {"tags": tags})
  assert float(ours) == pytest.approx(hand, rel=1e-5)
  np.testing.assert_allclose(np.asarray(pooled_scores(jnp.asarray(logits), jnp.ones((2, 5, 7)))),
                             s, rtol=1e-5)


def test_cam_loss_ramps_cross_entropy_on_stop_gradient_pseudo_labels():
  batch, _ = _scene(16)
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(0, 1, (1, 16, 16, 4)), jnp.float32)
  cls = float(multilabel_loss(logits, batch))
  labels = cam_pseudo_labels(logits, batch)
  ce = float(cross_entropy(logits, {"mask": labels}))
  fn = jax.jit(lambda x, s: cam_loss(x, batch, warmup_steps=100, step=s))
  for step, ramp in ((0, 0.0), (50, 0.5), (400, 1.0)):
    assert float(fn(logits, jnp.int32(step))) == pytest.approx(cls + ramp * ce, rel=1e-5)
  # The pseudo-labels carry no gradient: the loss's gradient is the two terms' own.
  g = jax.grad(lambda x: cam_loss(x, batch))(logits)
  g_cls = jax.grad(lambda x: multilabel_loss(x, batch))(logits)
  g_ce = jax.grad(lambda x: cross_entropy(x, {"mask": labels}))(logits)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_cls + g_ce), atol=1e-6)


def test_cam_errors_name_the_problem():
  batch, _ = _scene(8)
  with pytest.raises(ValueError, match="tags"):
    cam_loss(jnp.zeros((1, 8, 8, 4)), {"image": batch["image"]})
  with pytest.raises(ValueError, match=r"batch\['tags'\] must be \[N,C\]"):
    cam_loss(jnp.zeros((1, 8, 8, 3)), batch)
  with pytest.raises(ValueError, match="background_score"):
    cam_pseudo_labels(jnp.zeros((1, 8, 8, 4)), batch, background_score=1.5)
  with pytest.raises(ValueError, match="step"):
    cam_loss(jnp.zeros((1, 8, 8, 4)), batch, warmup_steps=10)
