"""jaxseg.ops.nms / batched_nms against torchvision.ops.nms / batched_nms."""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from jaxseg import ops

_nms = jax.jit(ops.nms, static_argnums=(2, 3))
_batched_nms = jax.jit(ops.batched_nms, static_argnums=(3, 4))


def _hard_boxes(seed, k=300):
  """xyxy boxes and scores with every awkward case torchvision has to agree on."""
  rng = np.random.default_rng(seed)
  xy = rng.uniform(-20, 100, (k, 2))  # some cross the top/left border
  wh = rng.uniform(2, 40, (k, 2))
  b = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  b[:10, 2] = b[:10, 0]  # zero-area boxes
  b[10:20] = b[20:30]  # exact duplicates ...
  scores = rng.uniform(0, 1, k).astype(np.float32)
  scores[10:20] = scores[20:30]  # ... with tied scores
  scores[40:80] = np.round(scores[40:80] * 3) / 3  # many ties
  return b, scores


def _check(got, want, max_output):
  idx, valid = (np.asarray(a) for a in got)
  n = min(len(want), max_output)
  assert int(valid.sum()) == n
  np.testing.assert_array_equal(idx[:n], want[:n])
  assert not valid[n:].any() and np.all(idx[n:] == 0)


@pytest.mark.parametrize("threshold,max_output", [(0.3, 25), (0.5, 400), (0.7, 25), (0.7, 400)])
def test_nms_matches_torchvision(threshold, max_output):
  b, s = _hard_boxes(int(threshold * 10))
  want = torchvision.ops.nms(torch.from_numpy(b), torch.from_numpy(s), threshold).numpy()
  assert 25 < len(want) < 300
  _check(_nms(jnp.asarray(ops.from_xyxy(b)), jnp.asarray(s), threshold, max_output), want,
         max_output)


@pytest.mark.parametrize("threshold,max_output", [(0.3, 400), (0.5, 30), (0.7, 400)])
def test_batched_nms_matches_torchvision(threshold, max_output):
  b, s = _hard_boxes(int(threshold * 10) + 1)
  cls = np.random.default_rng(5).integers(0, 4, len(s))
  want = torchvision.ops.batched_nms(torch.from_numpy(b), torch.from_numpy(s),
                                     torch.from_numpy(cls), threshold).numpy()
  assert 30 < len(want) < 300
  got = _batched_nms(jnp.asarray(ops.from_xyxy(b)), jnp.asarray(s), jnp.asarray(cls, jnp.int32),
                     threshold, max_output)
  _check(got, want, max_output)


def test_nms_threshold_is_strict_and_tie_order_is_stable():
  # IoU exactly 0.5: not suppressed at 0.5, suppressed at 0.49.
  b = jnp.array([[0., 0., 10., 10.], [0., 0., 10., 20.], [0., 0., 10., 10.]])
  s = jnp.array([1., 1., 1.])
  for t in (0.5, 0.49):
    want = torchvision.ops.nms(torch.tensor(ops.to_xyxy(np.asarray(b))),
                               torch.tensor(np.asarray(s)), t).numpy()
    _check(_nms(b, s, t, 3), want, 3)
  np.testing.assert_array_equal(np.asarray(_nms(b, s, 0.5, 3)[0])[:2], [0, 1])


def test_threshold_rounding_matches_double_comparison():
  # float32(0.3) > 0.3: an IoU equal to float32(0.3) is suppressed by torch (double compare).
  nms_module = importlib.import_module("jaxseg.ops.nms")  # `ops.nms` is the function
  t32 = nms_module._float32_threshold(0.3)
  assert t32 < np.float32(0.3) and float(np.nextafter(t32, np.float32(1))) > 0.3
  assert nms_module._float32_threshold(0.5) == np.float32(0.5)


def test_nms_valid_mask_and_padding():
  b, s = _hard_boxes(7)
  valid = np.random.default_rng(0).uniform(size=300) < 0.6
  s_pad = s.copy()
  s_pad[~valid] = 10.0  # high-scoring padding must neither be kept nor suppress
  rows = np.nonzero(valid)[0]
  want = rows[torchvision.ops.nms(torch.from_numpy(b[rows]), torch.from_numpy(s[rows]),
                                  0.5).numpy()]
  got = _nms(jnp.asarray(ops.from_xyxy(b)), jnp.asarray(s_pad), 0.5, 400,
             valid=jnp.asarray(valid))
  _check(got, want, 400)
  none = _nms(jnp.asarray(ops.from_xyxy(b)), jnp.asarray(s), 0.5, 25, valid=jnp.zeros(300, bool))
  assert not np.asarray(none[1]).any()


def test_batched_nms_valid_excluded_from_max_coordinate():
  b, s = _hard_boxes(8)
  cls = np.random.default_rng(1).integers(0, 3, 300)
  valid = np.ones(300, bool)
  valid[-5:] = False
  b_pad = b.copy()
  b_pad[-5:] = 1e6  # garbage coordinates on padded rows
  want = torchvision.ops.batched_nms(torch.from_numpy(b[:-5]), torch.from_numpy(s[:-5]),
                                     torch.from_numpy(cls[:-5]), 0.5).numpy()
  got = _batched_nms(jnp.asarray(ops.from_xyxy(b_pad)), jnp.asarray(s),
                     jnp.asarray(cls, jnp.int32), 0.5, 400, valid=jnp.asarray(valid))
  _check(got, want, 400)


def test_nms_large_k_vmaps():
  # RPN-sized input: 2000 boxes per level, vmapped over a batch of 2.
  rng = np.random.default_rng(9)
  xy = rng.uniform(0, 400, (2, 2000, 2))
  b = np.concatenate([xy, xy + rng.uniform(4, 80, (2, 2000, 2))], -1).astype(np.float32)
  s = rng.uniform(size=(2, 2000)).astype(np.float32)
  run = jax.jit(jax.vmap(functools.partial(ops.nms, iou_threshold=0.7, max_output=1000)))
  idx, valid = run(jnp.asarray(ops.from_xyxy(b)), jnp.asarray(s))
  for i in range(2):
    want = torchvision.ops.nms(torch.from_numpy(b[i]), torch.from_numpy(s[i]), 0.7).numpy()
    _check((idx[i], valid[i]), want, 1000)


def test_nms_validates():
  with pytest.raises(ValueError, match="boxes"):
    ops.nms(jnp.zeros((3, 5)), jnp.zeros(3), 0.5, 2)
  with pytest.raises(ValueError, match="scores"):
    ops.nms(jnp.zeros((3, 4)), jnp.zeros(4), 0.5, 2)
  with pytest.raises(ValueError, match="max_output"):
    ops.nms(jnp.zeros((3, 4)), jnp.zeros(3), 0.5, 0)
  with pytest.raises(TypeError, match="idxs"):
    ops.batched_nms(jnp.zeros((3, 4)), jnp.zeros(3), jnp.zeros(3), 0.5, 2)


@jax.jit
def _upper_overlaps(sorted_boxes):
  k = sorted_boxes.shape[0]
  return (ops.box_iou(sorted_boxes, sorted_boxes) > 0.5) & jnp.triu(jnp.ones((k, k), bool), 1)


def test_accelerator_fixed_point_equals_sequential_greedy_and_torchvision():
  """The GPU/TPU solver (fixed point) against the CPU one and torchvision, run here on CPU."""
  nms_module = importlib.import_module("jaxseg.ops.nms")
  # A chain: box i overlaps only its neighbours (IoU 0.6), so the answer depends on every step
  # before it (0, 2, 4, ... are kept at 0.5): the fixed point's worst case.
  x0 = np.arange(60, dtype=np.float32) * 4.0
  chain = np.stack([x0, np.zeros(60, np.float32), x0 + 16.0, np.full(60, 10.0, np.float32)], 1)
  chain_scores = np.linspace(1, 0.1, 60).astype(np.float32)
  chain_kept = torchvision.ops.nms(torch.from_numpy(chain), torch.from_numpy(chain_scores), 0.5)
  np.testing.assert_array_equal(chain_kept.numpy(), np.arange(0, 60, 2))
  b, s = _hard_boxes(11)
  for boxes, scores in ((chain, chain_scores), (b, s)):
    want = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    order = np.argsort(-scores, kind="stable")
    over = _upper_overlaps(jnp.asarray(ops.from_xyxy(boxes[order])))
    candidate = jnp.ones(len(scores), bool)
    fixed = np.asarray(jax.jit(nms_module._greedy_fixed_point)(over, candidate))
    seq = np.asarray(jax.jit(nms_module._greedy_sequential)(over, candidate))
    np.testing.assert_array_equal(fixed, seq)
    np.testing.assert_array_equal(order[np.nonzero(fixed)[0]], want)
