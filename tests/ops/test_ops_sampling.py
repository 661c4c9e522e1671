"""jaxseg.ops.sampling against torchvision's Matcher and BalancedPositiveNegativeSampler."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as det_utils

from jaxseg import ops

_match = jax.jit(ops.match, static_argnums=(1, 2), static_argnames="allow_low_quality")


def _torch_match(iou, high, low, allow):
  """torchvision's Matcher, as (matched_idx clamped at 0 for non-matches, label)."""
  m = det_utils.Matcher(high, low, allow_low_quality_matches=allow)(torch.from_numpy(iou)).numpy()
  labels = np.where(m >= 0, 1, np.where(m == det_utils.Matcher.BELOW_LOW_THRESHOLD, 0, -1))
  return np.maximum(m, 0), labels


def _iou_matrices():
  rng = np.random.default_rng(0)
  yield "random", rng.uniform(0, 1, (6, 40)).astype(np.float32)
  # Few distinct values: ties in both the per-anchor argmax and the per-gt maximum.
  yield "tied", (rng.integers(0, 5, (5, 60)) / 4.0).astype(np.float32)
  sparse = rng.uniform(0, 1, (4, 30)).astype(np.float32)
  sparse[sparse < 0.8] = 0.0
  sparse[2] = 0.0  # a gt that overlaps nothing: every anchor ties at 0 for it
  yield "sparse", sparse
  # An anchor that is the best of gt 1 but has its argmax on gt 0: low-quality keeps gt 0.
  yield "restore", np.array([[0.6, 0.1, 0.0], [0.5, 0.2, 0.1]], np.float32)


@pytest.mark.parametrize("high,low,allow", [(0.7, 0.3, True), (0.7, 0.3, False),
                                            (0.5, 0.5, False)])
@pytest.mark.parametrize("name,iou", list(_iou_matrices()), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_match_equals_torchvision_matcher(name, iou, high, low, allow):
  want_idx, want_labels = _torch_match(iou, high, low, allow)
  idx, labels = _match(jnp.asarray(iou), high, low, allow_low_quality=allow)
  np.testing.assert_array_equal(np.asarray(labels), want_labels)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  assert idx.dtype == jnp.int32 and labels.dtype == jnp.int32


def test_match_restores_the_argmax_gt_hand_case():
  iou = jnp.array([[0.6, 0.1, 0.0], [0.5, 0.2, 0.1]])
  idx, labels = _match(iou, 0.7, 0.3, allow_low_quality=True)
  # Anchor 0 is gt 0's and gt 1's best; it keeps its argmax gt 0. Anchor 1 is nobody's best
  # except... gt 1's maximum is 0.5 on anchor 0, so anchor 1 stays background.
  np.testing.assert_array_equal(np.asarray(labels), [1, 0, 0])
  np.testing.assert_array_equal(np.asarray(idx), [0, 0, 0])


def test_match_padded_gt_rows_are_ignored_batched():
  rng = np.random.default_rng(1)
  iou = rng.uniform(0, 1, (2, 5, 25)).astype(np.float32)
  iou = np.round(iou * 4) / 4  # ties
  valid = np.array([[True, False, True, True, False], [False, False, False, False, False]])
  iou[0, 1] = 1.0  # a padded row with high IoU must never win
  idx, labels = _match(jnp.asarray(iou), 0.7, 0.3, allow_low_quality=True,
                       gt_valid=jnp.asarray(valid))
  rows = np.nonzero(valid[0])[0]
  want_idx, want_labels = _torch_match(iou[0, rows], 0.7, 0.3, True)
  np.testing.assert_array_equal(np.asarray(labels[0]), want_labels)
  np.testing.assert_array_equal(np.asarray(idx[0]), np.where(want_labels == 1, rows[want_idx], 0))
  # No valid gt: everything is background.
  np.testing.assert_array_equal(np.asarray(labels[1]), 0)
  np.testing.assert_array_equal(np.asarray(idx[1]), 0)
  idx, labels = ops.match(jnp.zeros((0, 7)), 0.7, 0.3, allow_low_quality=True)
  assert idx.shape == labels.shape == (7,) and not np.asarray(labels).any()


def test_match_validates():
  with pytest.raises(ValueError, match="low"):
    ops.match(jnp.zeros((2, 3)), 0.3, 0.7)
  with pytest.raises(ValueError, match="gt_valid"):
    ops.match(jnp.zeros((2, 3)), 0.7, 0.3, gt_valid=jnp.ones((3,), bool))
  with pytest.raises(ValueError, match="iou"):
    ops.match(jnp.zeros((3,)), 0.7, 0.3)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sample(labels, key, num_samples, fraction):
  pos, neg = ops.balanced_sample(labels, key, num_samples, fraction)
  return (pos, neg) + ops.sample_indices(pos, neg, num_samples)


@pytest.mark.parametrize("n_pos,n_neg,num_samples,fraction", [
    (3, 100, 16, 0.5), (50, 100, 16, 0.5), (50, 4, 16, 0.5), (2, 3, 16, 0.25), (0, 0, 8, 0.5),
    (10, 10, 8, 0.25), (0, 30, 8, 0.5), (150, 0, 8, 0.5)])
def test_balanced_sample_counts_equal_torchvision(n_pos, n_neg, num_samples, fraction):
  rng = np.random.default_rng(n_pos * 7 + n_neg)
  # A fixed length (ignored -1 filling up) so that the cases share compilations.
  labels = np.concatenate([rng.integers(1, 4, n_pos), np.zeros(n_neg, int),
                           -np.ones(160 - n_pos - n_neg, int)])
  rng.shuffle(labels)
  tp, tn = det_utils.BalancedPositiveNegativeSampler(num_samples, fraction)(
      [torch.from_numpy(labels)])
  pos, neg, idx, valid = _sample(jnp.asarray(labels, jnp.int32), jax.random.key(3), num_samples,
                                 fraction)
  pos, neg = np.asarray(pos), np.asarray(neg)
  assert pos.sum() == int(tp[0].sum()) and neg.sum() == int(tn[0].sum())
  assert np.all(labels[pos] >= 1) and np.all(labels[neg] == 0)
  want = torch.where(torch.from_numpy(pos | neg))[0].numpy()
  assert int(valid.sum()) == len(want)
  np.testing.assert_array_equal(np.asarray(idx)[:len(want)], want)
  np.testing.assert_array_equal(np.asarray(idx)[len(want):], 0)


def test_balanced_sample_is_uniform_and_vmaps():
  # 4 positives, 6 negatives, 3 ignored; 4 samples at 0.5 -> 2 of 4 pos, 2 of 6 neg.
  labels = jnp.array([1, 0, -1, 0, 2, 0, 1, -1, 0, 0, 1, -1, 0], jnp.int32)
  n = 4000
  keys = jax.random.split(jax.random.key(0), n)
  sample = jax.jit(jax.vmap(lambda k: ops.balanced_sample(labels, k, 4, 0.5)))
  pos, neg = sample(keys)
  pos, neg = np.asarray(pos), np.asarray(neg)
  assert np.all(pos.sum(1) == 2) and np.all(neg.sum(1) == 2)
  freq = (pos | neg).mean(0)
  lab = np.asarray(labels)
  for expect, sel in ((0.5, lab >= 1), (1 / 3, lab == 0)):
    sigma = np.sqrt(expect * (1 - expect) / n)
    np.testing.assert_array_less(np.abs(freq[sel] - expect), 4.5 * sigma)
  assert np.all(freq[lab < 0] == 0)
  # Pairs are uniform too (not e.g. always adjacent): each of the 6 positive pairs ~ 1/6.
  pos_cols = np.nonzero(lab >= 1)[0]
  pairs = {}
  for row in pos[:, pos_cols]:
    key = tuple(np.nonzero(row)[0])
    pairs[key] = pairs.get(key, 0) + 1
  assert len(pairs) == 6
  assert all(abs(c / n - 1 / 6) < 4.5 * np.sqrt((1 / 6) * (5 / 6) / n) for c in pairs.values())
  idx, valid = jax.jit(jax.vmap(lambda p, q: ops.sample_indices(p, q, 4)))(
      jnp.asarray(pos[:3]), jnp.asarray(neg[:3]))
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(idx[i]), np.nonzero(pos[i] | neg[i])[0])
  assert bool(valid.all())


def test_sampler_validates():
  with pytest.raises(ValueError, match="labels"):
    ops.balanced_sample(jnp.zeros((2, 3), jnp.int32), jax.random.key(0), 4, 0.5)
  with pytest.raises(TypeError, match="integer"):
    ops.balanced_sample(jnp.zeros((3,)), jax.random.key(0), 4, 0.5)
  with pytest.raises(ValueError, match="positive_fraction"):
    ops.balanced_sample(jnp.zeros((3,), jnp.int32), jax.random.key(0), 4, 1.5)
  with pytest.raises(TypeError, match="bool"):
    ops.sample_indices(jnp.zeros((3,)), jnp.zeros((3,), bool), 4)
