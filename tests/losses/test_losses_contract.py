"""Every registered loss: the batch contract, padding invariance, no recompilation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg.losses as losses

N, H, W, C = 2, 16, 16, 4
PAD_H, PAD_W = 4, 8  # padding added at the bottom/right, marked invalid

CASES = [
    ("cross_entropy", {}),
    ("partial_cross_entropy", {}),
    ("crf_pairwise", {"method": "exact"}),
    ("crf_pairwise", {"method": "grid"}),
    ("crf_pairwise", {"kernel": "local", "radius": 2}),
    ("crf_pairwise", {"method": "exact", "scale": 0.5, "sigma_xy": 10.0}),
    ("scribble_loss", {"kernel": "local", "radius": 2, "pairwise_weight": 0.1}),
    ("scribble_loss", {"pairwise_weight": 1e-3, "kernel": "dense"}),
    ("scribble_loss", {"kernel": "local", "radius": 2, "balance": "kernel_mass"}),
    ("crf_pairwise", {"kernel": "local", "radius": 2, "normalize": True}),
    ("scribble_em_loss", {"iterations": 2, "bilateral_sigma_xy": 10.0}),
    ("image_level_loss", {"downscale": 4}),
    ("image_level_loss", {"downscale": 1, "solver": "pgd"}),
    ("image_level_loss", {"mode": "em_adapt", "downscale": 2}),
    ("box_loss", {"mode": "em_fixed"}),
    ("box_loss", {"mode": "em_adapt"}),
    ("box_loss", {"mode": "bbox_seg"}),
    ("box_loss", {"mode": "bbox_soft"}),
    ("box_loss", {"mode": "boxinst"}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in CASES]


def _batch(seed):
  rng = np.random.default_rng(seed)
  image = np.zeros((N, H, W, 3), np.float32)
  image[:, :, : W // 2] = rng.uniform(0, 1, (N, 1, 1, 3))
  image[:, :, W // 2:] = rng.uniform(0, 1, (N, 1, 1, 3))
  image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1).astype(np.float32)
  mask = rng.integers(0, C, (N, H, W)).astype(np.int32)
  scribble = np.full((N, H, W), 255, np.int32)
  scribble[:, 3:12, 3] = 1
  scribble[:, 3:12, 12] = 2
  scribble[:, 14, 2:14] = 0
  boxes = np.array([[[2, 1, 9, 7], [6, 8, 15, 14], [0, 0, 0, 0]],
                    [[0, 0, 15, 6], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
  box_classes = np.array([[1, 3, -1], [2, -1, -1]], np.int32)
  tags = np.array([[1, 1, 0, 1], [1, 0, 1, 0]], np.float32)
  box_seg = np.where(rng.uniform(size=(N, H, W)) < 0.1, 255, mask).astype(np.int32)
  logits = rng.normal(0, 1.5, (N, H, W, C)).astype(np.float32)
  batch = dict(image=image, mask=mask, scribble=scribble, boxes=boxes, box_classes=box_classes,
               tags=tags, box_seg=box_seg)
  return logits, batch


def _pad(logits, batch, seed):
  """Pad with random content at the bottom/right and mark it invalid."""
  rng = np.random.default_rng(seed + 100)
  hp, wp = H + PAD_H, W + PAD_W

  def pad(x, fill):
    out = fill(x.shape[:1] + (hp, wp) + x.shape[3:]).astype(x.dtype)
    out[:, :H, :W] = x
    return out

  padded = dict(batch)
  padded["image"] = pad(batch["image"], lambda s: rng.uniform(0, 1, s))
  padded["mask"] = pad(batch["mask"], lambda s: rng.integers(0, C, s))
  padded["scribble"] = pad(batch["scribble"], lambda s: rng.integers(0, C, s))
  padded["box_seg"] = pad(batch["box_seg"], lambda s: np.full(s, 255))
  padded["valid"] = pad(np.ones((N, H, W), bool), lambda s: np.zeros(s, bool))
  return pad(logits, lambda s: rng.normal(0, 3, s)), padded


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_padding_invariance_and_no_retrace(name, kwargs):
  fn = losses.get(name, **kwargs)
  value_and_grad = jax.jit(jax.value_and_grad(fn))
  logits, batch = _batch(0)
  value, grad = value_and_grad(logits, batch)
  assert np.isfinite(float(value)) and float(jnp.abs(grad).sum()) > 0
  # Another batch of the same shapes runs without recompiling.
  logits2, batch2 = _batch(1)
  value2, _ = value_and_grad(logits2, batch2)
  assert value_and_grad._cache_size() == 1
  assert float(value2) != float(value)

  plogits, pbatch = _pad(logits, batch, 0)
  pvalue, pgrad = jax.jit(jax.value_and_grad(fn))(plogits, pbatch)
  assert float(pvalue) == pytest.approx(float(value), rel=2e-4, abs=1e-6)
  np.testing.assert_allclose(pgrad[:, :H, :W], grad, rtol=2e-3,
                             atol=2e-3 * float(jnp.max(jnp.abs(grad))))
  pad_grad = np.asarray(pgrad).copy()
  pad_grad[:, :H, :W] = 0.0
  assert np.max(np.abs(pad_grad)) == 0.0  # padding gets no gradient


def test_registry_names_and_errors():
  for name in ("crf_pairwise", "scribble_loss", "scribble_em_loss", "image_level_loss",
               "box_loss", "cross_entropy", "partial_cross_entropy"):
    assert name in losses.names()
  assert callable(losses.dense_crf) and callable(losses.constrained_posterior)
  bound = losses.get("box_loss", mode="bbox_seg")
  assert isinstance(bound, functools.partial) and bound.keywords == {"mode": "bbox_seg"}
  assert losses.get("crf_pairwise") is losses.crf_pairwise
  with pytest.raises(ValueError, match="unknown loss 'nope'; valid: box_loss"):
    losses.get("nope")


WARMUP_CASES = [("scribble_loss", {"kernel": "local", "radius": 2}),
                ("box_loss", {"mode": "boxinst"})]


@pytest.mark.parametrize("name,kwargs", WARMUP_CASES, ids=[n for n, _ in WARMUP_CASES])
def test_warmup_takes_step_as_an_argument_not_from_the_batch(name, kwargs):
  """DESIGN.md: a loss needing the step declares ``step``; the batch carries data only."""
  from jaxseg.train.step import loss_takes_step
  fn = losses.get(name, warmup_steps=10, **kwargs)
  assert loss_takes_step(fn)
  logits, batch = _batch(0)
  # The train step passes step= itself; a direct call without it says so. A step in the
  # batch is not read.
  with pytest.raises(ValueError, match=r"warmup_steps=10 needs the training step.*"
                     r"passes it automatically.*must pass step="):
    fn(logits, dict(batch, step=np.full((N,), 5, np.int32)))
  # The step is an array argument: a changing step does not recompile, and it ramps.
  jitted = jax.jit(fn)
  values = [float(jitted(logits, batch, step=jnp.int32(s))) for s in (0, 5, 10, 20)]
  assert jitted._cache_size() == 1
  assert values[0] < values[1] < values[2] == pytest.approx(values[3])
  assert float(fn(logits, batch, step=10)) == pytest.approx(values[2], rel=1e-5)
  # warmup_steps=0 needs no step.
  assert np.isfinite(float(losses.get(name, **kwargs)(logits, batch)))
