"""``jaxseg.ops.conv``: the custom-gradient convolution against ``torch.nn.functional.conv2d``."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import layers
from jaxseg.ops import conv as conv_ops

torch = pytest.importorskip("torch")

CASES = [  # (N, H, W, C_in, C_out, k, stride, dilation, padding)
    (2, 9, 7, 5, 6, 3, 1, 1, 1),
    (2, 8, 8, 4, 3, 3, 1, 2, 2),    # atrous, "same"
    (1, 6, 6, 3, 4, 3, 1, 4, 4),    # dilation larger than the map
    (2, 11, 10, 3, 5, 3, 2, 1, 1),  # strided, odd sizes
    (1, 13, 13, 3, 4, 7, 2, 1, 3),  # ResNet stem
    (2, 5, 4, 6, 7, 1, 1, 1, 0),    # 1x1
    (2, 9, 9, 4, 4, 1, 2, 1, 0),    # strided 1x1 (ResNet projection)
    (1, 7, 7, 4, 5, 3, 1, 1, 0),    # valid
]


def torch_grads(x, w, g, stride, dilation, padding):
  tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  tw = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)
  y = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=padding, dilation=dilation)
  y.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
  return (y.detach().numpy().transpose(0, 2, 3, 1), tx.grad.numpy().transpose(0, 2, 3, 1),
          tw.grad.numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("n,h,w,cin,cout,k,stride,dilation,padding", CASES)
@pytest.mark.parametrize("custom", [(True, False), (False, True), (True, True)])
def test_custom_gradients_match_torch(n, h, w, cin, cout, k, stride, dilation, padding, custom):
  custom_dw, custom_dx = custom
  if custom_dx and stride != 1:
    pytest.skip("the flipped-kernel input gradient is for stride 1 only (gradient_plan)")
  rng = np.random.RandomState(k * 7 + h)
  x = rng.randn(n, h, w, cin).astype(np.float32)
  kern = rng.randn(k, k, cin, cout).astype(np.float32)
  ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  g = rng.randn(n, ho, wo, cout).astype(np.float32)
  pads = ((padding, padding), (padding, padding))

  def f(x, kern):
    return conv_ops._conv(x, kern, (stride, stride), pads, (dilation, dilation), None,
                          custom_dw, custom_dx)

  y, vjp = jax.vjp(jax.jit(f), jnp.asarray(x), jnp.asarray(kern))
  dx, dw = vjp(jnp.asarray(g))
  ty, tdx, tdw = torch_grads(x, kern, g, stride, dilation, padding)
  np.testing.assert_allclose(np.asarray(y), ty, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dx), tdx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dw), tdw, rtol=1e-4, atol=1e-3)


def test_gradient_plan_is_cpu_only_and_follows_the_measured_rule():
  assert conv_ops.gradient_plan((2, 8, 8, 512), (3, 3, 512, 512), (1, 1), (2, 2), "gpu") == (
      False, False)
  assert conv_ops.gradient_plan((2, 8, 8, 512), (3, 3, 512, 512), (1, 1), (2, 2), "cpu") == (
      True, True)
  # Large maps with few channels keep XLA's weight gradient; strided convs its input gradient.
  assert conv_ops.gradient_plan((4, 128, 128, 32), (3, 3, 32, 32), (1, 1), (1, 1), "cpu") == (
      False, True)
  assert conv_ops.gradient_plan((64, 14, 14, 256), (3, 3, 256, 256), (1, 1), (1, 1), "cpu") == (
      True, True)
  assert conv_ops.gradient_plan((2, 16, 16, 256), (3, 3, 256, 64), (2, 2), (1, 1), "cpu") == (
      True, False)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 0), (1, 1), (2, "SAME"), (1, "VALID")])
def test_pointwise_convolutions_are_matmuls_equal_to_torch(stride, padding):
  rng = np.random.RandomState(stride)
  x = rng.randn(2, 7, 6, 5).astype(np.float32)
  w = rng.randn(1, 1, 5, 4).astype(np.float32)
  pads = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
  torch_pad = 0 if isinstance(padding, str) else padding

  def f(x, w):
    return conv_ops.conv_general_dilated(x, w, (stride, stride), pads,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))

  y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
  g = rng.randn(*y.shape).astype(np.float32)
  dx, dw = vjp(jnp.asarray(g))
  ty, tdx, tdw = torch_grads(x, w, g, stride, 1, torch_pad)
  np.testing.assert_allclose(np.asarray(y), ty, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), tdx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw), tdw, rtol=1e-4, atol=1e-4)
  if jax.default_backend() == "cpu":
    assert "conv_general_dilated" not in str(jax.make_jaxpr(jax.grad(
        lambda x, w: f(x, w).sum(), (0, 1)))(x, w))


def test_layers_conv_equals_flax_conv_with_the_same_parameters():
  """``layers.Conv`` is ``nn.Conv``: same parameter tree, outputs and gradients."""
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 256), jnp.float32)
  ours = layers.Conv(8, (3, 3), padding=[(2, 2), (2, 2)], kernel_dilation=(2, 2))
  ref = nn.Conv(8, (3, 3), padding=[(2, 2), (2, 2)], kernel_dilation=(2, 2))
  v = ours.init(jax.random.key(0), x)
  assert jax.tree.structure(v) == jax.tree.structure(ref.init(jax.random.key(0), x))

  def loss(model, v, x):
    return jnp.sum(jnp.sin(model.apply(v, x)))

  a, ga = jax.value_and_grad(loss, argnums=(1, 2))(ours, v, x)
  b, gb = jax.value_and_grad(loss, argnums=(1, 2))(ref, v, x)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for p, q in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-4)


def test_bfloat16_gradients_keep_their_dtypes():
  x = jnp.ones((1, 6, 6, 256), jnp.bfloat16)
  w = jnp.full((3, 3, 256, 4), 0.01, jnp.bfloat16)
  dx, dw = jax.grad(lambda x, w: conv_ops.conv_general_dilated(
      x, w, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
      dimension_numbers=("NHWC", "HWIO", "NHWC")).astype(jnp.float32).sum(), (0, 1))(x, w)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  # Centre taps see all 36 positions (padding 2, dilation 2 on a 6x6 map): dW = 16 there.
  assert float(dw[1, 1, 0, 0]) == 36.0


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_string_padding_takes_the_custom_gradient_and_matches_xla(padding):
  """``nn.Conv``'s default padding is the string "SAME" (every 1x1 head): it must reach the
  custom route (a 1x1 weight gradient is one matmul) and give XLA's results."""
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(2, 7, 6, 5), jnp.float32)
  w = jnp.asarray(rng.randn(3, 3, 5, 4), jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")

  def ours(x, w):
    return jnp.sum(jnp.sin(conv_ops.conv_general_dilated(
        x, w, (1, 1), padding, rhs_dilation=(2, 2), dimension_numbers=dn)))

  def ref(x, w):
    return jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
        x, w, (1, 1), padding, rhs_dilation=(2, 2), dimension_numbers=dn)))

  for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  jaxpr = str(jax.make_jaxpr(jax.grad(ours, 1))(x, w))
  assert "custom_vjp_call" in jaxpr


@pytest.mark.parametrize("h,w,dilation", [(8, 8, 12), (5, 9, 6), (4, 4, 3), (10, 10, 6)])
def test_taps_that_only_see_padding_are_dropped_exactly(h, w, dilation):
  """Atrous rates at or above the map size (ASPP on small maps): the convolution runs on the
  live taps only, with torch's result and zero weight gradient on the dropped taps."""
  rng = np.random.RandomState(h + dilation)
  k = 5 if h == 4 else 3
  pad = dilation * (k - 1) // 2
  x = rng.randn(2, h, w, 3).astype(np.float32)
  kern = rng.randn(k, k, 3, 4).astype(np.float32)
  live = [conv_ops.live_taps(n, k, 1, dilation, pad, pad) for n in (h, w)]

  def f(x, kern):
    return conv_ops.conv_general_dilated(x, kern, (1, 1), ((pad, pad), (pad, pad)),
                                         rhs_dilation=(dilation, dilation),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))

  y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(kern))
  g = rng.randn(*y.shape).astype(np.float32)
  dx, dw = vjp(jnp.asarray(g))
  ty, tdx, tdw = torch_grads(x, kern, g, 1, dilation, pad)
  np.testing.assert_allclose(np.asarray(y), ty, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dx), tdx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dw), tdw, rtol=1e-4, atol=1e-3)
  dead = np.ones((k, k), bool)
  dead[live[0][0]:live[0][1] + 1, live[1][0]:live[1][1] + 1] = False
  assert not np.asarray(dw)[dead].any()
  if (h, w) != (10, 10):
    assert dead.any()
  # Rows of a tap are live iff some output row reads a real input row (hand-counted).
  assert conv_ops.live_taps(8, 3, 1, 12, 12, 12) == (1, 1)
  assert conv_ops.live_taps(10, 3, 1, 6, 6, 6) == (0, 2)
  assert conv_ops.live_taps(4, 5, 1, 3, 6, 6) == (1, 3)


@pytest.mark.parametrize("h,w,stride", [(2, 2, 1), (4, 3, 1), (3, 3, 2)])
def test_tiny_maps_run_as_tap_sums_equal_to_torch(h, w, stride):
  """Maps of <= TINY_MAP positions (RefineNet's 2x2 blocks) are summed tap by tap on CPU."""
  rng = np.random.RandomState(h * w)
  x = rng.randn(2, h, w, 6).astype(np.float32)
  kern = rng.randn(3, 3, 6, 5).astype(np.float32)

  def f(x, kern):
    return conv_ops.conv_general_dilated(x, kern, (stride, stride), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))

  y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(kern))
  g = rng.randn(*y.shape).astype(np.float32)
  dx, dw = vjp(jnp.asarray(g))
  ty, tdx, tdw = torch_grads(x, kern, g, stride, 1, 1)
  np.testing.assert_allclose(np.asarray(y), ty, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dx), tdx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dw), tdw, rtol=1e-4, atol=1e-4)
  if jax.default_backend() == "cpu":
    assert "conv_general_dilated" not in str(jax.make_jaxpr(f)(x, kern))
