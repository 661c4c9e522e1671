"""Dilation front-end and context modules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg
from jaxseg.models import dilated
from tests.models import models_testutil as tu


def test_front_end_geometry_8l_plus_372():
  # Unpadded convs: an input of 8L + 372 px gives L outputs (fyu/dilation's label dim).
  fe = dilated.Dilation(num_classes=3, widths=(1,) * 5, fc_features=1, context=None)
  for size in (16, 64, 65):
    x = jax.ShapeDtypeStruct((1, size, size + 8, 3), jnp.float32)

    def run(x):
      v = fe.init(tu.key(), x, train=False)
      return fe.apply(v, x, train=False, capture_intermediates=True)

    logits, state = jax.eval_shape(run, x)
    assert logits.shape == (1, size, size + 8, 3)
    final = state["intermediates"]["final"]["__call__"][0]
    assert final.shape[1:3] == (-(-size // 8), -(-(size + 8) // 8))  # output stride 8


def test_full_size_param_count():
  model = jaxseg.models.build("dilation", num_classes=21, context="basic")
  params = tu.abstract_variables(model, (1, 64, 64, 3))["params"]
  convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
  front = sum(9 * a * b + b for a, b in convs) + 49 * 512 * 4096 + 4096 + 4096 * 4096 + 4096
  front += 4096 * 21 + 21
  context = 7 * (9 * 21 * 21 + 21) + 21 * 21 + 21
  assert tu.param_count(params) == front + context
  assert abs(front - 134.3e6) < 0.1e6


@pytest.mark.parametrize("h,w", [(1, 1), (16, 16), (19, 30)])
@pytest.mark.parametrize("context", [None, "basic", "large"])
def test_any_input_size(h, w, context):
  model = jaxseg.models.build("dilation", num_classes=3, width_multiplier=1 / 32, context=context)
  assert tu.abstract_output(model, (2, h, w, 3)).shape == (2, h, w, 3)


@pytest.mark.parametrize("dilations", [dilated.DILATION8, dilated.DILATION10])
def test_basic_context_is_identity_at_init(dilations):
  ctx = dilated.ContextModule(5, "basic", dilations)
  x = jnp.asarray(np.random.RandomState(0).uniform(0, 3, size=(2, 9, 11, 5)), jnp.float32)
  v = ctx.init(tu.key(), x)
  np.testing.assert_allclose(ctx.apply(v, x), x, rtol=1e-6, atol=1e-6)
  # The ReLUs clip negative scores (documented).
  np.testing.assert_allclose(ctx.apply(v, -x), 0 * x, atol=1e-6)
  assert len(v["params"]) == len(dilations) + 1


def test_large_context_init_follows_the_paper():
  c = 3
  ctx = dilated.ContextModule(c, "large", dilated.DILATION8, noise_std=0.0)
  x = jnp.asarray(np.random.RandomState(1).uniform(0, 2, size=(1, 12, 12, c)), jnp.float32)
  v = ctx.init(tu.key(), x)["params"]
  widths = [2 * c, 2 * c, 4 * c, 8 * c, 16 * c, 32 * c, 32 * c, c]
  names = [f"ctx_conv{i}" for i in range(1, 7)] + ["ctx_fc1", "ctx_final"]
  c_in = c
  for name, c_out in zip(names, widths):
    k = np.asarray(v[name]["kernel"])
    assert k.shape[2:] == (c_in, c_out)
    centre = k[k.shape[0] // 2, k.shape[1] // 2]
    for a in range(c_in):
      for b in range(c_out):
        expected = c / c_out if (a * c) // c_in == (b * c) // c_out else 0.0
        assert centre[a, b] == pytest.approx(expected)
    off_centre = np.delete(k.reshape(-1, c_in, c_out), k.shape[0] * k.shape[1] // 2, axis=0)
    assert not np.any(off_centre)
    c_in = c_out
  np.testing.assert_allclose(ctx.apply({"params": v}, x), x, rtol=1e-5, atol=1e-5)
  # With the default noise the kernels deviate by roughly noise_std.
  noisy = dilated.ContextModule(c, "large").init(tu.key(), x)["params"]
  delta = np.asarray(noisy["ctx_conv3"]["kernel"] - v["ctx_conv3"]["kernel"])
  assert 0.5e-3 < delta.std() < 2e-3


def test_deconv_and_bilinear_upsampling_agree_away_from_the_border():
  kw = dict(num_classes=3, width_multiplier=1 / 32, context=None)
  bil = jaxseg.models.build("dilation", **kw)
  dec = jaxseg.models.build("dilation", upsampling="deconv", **kw)
  x = jnp.asarray(np.random.RandomState(0).uniform(size=(1, 40, 48, 3)), jnp.float32)
  v = tu.init(bil, x)
  # Large scores make the comparison meaningful.
  v = {"params": dict(v["params"], final={"kernel": v["params"]["final"]["kernel"] * 1e3,
                                          "bias": v["params"]["final"]["bias"]})}
  a = jax.jit(lambda v, x: bil.apply(v, x, train=False))(v, x)
  b = jax.jit(lambda v, x: dec.apply(v, x, train=False))(v, x)
  np.testing.assert_allclose(a[:, 8:-8, 8:-8], b[:, 8:-8, 8:-8], rtol=1e-4, atol=1e-5)
  assert not np.allclose(a[:, :2], b[:, :2], rtol=1e-3)


def test_bad_arguments():
  with pytest.raises(ValueError, match="context must be None, 'basic' or 'large'"):
    tu.abstract_output(jaxseg.models.build("dilation", num_classes=3, width_multiplier=1 / 32,
                                           context="huge"), (1, 8, 8, 3))
  with pytest.raises(ValueError, match="upsampling must be"):
    tu.abstract_output(jaxseg.models.build("dilation", num_classes=3, width_multiplier=1 / 32,
                                           upsampling="nearest"), (1, 8, 8, 3))
  with pytest.raises(ValueError, match="expects 5 channels"):
    dilated.ContextModule(5).init(tu.key(), jnp.zeros((1, 4, 4, 3)))
