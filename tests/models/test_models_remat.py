"""``remat=True`` (``jax.checkpoint`` per block): same parameters, same results, real remat.

Each rematted block is one ``checkpoint`` (``remat2``) equation in the traced forward pass, so
counting those against the architecture's block count (by hand: ResNet-18 has 2+2+2+2 basic
blocks, MobileNetV2 17 inverted residuals...) checks that every block, and nothing else, is
under ``jax.checkpoint``. Values are compared with the ``remat=False`` model, which is the
independent reference here: recomputation may only change floating-point rounding.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxseg
from jaxseg.models import backbones
from jaxseg.models.backbones import vgg

from tests.models import models_testutil as tu

FAST_COMPILE = {"xla_backend_optimization_level": 0}
CHECKPOINT_PRIMITIVES = ("remat2", "checkpoint")


def _count_checkpoints(jaxpr) -> int:
  """Checkpoint equations anywhere in ``jaxpr`` (nested ones included)."""
  return sum(eqn.primitive.name in CHECKPOINT_PRIMITIVES for eqn in tu.jaxpr_equations(jaxpr))


# case -> (module factory taking remat, number of blocks counted by hand from the paper layout)
CASES = {
    # 2 down levels + bottleneck + 2 up levels, one ConvBlock each.
    "unet": (lambda remat: jaxseg.models.build("unet", num_classes=3, features=4, depth=2,
                                               remat=remat), 5),
    # BasicBlocks (2, 2, 2, 2); dilated (OS8) so strides and dilations both occur.
    "resnet18": (lambda remat: backbones.build_backbone("resnet18", width_multiplier=1 / 16,
                                                        output_stride=8, remat=remat), 8),
    # Bottlenecks (3, 4, 6, 3) with the deep stem.
    "resnet50": (lambda remat: backbones.build_backbone("resnet50", width_multiplier=1 / 16,
                                                        deep_stem=True, remat=remat), 16),
    # 1 + 2 + 3 + 4 + 3 + 3 + 1 inverted residual blocks (features.1..17).
    "mobilenet_v2": (lambda remat: backbones.build_backbone("mobilenet_v2", width_multiplier=0.25,
                                                            output_stride=16, remat=remat), 17),
    # Five conv stages with BatchNorm (vgg16_bn / SegNet encoder).
    "vgg16_bn": (lambda remat: vgg.VGG16(widths=(4, 4, 8, 8, 8), norm="batch", remat=remat), 5),
}


def _scalar(out):
  """A scalar that depends on every output (logits, or every feature map of a backbone)."""
  leaves = jax.tree.leaves(out)
  return sum(jnp.mean(jnp.square(x.astype(jnp.float32))) for x in leaves)


@functools.lru_cache(maxsize=None)
def _run(case: str, remat: bool):
  """(variables, loss, grads, updated batch_stats, checkpoint count) of one train-mode pass."""
  make, _ = CASES[case]
  model = make(remat)
  images, _ = tu.toy_batch(n=2, h=32, w=32)
  variables = jax.jit(functools.partial(model.init, train=False),
                      compiler_options=FAST_COMPILE)(tu.key(0), images)

  def loss(params):
    out, mutated = model.apply({**variables, "params": params}, images, train=True,
                               mutable=["batch_stats"])
    return _scalar(out), mutated["batch_stats"]

  (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                  compiler_options=FAST_COMPILE)(variables["params"])
  checkpoints = _count_checkpoints(jax.make_jaxpr(loss)(variables["params"]).jaxpr)
  return variables, float(value), grads, stats, checkpoints


@pytest.mark.parametrize("case", sorted(CASES))
def test_remat_wraps_every_block_and_nothing_else(case):
  assert _run(case, False)[4] == 0
  assert _run(case, True)[4] == CASES[case][1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_remat_keeps_the_parameter_tree_and_values(case):
  plain, rematted = _run(case, False)[0], _run(case, True)[0]
  flat_a, flat_b = traverse_util.flatten_dict(plain), traverse_util.flatten_dict(rematted)
  assert sorted(flat_a) == sorted(flat_b)
  for path in flat_a:
    assert flat_a[path].shape == flat_b[path].shape, path
    np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg=str(path))


def _assert_tree_close(a, b, rtol=1e-4):
  """Leafwise |a - b| <= rtol * (|b| + max|b| over the tree).

  The tree-wide term matters for gradients that are zero up to rounding (a BatchNorm shift
  followed by another training-mode BatchNorm): remat changes XLA's fusion, hence rounding.
  """
  flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert sorted(flat_a) == sorted(flat_b)
  scale = max(float(np.abs(np.asarray(v)).max()) for v in flat_b.values())
  for path, va in flat_a.items():
    va, vb = np.asarray(va, np.float64), np.asarray(flat_b[path], np.float64)
    np.testing.assert_array_less(np.abs(va - vb), rtol * (np.abs(vb) + scale) + 1e-30,
                                 err_msg=str(path))


@pytest.mark.parametrize("case", sorted(CASES))
def test_remat_gives_the_same_loss_gradients_and_statistics(case):
  _, loss_a, grads_a, stats_a, _ = _run(case, False)
  _, loss_b, grads_b, stats_b, _ = _run(case, True)
  assert np.isclose(loss_b, loss_a, rtol=1e-5)
  _assert_tree_close(grads_b, grads_a)
  _assert_tree_close(stats_b, stats_a)


# Every registered model takes ``remat`` through the builder; tiny variants, traced only.
TINY = tu.TINY_VARIANTS
# Blocks per backbone: ResNet-18 8, -50 16, -101 33, MobileNetV2 17, VGG16 5 stages.
BLOCKS = {"deeplabv1": 5, "deeplabv2": 16, "deeplabv3": 8, "deeplabv3_resnet101": 33,
          "deeplabv3_resnet50": 16, "deeplabv3plus": 17, "dilation": 5, "fcn16s": 5, "fcn32s": 5,
          "fcn8s": 5, "fcn_resnet101": 33, "fcn_resnet50": 16, "maskrcnn": 8, "pspnet": 8,
          "refinenet": 8, "segnet": 5, "unet": 5}


def test_every_registered_model_is_listed():
  assert sorted(TINY) == jaxseg.models.names() == sorted(BLOCKS)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_model_takes_remat_with_the_same_parameters(name):
  shape = (2, 64, 64, 3)  # Mask R-CNN needs a multiple of 32
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  trees, counts = [], []
  for remat in (False, True):
    model = jaxseg.models.build(name, num_classes=3, remat=remat, **TINY[name])
    jaxpr = jax.make_jaxpr(lambda x: model.init(tu.key(0), x, train=False))(x)
    counts.append(_count_checkpoints(jaxpr.jaxpr))
    variables = jax.eval_shape(lambda x: model.init(tu.key(0), x, train=False), x)
    trees.append(jax.tree.map(lambda a: (a.shape, a.dtype), variables))
  assert trees[0] == trees[1]
  assert counts == [0, BLOCKS[name]]
