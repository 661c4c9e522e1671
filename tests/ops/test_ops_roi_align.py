"""jaxseg.ops.roi_align against torchvision.ops.roi_align / MultiScaleRoIAlign / LevelMapper."""
import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import poolers

from jaxseg import ops


def _boxes(rng, shape, lo=-8.0, hi=60.0, max_wh=40.0):
  """xyxy float32 boxes: some cross the border, some are thinner than a pixel."""
  xy = rng.uniform(lo, hi, shape + (2,))
  wh = rng.uniform(0.2, max_wh, shape + (2,))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def _torch_rois(boxes_nk):
  n, k = boxes_nk.shape[:2]
  ids = torch.arange(n, dtype=torch.float32).repeat_interleave(k)[:, None]
  return torch.cat([ids, torch.from_numpy(boxes_nk.reshape(-1, 4))], 1)


def _torch_roi_align(f_nhwc, boxes_nk, out, scale, sr, aligned):
  n, k = boxes_nk.shape[:2]
  x = torch.from_numpy(f_nhwc).permute(0, 3, 1, 2)
  y = torchvision.ops.roi_align(x, _torch_rois(boxes_nk), out, scale, sr, aligned)
  return y.permute(0, 2, 3, 1).reshape(n, k, *y.shape[2:], f_nhwc.shape[-1]).numpy()


@functools.partial(jax.jit, static_argnames=("out", "scale", "sr", "aligned"))
def _roi_align(f, b, out, scale, sr, aligned):
  return ops.roi_align(f, b, out, spatial_scale=scale, sampling_ratio=sr, aligned=aligned)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sr", [1, 2])
def test_roi_align_matches_torchvision(aligned, sr):
  rng = np.random.default_rng(sr + 2 * aligned)
  f = rng.normal(size=(2, 13, 17, 3)).astype(np.float32)
  b = _boxes(rng, (2, 6))
  b[0, 0] = [70., 50., 90., 60.]  # entirely outside the 68x52 input
  got = np.asarray(_roi_align(jnp.asarray(f), jnp.asarray(ops.from_xyxy(b)), (5, 4), 0.25, sr,
                              aligned))
  want = _torch_roi_align(f, b, (5, 4), 0.25, sr, aligned)
  assert got.shape == (2, 6, 5, 4, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_roi_align_hand_computed():
  # A 1x1-pixel box at scale 1 with sr=1 samples its centre (0.5, 0.5): mean of 4 pixels.
  f = jnp.arange(16.0).reshape(1, 4, 4, 1)
  out = _roi_align(f, jnp.array([[[0., 0., 1., 1.]]]), 1, 1.0, 1, False)
  np.testing.assert_allclose(np.asarray(out).ravel(), [(0 + 1 + 4 + 5) / 4])


def test_roi_align_gradient_matches_torchvision_backward():
  rng = np.random.default_rng(7)
  f = rng.normal(size=(2, 9, 11, 2)).astype(np.float32)
  b = _boxes(rng, (2, 5), lo=-4.0, hi=40.0, max_wh=30.0)
  g = rng.normal(size=(2, 5, 3, 3, 2)).astype(np.float32)
  grad = jax.jit(lambda x, bb, gg: jax.vjp(lambda y: _roi_align(y, bb, 3, 0.25, 2, False),
                                            x)[1](gg)[0])
  got = grad(jnp.asarray(f), jnp.asarray(ops.from_xyxy(b)), jnp.asarray(g))
  x = torch.from_numpy(f).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
  y = torchvision.ops.roi_align(x, _torch_rois(b), 3, 0.25, 2, False)
  y.backward(torch.from_numpy(g).reshape(10, 3, 3, 2).permute(0, 3, 1, 2))
  want = x.grad.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_roi_align_adaptive_matches_torchvision_sampling_ratio_minus_one():
  rng = np.random.default_rng(3)
  k, h, w = 6, 40, 52
  m = (rng.uniform(size=(k, h, w)) > 0.5).astype(np.uint8)
  b = _boxes(rng, (k,), lo=-3.0, hi=30.0, max_wh=45.0)
  b[0] = [0., 0., w, h]  # the whole mask: 2 samples per bin on a 28x28 output
  b[1] = [3., 4., 3.5, 4.2]  # sub-pixel box, clamped to size 1
  adaptive = jax.jit(ops.roi_align_adaptive, static_argnums=2,
                     static_argnames="max_sampling_ratio")
  got = np.asarray(adaptive(jnp.asarray(m), jnp.asarray(ops.from_xyxy(b)), 28))
  rois = torch.cat([torch.arange(k, dtype=torch.float32)[:, None], torch.from_numpy(b)], 1)
  want = torchvision.ops.roi_align(torch.from_numpy(m)[:, None].float(), rois, 28, 1.0, -1,
                                   False)[:, 0].numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert ops.default_max_sampling_ratio((h, w), 28) == 2
  # Above the cap the result is an approximation (fewer samples), not garbage.
  approx = np.asarray(adaptive(jnp.asarray(m[:1]), jnp.asarray(ops.from_xyxy(b[:1])), 7,
                               max_sampling_ratio=2))
  exact = torchvision.ops.roi_align(torch.from_numpy(m[:1])[:, None].float(), rois[:1], 7, 1.0,
                                    -1, False)[:, 0].numpy()
  assert 0 < np.abs(approx - exact).max() < 0.5


def test_roi_levels_match_level_mapper():
  rng = np.random.default_rng(4)
  b = _boxes(rng, (200,), lo=0.0, hi=500.0, max_wh=700.0)
  b[0] = [0., 0., 224., 224.]  # exactly canonical: level 4
  b[1] = [0., 0., 112., 112.]  # exactly one level down
  b[2] = [5., 5., 5., 9.]  # zero area: k_min
  want = poolers.LevelMapper(2, 5)([torch.from_numpy(b)]).numpy() + 2
  got = np.asarray(jax.jit(ops.roi_levels)(jnp.asarray(ops.from_xyxy(b))))
  np.testing.assert_array_equal(got, want)
  assert got[0] == 4 and got[1] == 3 and got[2] == 2


def test_multiscale_roi_align_matches_torchvision():
  rng = np.random.default_rng(5)
  n, c = 2, 2
  img = (500, 470)  # largest unpadded size; the padded canvas is 512x512
  shapes = [(128, 128), (64, 64), (32, 32), (16, 16)]
  feats = [rng.normal(size=(n, h, w, c)).astype(np.float32) for h, w in shapes]
  # sqrt(area) from ~4 to ~500 px: levels 2..5 (level 5 from 448 px).
  k = 16
  wh = np.exp(rng.uniform(np.log(4), np.log(500), (n, k, 1))) * rng.uniform(0.8, 1.2, (n, k, 2))
  xy = rng.uniform(-10, 1, (n, k, 2)) + rng.uniform(0, 1, (n, k, 2)) * (480 - wh)
  b = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  pool = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
  x = collections.OrderedDict(
      (str(i), torch.from_numpy(f).permute(0, 3, 1, 2).contiguous().requires_grad_(True))
      for i, f in enumerate(feats))
  want = pool(x, [torch.from_numpy(b[i]) for i in range(n)], [img, (400, 300)])
  cotangent = rng.normal(size=(n, k, 7, 7, c)).astype(np.float32)
  want.backward(torch.from_numpy(cotangent).reshape(n * k, 7, 7, c).permute(0, 3, 1, 2))
  want = want.detach().permute(0, 2, 3, 1).reshape(n, k, 7, 7, c).numpy()
  levels = poolers.LevelMapper(2, 5)([torch.from_numpy(b.reshape(-1, 4))]).numpy()
  assert len(set(levels.tolist())) == 4  # every level is exercised
  fn = functools.partial(ops.multiscale_roi_align, output_size=7, image_size=img)
  run = jax.jit(lambda fs, bb, ct: (lambda o, vjp: (o, vjp(ct)[0]))(*jax.vjp(
      lambda q: fn(q, bb), fs)))
  got, grads = run([jnp.asarray(f) for f in feats], jnp.asarray(ops.from_xyxy(b)),
                   jnp.asarray(cotangent))
  # Sample coordinates reach ~125 feature pixels (float32 ulp 8e-6) and XLA fuses multiply-adds
  # where the torch CPU kernel rounds twice, so bilinear weights differ in the last bits.
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=5e-5)
  for g, t in zip(grads, x.values()):
    np.testing.assert_allclose(np.asarray(g), t.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5,
                               atol=1e-4)
  assert ops.level_scales(shapes, img) == (0.25, 0.125, 0.0625, 0.03125)


def test_roi_align_validates():
  f = jnp.zeros((1, 4, 4, 1))
  with pytest.raises(ValueError, match="sampling_ratio"):
    ops.roi_align(f, jnp.zeros((1, 2, 4)), 2, spatial_scale=1.0, sampling_ratio=-1,
                  aligned=False)
  with pytest.raises(ValueError, match="boxes"):
    ops.roi_align(f, jnp.zeros((2, 2, 4)), 2, spatial_scale=1.0, sampling_ratio=2,
                  aligned=False)
  with pytest.raises(ValueError, match="output_size"):
    ops.roi_align(f, jnp.zeros((1, 2, 4)), 0, spatial_scale=1.0, sampling_ratio=2,
                  aligned=False)
  with pytest.raises(ValueError, match="one per mask"):
    ops.roi_align_adaptive(jnp.zeros((2, 4, 4)), jnp.zeros((3, 4)), 2)
  with pytest.raises(TypeError, match="sequence"):
    ops.multiscale_roi_align(f, jnp.zeros((1, 2, 4)), 2, image_size=(4, 4))
