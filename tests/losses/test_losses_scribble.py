"""Scribble losses: pCE + pairwise with warm-up, and the ScribbleSup-style E-step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.losses import crf_pairwise, partial_cross_entropy, scribble_em_loss, scribble_loss
from jaxseg.losses import cross_entropy, scribble_pseudo_labels


def _two_region_batch(size=24, n=2, seed=0):
  """Left/right halves of distinct colours, one scribble in each half."""
  rng = np.random.default_rng(seed)
  image = np.zeros((n, size, size, 3), np.float32)
  image[:, :, : size // 2] = [0.2, 0.3, 0.8]
  image[:, :, size // 2:] = [0.8, 0.7, 0.1]
  image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1).astype(np.float32)
  scribble = np.full((n, size, size), 255, np.int32)
  scribble[:, 4:size - 4, 3] = 2
  scribble[:, 4:size - 4, size - 4] = 1
  truth = np.where(np.arange(size) < size // 2, 2, 1)[None, None].repeat(size, 1).repeat(n, 0)
  return {"image": image, "scribble": scribble}, truth


def test_scribble_loss_unbalanced_is_pce_plus_weighted_pairwise():
  batch, _ = _two_region_batch()
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 1, (2, 24, 24, 3)).astype(np.float32)
  kw = dict(kernel="local", sigma_xy=3.0, sigma_rgb=10.0, radius=2)
  pce = float(partial_cross_entropy(logits, batch))
  pair = float(crf_pairwise(logits, batch, **kw))
  assert pair > 0
  ours = scribble_loss(logits, batch, pairwise_weight=0.3, balance="none", **kw)
  assert float(ours) == pytest.approx(pce + 0.3 * pair, rel=1e-5)
  # The pCE part, by hand.
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  where = batch["scribble"] != 255
  hand = -np.mean(np.take_along_axis(logp, np.where(where, batch["scribble"], 0)[..., None],
                                     -1)[..., 0][where])
  assert float(scribble_loss(logits, batch, pairwise_weight=0.0)) == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize("kw", [dict(kernel="local", radius=2),
                                dict(kernel="dense", method="exact")])
@pytest.mark.parametrize("weight", [0.3, 2.0])
def test_balanced_pairwise_gradient_is_a_fixed_fraction_of_pce(kw, weight):
  """The default balance: the pairwise part of the gradient has ``weight`` times the L1 mass of
  pCE's, whatever the raw scale of the pairwise term (here x1000 apart through sigma_xy)."""
  batch, _ = _two_region_batch()
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(0, 1, (2, 24, 24, 3)), jnp.float32)
  g_pce = jax.grad(lambda x: partial_cross_entropy(x, batch))(logits)
  for sigma_xy in (2.0, 50.0):
    g = jax.grad(lambda x: scribble_loss(x, batch, pairwise_weight=weight, sigma_xy=sigma_xy,
                                         **kw))(logits)
    g_pair = g - g_pce
    assert float(jnp.sum(jnp.abs(g_pair))) == pytest.approx(
        weight * float(jnp.sum(jnp.abs(g_pce))), rel=1e-3)
    # ... and points where the pairwise term's own gradient points.
    g_raw = jax.grad(lambda x: crf_pairwise(x, batch, sigma_xy=sigma_xy, **kw))(logits)
    cos = jnp.sum(g_pair * g_raw) / (jnp.linalg.norm(g_pair) * jnp.linalg.norm(g_raw))
    assert float(cos) > 0.999


def test_warmup_ramps_the_pairwise_weight_without_retracing():
  batch, _ = _two_region_batch()
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 1, (2, 24, 24, 3)).astype(np.float32)
  kw = dict(kernel="local", radius=2, pairwise_weight=0.5, balance="none")
  pce = float(partial_cross_entropy(logits, batch))
  pair = float(crf_pairwise(logits, batch, kernel="local", radius=2))
  fn = jax.jit(functools.partial(scribble_loss, warmup_steps=1000, **kw))
  for step, ramp in ((0, 0.0), (250, 0.25), (1000, 1.0), (5000, 1.0)):
    assert float(fn(logits, batch, step=jnp.int32(step))) == pytest.approx(
        pce + ramp * 0.5 * pair, rel=1e-5)
  assert fn._cache_size() == 1
  with pytest.raises(ValueError, match="step"):
    scribble_loss(logits, batch, warmup_steps=10)


def test_pairwise_term_moves_unscribbled_pixels_towards_the_region_label():
  """One gradient step on the pairwise term alone lowers it and agrees with the regions."""
  batch, truth = _two_region_batch(n=1)
  logits = np.zeros((1, 24, 24, 3), np.float32)
  logits[..., 2] = np.where(truth == 2, 1.0, 0.0)[0]
  logits[..., 1] = np.where(truth == 1, 1.0, 0.0)[0]
  logits[0, :, 10:14] = 0.0  # a strip of undecided pixels on both sides of the edge
  fn = functools.partial(crf_pairwise, kernel="local", sigma_xy=3.0, sigma_rgb=10.0, radius=3)
  grad = np.asarray(jax.grad(fn)(logits, batch))
  strip = grad[0, :, 10:14]
  labels = truth[0, :, 10:14]
  # Descent direction raises the logit of the region's own class.
  assert np.all(-strip[..., 2][labels == 2] > -strip[..., 1][labels == 2])
  assert np.all(-strip[..., 1][labels == 1] > -strip[..., 2][labels == 1])


def test_pseudo_labels_recover_regions_from_scribbles():
  batch, truth = _two_region_batch()
  logits = np.zeros((2, 24, 24, 3), np.float32)  # an uninformed network
  labels = np.asarray(jax.jit(functools.partial(
      scribble_pseudo_labels, iterations=5, bilateral_weight=5.0, bilateral_sigma_xy=20.0,
      bilateral_sigma_rgb=20.0))(logits, batch))
  scribbled = batch["scribble"] != 255
  np.testing.assert_array_equal(labels[scribbled], batch["scribble"][scribbled])
  assert set(np.unique(labels)) <= {1, 2}  # only the image's scribbled classes
  assert np.mean(labels == truth) > 0.95


def test_pseudo_labels_restrict_to_scribbled_classes_even_against_the_network():
  batch, _ = _two_region_batch(n=1)
  logits = np.zeros((1, 24, 24, 4), np.float32)
  logits[..., 3] = 10.0  # the network insists on a class nobody scribbled
  labels = np.asarray(scribble_pseudo_labels(logits, batch, iterations=2))
  assert 3 not in set(np.unique(labels))


def test_low_confidence_and_padding_are_ignored():
  batch, _ = _two_region_batch(n=1)
  batch["valid"] = np.ones((1, 24, 24), bool)
  batch["valid"][:, 20:] = False
  logits = np.zeros((1, 24, 24, 3), np.float32)
  labels = np.asarray(scribble_pseudo_labels(logits, batch, iterations=0, min_confidence=0.6))
  assert np.all(labels[:, 20:] == 255)
  scribbled = (batch["scribble"] != 255) & batch["valid"]
  assert np.all(labels[scribbled] != 255)  # clamped pixels are certain
  assert np.all(labels[~scribbled & batch["valid"]] == 255)  # a uniform 1/2 < 0.6


def test_em_loss_is_cross_entropy_on_stop_gradient_labels():
  batch, _ = _two_region_batch()
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(0, 1, (2, 24, 24, 3)).astype(np.float32))
  kw = dict(iterations=3, bilateral_sigma_xy=20.0, bilateral_sigma_rgb=20.0)
  labels = scribble_pseudo_labels(logits, batch, **kw)
  em = functools.partial(scribble_em_loss, **kw)
  assert float(em(logits, batch)) == pytest.approx(
      float(cross_entropy(logits, {"mask": labels})), rel=1e-6)
  grad = jax.grad(em)(logits, batch)
  ref = jax.grad(lambda x: cross_entropy(x, {"mask": labels}))(logits)
  np.testing.assert_allclose(grad, ref, atol=1e-7)


def test_bad_inputs():
  batch, _ = _two_region_batch(n=1)
  logits = np.zeros((1, 24, 24, 3), np.float32)
  with pytest.raises(ValueError, match=r"needs batch\['scribble'\]"):
    scribble_loss(logits, {"image": batch["image"]})
  with pytest.raises(TypeError, match="integer"):
    scribble_loss(logits, dict(batch, scribble=batch["scribble"].astype(np.float32)))
  with pytest.raises(ValueError, match="warmup_steps"):
    scribble_loss(logits, batch, warmup_steps=-1)
  with pytest.raises(ValueError, match="min_confidence"):
    scribble_pseudo_labels(logits, batch, min_confidence=1.5)
  with pytest.raises(ValueError, match=r"batch\['scribble'\] must have shape"):
    scribble_em_loss(logits, dict(batch, scribble=batch["scribble"][:, :4]))
