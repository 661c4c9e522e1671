"""Shared layers against torch and brute-force references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import layers
from tests.models import models_testutil as tu

torch = pytest.importorskip("torch")
F = torch.nn.functional

SIZES = [(4, 6), (5, 7), (7, 4), (1, 1), (2, 3), (9, 9)]

# Jitted once per shape: much faster than op-by-op dispatch for these small checks.
_argmax_pool = jax.jit(layers.argmax_pool)
_max_unpool = jax.jit(layers.max_unpool, static_argnums=2)
_max_pool = jax.jit(layers.max_pool, static_argnums=(1, 2, 3), static_argnames="ceil_mode")
_resize = jax.jit(layers.resize_bilinear, static_argnums=1, static_argnames="align_corners")


def _tied(shape, seed=0):
  # Few distinct values, so most 2x2 windows hold ties.
  return np.random.RandomState(seed).randint(0, 3, size=shape).astype(np.float32)


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("tied", [False, True])
def test_argmax_pool_matches_torch(h, w, tied):
  x = _tied((2, h, w, 3)) if tied else np.random.RandomState(1).randn(2, h, w, 3).astype(np.float32)
  pooled, idx = _argmax_pool(jnp.asarray(x))
  tp, ti = torch.nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)(torch.tensor(tu.nchw(x)))
  np.testing.assert_array_equal(np.asarray(pooled), tu.nhwc(tp))
  np.testing.assert_array_equal(np.asarray(idx), tu.nhwc(ti))
  assert idx.dtype == jnp.int32


@pytest.mark.parametrize("h,w", SIZES)
def test_max_unpool_matches_torch(h, w):
  x = _tied((2, h, w, 3), seed=2)
  pooled, idx = _argmax_pool(jnp.asarray(x))
  vals = np.random.RandomState(3).randn(*pooled.shape).astype(np.float32)
  out = _max_unpool(jnp.asarray(vals), idx, (h, w))
  tp, ti = torch.nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)(torch.tensor(tu.nchw(x)))
  tout = torch.nn.MaxUnpool2d(2, 2)(torch.tensor(tu.nchw(vals)), ti, output_size=(h, w))
  np.testing.assert_array_equal(np.asarray(out), tu.nhwc(tout))


def test_unpool_of_pool_keeps_maxima_in_place():
  x = np.random.RandomState(4).randn(1, 7, 9, 2).astype(np.float32)
  pooled, idx = _argmax_pool(jnp.asarray(x))
  out = np.asarray(_max_unpool(pooled, idx, (7, 9)))
  expected = np.zeros_like(x)
  for c in range(2):
    for i in range(4):
      for j in range(5):
        win = x[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
        dy, dx = np.unravel_index(np.argmax(win), win.shape)
        expected[0, 2 * i + dy, 2 * j + dx, c] = win[dy, dx]
  np.testing.assert_array_equal(out, expected)
  assert np.count_nonzero(out) == 4 * 5 * 2


def test_argmax_pool_gradient_goes_to_the_selected_element_like_torch():
  x = _tied((1, 5, 6, 2), seed=5)
  weights = jnp.arange(1., 7.)[None, None, :3, None]
  g = jax.jit(jax.grad(lambda v: (layers.argmax_pool(v)[0] * weights).sum()))(jnp.asarray(x))
  tx = torch.tensor(tu.nchw(x), requires_grad=True)
  tp, _ = torch.nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)(tx)
  (tp * torch.arange(1., 7.)[None, None, None, :3]).sum().backward()
  np.testing.assert_array_equal(np.asarray(g), tu.nhwc(tx.grad))


def test_argmax_pool_rejects_wrong_rank():
  with pytest.raises(ValueError, match="argmax_pool expects"):
    layers.argmax_pool(jnp.zeros((4, 4, 3)))
  with pytest.raises(ValueError, match="differ in shape"):
    layers.max_unpool(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 2), jnp.int32), (4, 4))


@pytest.mark.parametrize("window,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (3, 2, 0)])
@pytest.mark.parametrize("size", [5, 6, 7, 12, 13])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_matches_torch(window, stride, padding, size, ceil_mode):
  x = np.random.RandomState(size).randn(1, size, size + 1, 2).astype(np.float32)
  out = _max_pool(jnp.asarray(x), window, stride, padding, ceil_mode=ceil_mode)
  ref = F.max_pool2d(torch.tensor(tu.nchw(x)), window, stride, padding, ceil_mode=ceil_mode)
  np.testing.assert_array_equal(np.asarray(out), tu.nhwc(ref))
  assert out.shape[1] == layers.pool_output_size(size, window, stride, padding, ceil_mode)


def test_bilinear_kernel_matches_caffe_formula():
  # k=4 (factor 2, centre 1.5): 1-|i-1.5|/2 = .25,.75,.75,.25
  f4 = np.array([0.25, 0.75, 0.75, 0.25])
  k = np.asarray(layers.bilinear_kernel(4, 3))
  assert k.shape == (4, 4, 3, 3)
  for c in range(3):
    np.testing.assert_allclose(k[:, :, c, c], np.outer(f4, f4))
  assert np.all(k[:, :, 0, 1] == 0)
  # odd k=3 (factor 2, centre 1): .5, 1, .5
  k3 = np.asarray(layers.bilinear_kernel(3, 1, grouped=True))
  np.testing.assert_allclose(k3[:, :, 0, 0], np.outer([.5, 1, .5], [.5, 1, .5]))
  assert layers.bilinear_kernel(16, 5, grouped=True).shape == (16, 16, 1, 5)


@pytest.mark.parametrize("k,s,p,grouped", [(4, 2, 1, False), (16, 8, 4, True), (64, 32, 0, False),
                                           (4, 2, 0, False), (3, 2, 1, True)])
def test_bilinear_conv_transpose_matches_torch(k, s, p, grouped):
  c = 3
  x = np.random.RandomState(0).randn(2, 5, 6, c).astype(np.float32)
  layer = layers.BilinearConvTranspose(c, k, s, padding=p, grouped=grouped)
  out = layer.apply({}, jnp.asarray(x))
  f = torch.tensor(np.asarray(layers.bilinear_kernel(k, 1, grouped=True))[:, :, 0, 0])
  if grouped:
    w = f[None, None].repeat(c, 1, 1, 1)
  else:
    w = torch.zeros(c, c, k, k)
    for i in range(c):
      w[i, i] = f
  ref = F.conv_transpose2d(torch.tensor(tu.nchw(x)), w, stride=s, padding=p,
                           groups=c if grouped else 1)
  assert out.shape == tu.nhwc(ref).shape
  np.testing.assert_allclose(np.asarray(out), tu.nhwc(ref), atol=1e-5)


@pytest.mark.parametrize("k,s,p", [(4, 2, 1), (16, 8, 4)])
def test_bilinear_init_equals_bilinear_upsampling_in_the_interior(k, s, p):
  x = np.random.RandomState(1).randn(1, 6, 7, 2).astype(np.float32)
  up = np.asarray(layers.BilinearConvTranspose(2, k, s, padding=p).apply({}, jnp.asarray(x)))
  ref = tu.nhwc(F.interpolate(torch.tensor(tu.nchw(x)), scale_factor=s, mode="bilinear",
                              align_corners=False))
  jref = np.asarray(jax.image.resize(jnp.asarray(x), up.shape, "bilinear"))
  m = s  # the border s/2 px see the zero padding of the transposed conv
  np.testing.assert_allclose(up[:, m:-m, m:-m], ref[:, m:-m, m:-m], atol=1e-5)
  np.testing.assert_allclose(up[:, m:-m, m:-m], jref[:, m:-m, m:-m], atol=1e-5)
  assert not np.allclose(up[:, :1], ref[:, :1], atol=1e-3)


def test_bilinear_conv_transpose_freezing():
  x = jnp.ones((1, 3, 3, 2))
  frozen = layers.BilinearConvTranspose(2, 4, 2, padding=1)
  assert frozen.init(tu.key(), x) == {}
  trainable = layers.BilinearConvTranspose(2, 4, 2, padding=1, trainable=True)
  v = trainable.init(tu.key(), x)
  np.testing.assert_array_equal(v["params"]["kernel"], layers.bilinear_kernel(4, 2))
  np.testing.assert_allclose(trainable.apply(v, x), frozen.apply({}, x))
  g = jax.grad(lambda v: trainable.apply(v, x).sum())(v)
  assert np.abs(np.asarray(g["params"]["kernel"])).sum() > 0
  with pytest.raises(ValueError, match="expected 2 input channels"):
    frozen.apply({}, jnp.ones((1, 3, 3, 5)))


@pytest.mark.parametrize("src,dst", [((5, 7), (9, 13)), ((8, 8), (3, 5)), ((1, 4), (3, 8)),
                                     ((6, 6), (6, 6)), ((5, 4), (1, 3))])
@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_bilinear_matches_torch(src, dst, align_corners):
  x = np.random.RandomState(2).randn(2, *src, 3).astype(np.float32)
  out = _resize(jnp.asarray(x), dst, align_corners=align_corners)
  ref = F.interpolate(torch.tensor(tu.nchw(x)), size=dst, mode="bilinear",
                      align_corners=align_corners)
  np.testing.assert_allclose(np.asarray(out), tu.nhwc(ref), atol=1e-5)


def test_crops():
  x = jnp.arange(2 * 7 * 8 * 1.).reshape(2, 7, 8, 1)
  np.testing.assert_array_equal(layers.crop_to(x, (2, 3), (4, 5)), x[:, 2:6, 3:8])
  np.testing.assert_array_equal(layers.center_crop(x, (3, 4)), x[:, 2:5, 2:6])
  with pytest.raises(ValueError, match="does not fit"):
    layers.crop_to(x, (5, 0), (4, 4))


def test_check_images_messages():
  layers.check_images(jnp.zeros((1, 4, 4, 3)), "m")
  with pytest.raises(ValueError, match=r"m: images must have rank 4"):
    layers.check_images(jnp.zeros((4, 4, 3)), "m")
  with pytest.raises(ValueError, match="3 channels"):
    layers.check_images(jnp.zeros((1, 4, 4, 1)), "m")
  with pytest.raises(TypeError, match="floating point"):
    layers.check_images(jnp.zeros((1, 4, 4, 3), jnp.uint8), "m")
  with pytest.raises(TypeError, match="must be an array"):
    layers.check_images([[1.0]], "m")


@pytest.mark.parametrize("k,padding,dilation", [(7, 0, 1), (3, 2, 2), (7, 0, 4), (1, 0, 1)])
def test_matmul_conv_matches_torch_conv(k, padding, dilation):
  x = np.random.RandomState(0).randn(2, 30, 29, 3).astype(np.float32)
  layer = layers.MatmulConv(5, (k, k), padding=padding, dilation=dilation)
  v = layer.init(tu.key(), jnp.asarray(x))
  v = {"params": {"kernel": v["params"]["kernel"], "bias": jnp.arange(5.)}}
  out = jax.jit(layer.apply)(v, jnp.asarray(x))
  w = torch.tensor(np.asarray(v["params"]["kernel"]).transpose(3, 2, 0, 1))
  ref = F.conv2d(torch.tensor(tu.nchw(x)), w, torch.arange(5.), padding=padding, dilation=dilation)
  np.testing.assert_allclose(np.asarray(out), tu.nhwc(ref), atol=1e-4, rtol=1e-4)
  if k > 1:
    too_small = (k - 1) * dilation  # the dilated kernel spans (k - 1) * d + 1 pixels
    with pytest.raises(ValueError, match="does not fit"):
      layers.MatmulConv(5, (k, k), dilation=dilation).init(
          tu.key(), jnp.zeros((1, too_small, 40, 3)))


@pytest.mark.parametrize("stride", [2, 3])
def test_non_overlapping_conv_transpose_matches_torch(stride):
  torch.manual_seed(0)
  tlayer = torch.nn.ConvTranspose2d(4, 5, stride, stride)
  x = np.random.RandomState(0).randn(2, 3, 4, 4).astype(np.float32)
  v = {"params": {"kernel": jnp.asarray(tlayer.weight.detach().numpy().transpose(2, 3, 0, 1)),
                  "bias": jnp.asarray(tlayer.bias.detach().numpy())}}
  out = jax.jit(layers.NonOverlappingConvTranspose(5, stride).apply)(v, jnp.asarray(x))
  with torch.no_grad():
    ref = tu.nhwc(tlayer(torch.tensor(tu.nchw(x))))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


def test_non_overlapping_conv_transpose_in_flax_transposed_layout_equals_nn_conv_transpose():
  """``transpose_kernel=True``: the parameter (shape, init) and outputs of
  ``nn.ConvTranspose(transpose_kernel=True, padding=1)``, which Mask R-CNN's checkpoints hold."""
  x = jnp.asarray(np.random.RandomState(1).randn(2, 5, 6, 4), jnp.float32)
  ref = nn.ConvTranspose(3, (2, 2), (2, 2), padding=[(1, 1), (1, 1)], transpose_kernel=True)
  ours = layers.NonOverlappingConvTranspose(3, 2, transpose_kernel=True)
  v = ref.init(tu.key(), x)
  assert jax.tree.map(jnp.shape, ours.init(tu.key(), x)) == jax.tree.map(jnp.shape, v)
  v = jax.tree.map(lambda a: a + jnp.arange(a.size, dtype=a.dtype).reshape(a.shape) / 7, v)
  np.testing.assert_allclose(np.asarray(ours.apply(v, x)), np.asarray(ref.apply(v, x)),
                             atol=1e-5, rtol=1e-5)
