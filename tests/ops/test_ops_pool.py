"""``jaxseg.ops.pool.max_pool2d`` (through ``layers.max_pool``) against ``torch.nn.functional``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import layers

torch = pytest.importorskip("torch")

CASES = [  # (H, W, window, stride, padding, ceil_mode)
    (8, 8, 2, 2, 0, False),   # UNet
    (7, 9, 2, 2, 0, True),    # VGG/FCN ceil mode on odd sizes
    (9, 10, 3, 2, 1, False),  # ResNet stem
    (6, 5, 5, 1, 2, False),   # RefineNet chained residual pooling
    (11, 11, 3, 3, 1, True),
]


def torch_pool(x, window, stride, padding, ceil_mode):
  t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  y = torch.nn.functional.max_pool2d(t, window, stride, padding, ceil_mode=ceil_mode)
  return t, y


@pytest.mark.parametrize("h,w,window,stride,padding,ceil_mode", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_matches_torch_forward_and_gradient(h, w, window, stride, padding, ceil_mode,
                                                     ties):
  rng = np.random.RandomState(h * 100 + w + window)
  # Small integers make many windows hold several equal maxima: torch sends the gradient to
  # the first one in row-major order, and so must we.
  x = (rng.randint(0, 3, (2, h, w, 3)) if ties else rng.randn(2, h, w, 3)).astype(np.float32)
  t, ty = torch_pool(x, window, stride, padding, ceil_mode)
  g = rng.randn(*ty.shape).astype(np.float32)
  ty.backward(torch.tensor(g))

  def f(x):
    return layers.max_pool(x, window, stride, padding, ceil_mode=ceil_mode)

  y, vjp = jax.vjp(f, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1))
  (dx,) = vjp(jnp.asarray(g.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(dx), t.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)


def test_max_pool_jit_and_bfloat16():
  x = np.random.RandomState(0).randn(1, 6, 6, 4).astype(np.float32)
  y32 = jax.jit(lambda x: layers.max_pool(x, 3, 2, 1))(x)
  y16 = jax.jit(lambda x: layers.max_pool(x, 3, 2, 1))(jnp.asarray(x, jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y16, np.float32),
                                np.asarray(jnp.asarray(y32, jnp.bfloat16), np.float32))
  g = jax.grad(lambda x: layers.max_pool(x, 3, 2, 1).sum())(jnp.asarray(x, jnp.bfloat16))
  assert g.dtype == jnp.bfloat16
  # Every output takes exactly one input: the gradient sums to the number of outputs.
  assert float(g.astype(jnp.float32).sum()) == y32.size


def test_max_pool_window_larger_than_input_is_an_error():
  with pytest.raises(ValueError, match="larger than the padded input"):
    layers.max_pool(jnp.zeros((1, 2, 2, 1)), 3, 1, 0)
