"""Every registered model learns: one small batch is overfit, gradients reach conv1."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg
from tests.models import models_testutil as tu

# Tiny variants that train in seconds on a CPU.
TINY = {
    "unet": dict(features=8, depth=2),
    "segnet": dict(width_multiplier=1 / 8),
    "fcn32s": dict(width_multiplier=1 / 32, trainable_upsampling=True),
    "fcn16s": dict(width_multiplier=1 / 32, trainable_upsampling=True),
    "fcn8s": dict(width_multiplier=1 / 32),
    "dilation": dict(width_multiplier=1 / 32, context="basic"),
    "deeplabv1": dict(width_multiplier=1 / 32),
    "deeplabv2": dict(width_multiplier=1 / 32),
}
LR = {"segnet": 1e-2, "unet": 1e-2}


def test_tiny_table_covers_every_vgg_era_model():
  assert set(TINY) <= set(jaxseg.models.names())


def _first_layer(tree, name):
  if name == "unet":
    return tree["down0"]["conv0"]
  return tree["backbone"]["conv1_1"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_overfits_one_batch_and_gradient_reaches_conv1(name):
  kwargs = dict(TINY[name], dropout=0.0) if name != "segnet" else TINY[name]
  model = jaxseg.models.build(name, num_classes=3, **kwargs)
  images, labels = tu.toy_batch(n=2, h=32, w=32)
  initial = tu.init(model, images)
  losses, variables, grads = tu.train_steps(model, images, labels, steps=100,
                                            lr=LR.get(name, 3e-3), variables=initial)
  assert losses[-1] < 0.1 * losses[0] and losses[-1] < 0.1, losses[::10]
  # (FCN's zero-initialised score layers block this gradient at step 0 only, as in Caffe.)
  assert np.abs(np.asarray(_first_layer(grads, name)["kernel"])).max() > 0
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  moved = (_first_layer(variables["params"], name)["kernel"]
           - _first_layer(initial["params"], name)["kernel"])
  assert np.abs(np.asarray(moved)).max() > 1e-4


def test_normalisation_uses_mean_and_std_fields():
  images, _ = tu.toy_batch(n=1, h=16, w=16)
  mean, std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
  a = jaxseg.models.build("unet", num_classes=2, features=4, depth=2, mean=mean, std=std)
  b = jaxseg.models.build("unet", num_classes=2, features=4, depth=2, mean=(0., 0., 0.),
                          std=(1., 1., 1.))
  v = tu.init(a, images)
  pre = (images - jnp.asarray(mean)) / jnp.asarray(std)
  np.testing.assert_allclose(a.apply(v, images, train=False), b.apply(v, pre, train=False),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY))
def test_bad_input_rank_and_dtype(name):
  model = jaxseg.models.build(name, num_classes=3, **TINY[name])
  with pytest.raises(ValueError, match="rank 4"):
    model.init(tu.key(), jnp.zeros((16, 16, 3)), train=False)
  with pytest.raises(ValueError, match="3 channels"):
    model.init(tu.key(), jnp.zeros((1, 16, 16, 1)), train=False)
  with pytest.raises(TypeError, match="floating point"):
    model.init(tu.key(), jnp.zeros((1, 16, 16, 3), jnp.int32), train=False)
