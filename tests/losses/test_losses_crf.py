"""Pairwise CRF terms and dense-CRF inference against brute-force O(P^2) references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.losses import crf, crf_pairwise, dense_crf


@functools.lru_cache(maxsize=None)
def _compiled(fn, grad=False, **kwargs):
  """``fn`` with ``kwargs`` bound, jitted once (eager dispatch of these losses is slow)."""
  f = functools.partial(fn, **kwargs)
  return jax.jit(jax.value_and_grad(f) if grad else f)


def _loss(logits, batch, **kwargs):
  return _compiled(crf_pairwise, **kwargs)(logits, batch)


def _value_and_grad(logits, batch, **kwargs):
  return _compiled(crf_pairwise, grad=True, **kwargs)(logits, batch)


def _piecewise_image(rng, n, size, noise=0.03):
  """Images of 2-4 flat colour regions plus noise (the structure CRF kernels look for)."""
  yy, xx = np.mgrid[:size, :size]
  out = np.zeros((n, size, size, 3), np.float32)
  for i in range(n):
    colours = rng.uniform(0, 1, (3, 3))
    region = (xx > size * rng.uniform(.3, .7)).astype(int) + (yy > size * rng.uniform(.3, .7))
    out[i] = colours[region] + rng.normal(0, noise, (size, size, 3))
  return np.clip(out, 0, 1).astype(np.float32)


def _dense_kernel(image01, sigma_xy, sigma_rgb):
  """Brute-force W [N,P,P] in float64."""
  n, h, w, _ = image01.shape
  yy, xx = np.mgrid[:h, :w]
  pos = np.stack([yy, xx], -1).reshape(-1, 2) / sigma_xy
  out = []
  for i in range(n):
    f = np.concatenate([pos, image01[i].reshape(-1, 3).astype(np.float64) * 255 / sigma_rgb], 1)
    d2 = np.sum((f[:, None] - f[None]) ** 2, -1)
    out.append(np.exp(-0.5 * d2))
  return np.stack(out)


def _local_kernel(image01, sigma_xy, sigma_rgb, radius):
  w_full = _dense_kernel(image01, sigma_xy, sigma_rgb)
  h, w = image01.shape[1:3]
  yy, xx = np.mgrid[:h, :w]
  y, x = yy.ravel(), xx.ravel()
  cheb = np.maximum(np.abs(y[:, None] - y[None]), np.abs(x[:, None] - x[None]))
  return w_full * ((cheb <= radius) & (cheb > 0))


def _brute_loss(logits, kernel, valid=None):
  """mean_n sum_ij r_i r_j W_ij (1 - S_i.S_j) / |R_n| in float64."""
  n, h, w, c = logits.shape
  z = logits.reshape(n, -1, c).astype(np.float64)
  s = np.exp(z - z.max(-1, keepdims=True))
  s /= s.sum(-1, keepdims=True)
  r = np.ones((n, h * w)) if valid is None else valid.reshape(n, -1).astype(np.float64)
  per = []
  for i in range(n):
    disagree = 1.0 - s[i] @ s[i].T
    e = np.sum(r[i][:, None] * r[i][None] * kernel[i] * disagree)
    per.append(e / max(r[i].sum(), 1.0))
  return float(np.mean(per))


def _jnp_brute_loss(logits, kernel):
  s = jax.nn.softmax(logits, axis=-1).reshape(logits.shape[0], -1, logits.shape[-1])
  disagree = 1.0 - jnp.einsum("npk,nqk->npq", s, s)
  return jnp.mean(jnp.sum(kernel * disagree, axis=(1, 2)) / s.shape[1])


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("sigmas", [(100.0, 15.0), (5.0, 30.0)])
def test_exact_dense_matches_brute_force(size, sigmas):
  rng = np.random.default_rng(size)
  image = _piecewise_image(rng, 2, size)
  logits = rng.normal(0, 2, (2, size, size, 4)).astype(np.float32)
  kernel = _dense_kernel(image, *sigmas)
  ours, grad = _value_and_grad(logits, {"image": image}, method="exact", sigma_xy=sigmas[0],
                               sigma_rgb=sigmas[1])
  assert float(ours) == pytest.approx(_brute_loss(logits, kernel), rel=2e-5)
  # The custom VJP against autodiff of the materialised kernel.
  ref = jax.grad(_jnp_brute_loss)(jnp.asarray(logits), jnp.asarray(kernel, jnp.float32))
  np.testing.assert_allclose(grad, ref, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("size", [16, 32])
def test_grid_approximates_exact_energy_and_gradient(size):
  """The bilateral grid's stated accuracy: energy within 20%, gradient cosine > 0.97.

  (Measured on these piecewise-constant images: 1-15% energy error, cosine 0.984-0.993.)
  """
  rng = np.random.default_rng(10 + size)
  image = _piecewise_image(rng, 2, size)
  logits = rng.normal(0, 2, (2, size, size, 4)).astype(np.float32)
  for sigma_xy, sigma_rgb in [(100.0, 15.0), (10.0, 15.0)]:
    kw = dict(sigma_xy=sigma_xy, sigma_rgb=sigma_rgb)
    ve, ge = _value_and_grad(logits, {"image": image}, method="exact", **kw)
    vg, gg = _value_and_grad(logits, {"image": image}, method="grid", **kw)
    assert abs(float(vg) / float(ve) - 1.0) < 0.2
    cosine = float(jnp.sum(ge * gg) / (jnp.linalg.norm(ge) * jnp.linalg.norm(gg)))
    assert cosine > 0.97


def test_grid_kernel_is_symmetric():
  rng = np.random.default_rng(3)
  image = _piecewise_image(rng, 1, 6) * 255.0
  feats, extents = crf.bilateral_features(jnp.asarray(image), 4.0, 20.0)
  spec = crf.FilterSpec(method="grid", extents=extents)
  eye = jnp.eye(36, dtype=jnp.float32).reshape(1, 6, 6, 36)
  w_grid = np.asarray(crf.apply_filter(spec, feats, eye)).reshape(36, 36)
  np.testing.assert_allclose(w_grid, w_grid.T, atol=1e-5)
  w_exact = _dense_kernel(image / 255.0, 4.0, 20.0)[0]
  # Entry-wise the grid is a coarse approximation; its row sums (the filtered ones) are close.
  np.testing.assert_allclose(w_grid.sum(1), w_exact.sum(1), rtol=0.3)


@pytest.mark.parametrize("size,radius", [(16, 2), (16, 3), (32, 2)])
def test_local_kernel_matches_windowed_brute_force(size, radius):
  rng = np.random.default_rng(size + radius)
  image = _piecewise_image(rng, 2, size)
  logits = rng.normal(0, 2, (2, size, size, 3)).astype(np.float32)
  kernel = _local_kernel(image, 3.0, 10.0, radius)
  ours, grad = _value_and_grad(logits, {"image": image}, kernel="local", sigma_xy=3.0,
                               sigma_rgb=10.0, radius=radius)
  assert float(ours) == pytest.approx(_brute_loss(logits, kernel), rel=2e-5)
  ref = jax.grad(_jnp_brute_loss)(jnp.asarray(logits), jnp.asarray(kernel, jnp.float32))
  np.testing.assert_allclose(grad, ref, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("kwargs", [dict(method="exact"), dict(kernel="local")])
def test_valid_mask_matches_brute_force(kwargs):
  rng = np.random.default_rng(7)
  image = _piecewise_image(rng, 2, 12)
  logits = rng.normal(0, 2, (2, 12, 12, 3)).astype(np.float32)
  valid = rng.random((2, 12, 12)) > 0.3
  if "kernel" in kwargs:
    kernel = _local_kernel(image, 6.0, 5.8, 5)
  else:
    kernel = _dense_kernel(image, 100.0, 15.0)
  ours = _loss(logits, {"image": image, "valid": valid}, **kwargs)
  assert float(ours) == pytest.approx(_brute_loss(logits, kernel, valid), rel=2e-5)


def test_directional_finite_difference():
  rng = np.random.default_rng(5)
  image = _piecewise_image(rng, 1, 12)
  logits = rng.normal(0, 1, (1, 12, 12, 3)).astype(np.float32)
  direction = rng.normal(0, 1, logits.shape).astype(np.float32)
  for kwargs in (dict(method="exact"), dict(method="grid"), dict(kernel="local", radius=2)):
    grad = _value_and_grad(logits, {"image": image}, **kwargs)[1]
    fn = lambda x: float(_loss(x, {"image": image}, **kwargs))
    eps = 5e-2
    fd = (fn(logits + eps * direction) - fn(logits - eps * direction)) / (2 * eps)
    assert fd == pytest.approx(float(jnp.sum(grad * direction)), rel=1e-2), kwargs


def test_zero_for_constant_one_hot_and_regions_cut_along_colour_edges():
  image = np.zeros((1, 16, 16, 3), np.float32)
  image[:, :, 8:] = 1.0
  constant = np.zeros((1, 16, 16, 3), np.float32)
  constant[..., 1] = 30.0
  for kwargs in (dict(method="exact"), dict(method="grid"), dict(kernel="local")):
    assert float(_loss(constant, {"image": image}, **kwargs)) == pytest.approx(0, abs=1e-6)
  # Labels that follow the colour edge cost (almost) nothing; labels cutting a region cost.
  right = (np.arange(16) >= 8).astype(int)
  along = np.broadcast_to(30.0 * np.eye(3)[right][None, None], (1, 16, 16, 3)).astype(np.float32)
  across = np.transpose(along, (0, 2, 1, 3)).copy()
  for kwargs in (dict(method="exact"), dict(kernel="local", sigma_rgb=15.0)):
    a = float(_loss(along, {"image": image}, **kwargs))
    b = float(_loss(across, {"image": image}, **kwargs))
    assert a < 1e-3 * b, kwargs


def test_scale_matches_torch_resize_and_scaled_sigma():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(8)
  image = _piecewise_image(rng, 2, 16)
  logits = rng.normal(0, 2, (2, 16, 16, 3)).astype(np.float32)
  ours = _loss(logits, {"image": image}, method="exact", scale=0.5, sigma_xy=20.0)
  probs = torch.softmax(torch.tensor(logits).permute(0, 3, 1, 2), 1)
  small = torch.nn.functional.interpolate(probs, scale_factor=0.5, mode="bilinear",
                                          align_corners=False)
  img = torch.nn.functional.interpolate(torch.tensor(image).permute(0, 3, 1, 2), scale_factor=0.5,
                                        mode="bilinear", align_corners=False)
  img = img.permute(0, 2, 3, 1).numpy()
  s = small.permute(0, 2, 3, 1).numpy().astype(np.float64).reshape(2, -1, 3)
  kernel = _dense_kernel(img, 10.0, 15.0)
  expected = np.mean([np.sum(kernel[i] * (1 - s[i] @ s[i].T)) / 64 for i in range(2)])
  assert float(ours) == pytest.approx(expected, rel=1e-4)


def test_weight_scales_and_jit_does_not_retrace():
  rng = np.random.default_rng(9)
  batches = [{"image": _piecewise_image(rng, 2, 16)} for _ in range(3)]
  logits = rng.normal(0, 1, (2, 16, 16, 3)).astype(np.float32)
  one = float(crf_pairwise(logits, batches[0], method="exact"))
  assert float(crf_pairwise(logits, batches[0], method="exact", weight=0.25)) == pytest.approx(
      0.25 * one, rel=1e-6)
  fn = jax.jit(functools.partial(crf_pairwise, kernel="local"))
  for b in batches:
    fn(logits, b)
  assert fn._cache_size() == 1


def test_bad_inputs():
  image = np.zeros((1, 8, 8, 3), np.float32)
  logits = np.zeros((1, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match="unknown kernel"):
    crf_pairwise(logits, {"image": image}, kernel="gaussian")
  with pytest.raises(ValueError, match="unknown method"):
    crf_pairwise(logits, {"image": image}, method="lattice")
  with pytest.raises(ValueError, match="scale"):
    crf_pairwise(logits, {"image": image}, scale=2.0)
  with pytest.raises(ValueError, match="sigma_rgb"):
    crf_pairwise(logits, {"image": image}, sigma_rgb=0.0)
  with pytest.raises(ValueError, match=r"needs batch\['image'\]"):
    crf_pairwise(logits, {})
  with pytest.raises(ValueError, match="share N,H,W"):
    crf_pairwise(logits, {"image": np.zeros((1, 16, 16, 3), np.float32)})
  with pytest.raises(ValueError, match="logits must be"):
    crf_pairwise(logits[0], {"image": image})
  with pytest.raises(ValueError, match="radius"):
    crf_pairwise(logits, {"image": image}, kernel="local", radius=0)
  with pytest.raises(ValueError, match="max_grid_cells"):
    crf_pairwise(logits, {"image": image}, sigma_rgb=1.0)
  with pytest.raises(ValueError, match=r"batch\['valid'\]"):
    crf_pairwise(logits, {"image": image, "valid": np.ones((1, 4, 4), bool)})


# ----------------------------------------------------------------------------------------------
# Mean field.


def _brute_mean_field(unary, image01, iterations, wb, sxy, srgb, ws, sxy_s):
  """densecrf's update with NORMALIZE_SYMMETRIC: messages D^-1/2 K D^-1/2 Q, D = diag(K 1)
  (j = i included). A fuller float64 model is in test_losses_dense_crf.py."""
  n, h, w, c = unary.shape
  kb = _dense_kernel(image01, sxy, srgb)
  yy, xx = np.mgrid[:h, :w]
  pos = np.stack([yy, xx], -1).reshape(-1, 2) / sxy_s
  ks = np.exp(-0.5 * np.sum((pos[:, None] - pos[None]) ** 2, -1))
  sym = lambda k: k / np.sqrt(np.outer(k.sum(1), k.sum(1)))
  u = unary.reshape(n, -1, c).astype(np.float64)
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  q = softmax(u)
  for _ in range(iterations):
    msg = np.stack([wb * sym(kb[i]) @ q[i] + ws * sym(ks) @ q[i] for i in range(n)])
    q = softmax(u + msg)
  return q.reshape(n, h, w, c)


def test_exact_mean_field_matches_brute_force():
  rng = np.random.default_rng(11)
  image = _piecewise_image(rng, 2, 8)
  unary = rng.normal(0, 1, (2, 8, 8, 3)).astype(np.float32)
  kw = dict(bilateral_weight=5.0, bilateral_sigma_xy=4.0, bilateral_sigma_rgb=20.0,
            spatial_weight=3.0, spatial_sigma_xy=1.5)
  ours = _compiled(dense_crf, iterations=3, method="exact", **kw)(unary, image)
  ref = _brute_mean_field(unary, image, 3, 5.0, 4.0, 20.0, 3.0, 1.5)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_mean_field_cleans_a_noisy_unary_along_an_image_edge():
  rng = np.random.default_rng(12)
  size = 32
  image = np.zeros((1, size, size, 3), np.float32)
  image[:, :, size // 2:] = [0.9, 0.8, 0.1]
  image[:, :, :size // 2] = [0.1, 0.2, 0.7]
  image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1).astype(np.float32)
  labels = (np.arange(size) >= size // 2).astype(int)[None, None, :].repeat(size, 1)
  unary = (2.0 * np.eye(2)[labels] + rng.normal(0, 1.5, (1, size, size, 2))).astype(np.float32)
  before = np.mean(np.argmax(unary, -1) != labels)
  kw = dict(iterations=5, bilateral_weight=5.0, bilateral_sigma_xy=10.0, bilateral_sigma_rgb=20.0,
            spatial_weight=1.0, spatial_sigma_xy=1.0)
  q_grid = _compiled(dense_crf, method="grid", **kw)(unary, image)
  q_exact = _compiled(dense_crf, method="exact", **kw)(unary, image)
  after = np.mean(np.argmax(np.asarray(q_grid), -1) != labels)
  assert before > 0.1 and after < 0.25 * before
  # Fast and exact filtering agree on this image.
  assert np.mean(np.argmax(np.asarray(q_exact), -1) == np.argmax(np.asarray(q_grid), -1)) > 0.97
  assert float(jnp.mean(jnp.abs(q_exact - q_grid))) < 0.05
  np.testing.assert_allclose(np.sum(np.asarray(q_grid), -1), 1.0, atol=1e-5)


def test_dense_crf_is_jittable_and_checks_inputs():
  rng = np.random.default_rng(13)
  image = _piecewise_image(rng, 1, 8)
  unary = rng.normal(0, 1, (1, 8, 8, 3)).astype(np.float32)
  fn = jax.jit(functools.partial(dense_crf, iterations=2))
  np.testing.assert_allclose(fn(unary, image), dense_crf(unary, image, iterations=2), atol=1e-4)
  with pytest.raises(ValueError, match="unknown method"):
    dense_crf(unary, image, method="lattice")
  with pytest.raises(ValueError, match="iterations"):
    dense_crf(unary, image, iterations=-1)
  with pytest.raises(ValueError, match="unknown normalization"):
    dense_crf(unary, image, normalization="global")
  with pytest.raises(ValueError, match="share N,H,W"):
    dense_crf(unary, image[:, :4])
