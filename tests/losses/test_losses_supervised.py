"""Cross-entropy and partial cross-entropy against hand computations and torch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.losses import cross_entropy, partial_cross_entropy
from jaxseg.losses.supervised import pixel_nll


def _nll(row, label):
  row = np.asarray(row, np.float64)
  return float(np.log(np.sum(np.exp(row))) - row[label])


def test_hand_computed_value():
  logits = np.array([[[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]]], np.float32)  # [1,1,2,3]
  mask = np.array([[[0, 2]]], np.int32)
  expected = (_nll([2, 0, -1], 0) + np.log(3.0)) / 2
  assert float(cross_entropy(logits, {"mask": mask})) == pytest.approx(expected, rel=1e-6)


def test_ignore_index_skips_pixels_and_empty_is_zero():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  mask = rng.integers(0, 3, size=(2, 4, 5)).astype(np.int32)
  ignored = mask.copy()
  ignored[:, :2] = 255
  kept = np.stack([logits[n, 2:][i, j] for n in range(2) for i in range(2) for j in range(5)])
  labels = np.stack([mask[n, 2:][i, j] for n in range(2) for i in range(2) for j in range(5)])
  expected = np.mean([_nll(r, l) for r, l in zip(kept, labels)])
  assert float(cross_entropy(logits, {"mask": ignored})) == pytest.approx(expected, rel=1e-5)
  nothing = np.full_like(mask, 255)
  assert float(cross_entropy(logits, {"mask": nothing})) == 0.0
  nll, labelled = pixel_nll(jnp.asarray(logits), jnp.asarray(ignored))
  assert not bool(jnp.any(labelled[:, :2])) and float(jnp.max(jnp.abs(nll[:, :2]))) == 0.0


def test_class_weights_match_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 7, 4)).astype(np.float32)
  mask = rng.integers(0, 4, size=(2, 6, 7)).astype(np.int32)
  mask[0, 0] = 255
  weights = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
  ref = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights), ignore_index=255)(
      torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(mask, dtype=torch.long))
  ours = cross_entropy(logits, {"mask": mask}, class_weights=weights)
  assert float(ours) == pytest.approx(float(ref), rel=1e-5)
  unweighted = torch.nn.CrossEntropyLoss(ignore_index=255)(
      torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(mask, dtype=torch.long))
  assert float(cross_entropy(logits, {"mask": mask})) == pytest.approx(float(unweighted), rel=1e-5)


def test_valid_mask_equals_ignoring_those_pixels():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  mask = rng.integers(0, 3, size=(2, 5, 5)).astype(np.int32)
  valid = rng.random((2, 5, 5)) > 0.3
  a = cross_entropy(logits, {"mask": mask, "valid": valid})
  b = cross_entropy(logits, {"mask": np.where(valid, mask, 255)})
  assert float(a) == pytest.approx(float(b), rel=1e-6)
  assert float(a) != pytest.approx(float(cross_entropy(logits, {"mask": mask})), rel=1e-3)


def test_partial_cross_entropy_reads_scribbles():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(1, 4, 4, 3)).astype(np.float32)
  scribble = np.full((1, 4, 4), 255, np.int32)
  scribble[0, 1, 1], scribble[0, 2, 3] = 2, 0
  expected = (_nll(logits[0, 1, 1], 2) + _nll(logits[0, 2, 3], 0)) / 2
  ours = partial_cross_entropy(logits, {"scribble": scribble})
  assert float(ours) == pytest.approx(expected, rel=1e-5)


def test_gradient_matches_formula_and_finite_differences():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(1, 3, 4, 3)).astype(np.float32)
  mask = rng.integers(0, 3, size=(1, 3, 4)).astype(np.int32)
  mask[0, 0, 0] = 255
  fn = lambda x: cross_entropy(x, {"mask": mask})
  grad = np.asarray(jax.grad(fn)(jnp.asarray(logits)))
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  onehot = np.eye(3)[np.where(mask == 255, 0, mask)]
  expected = (probs - onehot) * (mask != 255)[..., None] / np.sum(mask != 255)
  np.testing.assert_allclose(grad, expected, atol=1e-6)
  direction = rng.normal(size=logits.shape).astype(np.float32)
  eps = 1e-2
  fd = (float(fn(logits + eps * direction)) - float(fn(logits - eps * direction))) / (2 * eps)
  assert fd == pytest.approx(float(np.sum(grad * direction)), rel=2e-3)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="logits must be"):
    cross_entropy(np.zeros((4, 4, 3), np.float32), {"mask": np.zeros((4, 4), np.int32)})
  with pytest.raises(ValueError, match="does not match"):
    cross_entropy(np.zeros((1, 4, 4, 3), np.float32), {"mask": np.zeros((1, 4, 5), np.int32)})


@pytest.mark.parametrize("class_weights", [None, (0.5, 2.0, 1.0)])
def test_sharded_mean_is_the_global_mean(class_weights):
  """Under batch_sharded_over (the pmap step) each shard divides by the global count, so the
  mean over shards of the loss and of its gradient equal the whole batch's, however unevenly
  the shards hold scribbled pixels. A named vmap axis stands in for pmap's devices."""
  from jaxseg.losses import _common
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 6, 5, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(4, 6, 5)).astype(np.int32)
  scribble = np.where(rng.random(labels.shape) < 0.7, labels, 255).astype(np.int32)
  scribble[2:] = 255
  scribble[2:, 0, 0] = labels[2:, 0, 0]  # shard 1: one scribbled pixel per image
  loss = lambda lg, sc: partial_cross_entropy(lg, {"scribble": sc}, class_weights=class_weights)
  shard = lambda x: x.reshape((2, 2) + x.shape[1:])
  whole, whole_grad = jax.value_and_grad(loss)(logits, scribble)

  def sharded(lg, sc, axis_name):
    with _common.batch_sharded_over(axis_name):
      per_shard = jax.vmap(loss, axis_name="shards")(lg, sc)
    return jnp.mean(per_shard)

  value, grad = jax.value_and_grad(sharded)(shard(logits), shard(scribble), "shards")
  assert float(value) == pytest.approx(float(whole), rel=1e-5)
  np.testing.assert_allclose(np.asarray(grad).reshape(logits.shape), whole_grad, rtol=1e-4,
                             atol=1e-7)
  # Each shard normalised by its own count (the mean of means) is far off on this batch.
  mean_of_means = sharded(shard(logits), shard(scribble), None)
  assert abs(float(mean_of_means) - float(whole)) > 0.05
