"""Bad image values and Mask R-CNN targets get errors naming the problem and the fix."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxseg
from jaxseg.models import layers
from jaxseg.models import maskrcnn as mrcnn
from jaxseg.train import state as train_state
from tests.models import models_testutil as tu

N, H, W = 2, 16, 16


def _rgb(seed=0):
  return np.random.default_rng(seed).random((N, H, W, 3), dtype=np.float32)


def _with_nan(x):
  x = x.copy()
  x[0, 1, 2, 0] = np.nan
  x[1, 3, 4, 1] = np.nan
  x[1, 5, 5, 2] = np.inf
  return x


# (id, images from an RGB batch in [0, 1], exception, message regex: the problem and the fix)
BAD_IMAGES = [
    ("0-255 float", lambda x: x * 255, ValueError, r"look like 0-255 .*divide by 255"),
    ("0-255 device", lambda x: jnp.asarray(x * 255), ValueError, r"0-255 .*divide by 255"),
    ("uint8", lambda x: (x * 255).astype(np.uint8), TypeError,
     r"floating point.*dtype uint8.*astype\(np.float32\) / 255"),
    ("NCHW", lambda x: x.transpose(0, 3, 1, 2), ValueError,
     r"channels-last \[N,H,W,3\]; transpose with x.transpose\(0, 2, 3, 1\)"),
    ("grayscale", lambda x: x[..., :1], ValueError, r"grayscale: repeat it to 3 channels"),
    ("RGBA", lambda x: np.concatenate([x, x[..., :1]], -1), ValueError, r"RGBA: drop alpha"),
    ("NaN", _with_nan, ValueError, r"2 NaN and 1 inf values.*np.nan_to_num"),
    ("NaN device", lambda x: jnp.asarray(_with_nan(x)), ValueError, r"2 NaN and 1 inf"),
    ("normalised", lambda x: (x - 0.485) / 0.229, ValueError,
     r"down to -2.1\d*: they look mean/std-normalised.*before normalisation"),
    ("no batch axis", lambda x: x[0], ValueError, r"rank 4 \[N,H,W,3\].*x\[None\]"),
]

GOOD_IMAGES = [
    ("exact 0 and 1", lambda x: np.where(x > 0.5, 1.0, 0.0).astype(np.float32)),
    ("random [0, 1]", lambda x: x),
    ("device", jnp.asarray),
    ("noise overshoot", lambda x: x * 1.4 - 0.2),  # unclipped augmentation: [-0.2, 1.2]
    ("bfloat16", lambda x: jnp.asarray(x, jnp.bfloat16)),
]


@pytest.fixture(scope="module")
def unet():
  model = jaxseg.models.build("unet", num_classes=3, **tu.TINY_VARIANTS["unet"])
  return model, tu.init(model, jnp.zeros((N, H, W, 3)))


@pytest.mark.parametrize("make, exc, msg", [r[1:] for r in BAD_IMAGES],
                         ids=[r[0] for r in BAD_IMAGES])
def test_model_rejects_bad_images(unet, make, exc, msg):
  model, variables = unet
  with pytest.raises(exc, match=msg):
    model.apply(variables, make(_rgb()), train=False)


@pytest.mark.parametrize("make, exc, msg", [r[1:] for r in BAD_IMAGES],
                         ids=[r[0] for r in BAD_IMAGES])
def test_train_check_images_has_the_same_messages(make, exc, msg):
  with pytest.raises(exc, match=msg):
    train_state.check_images(make(_rgb()))


@pytest.mark.parametrize("make", [r[1] for r in GOOD_IMAGES], ids=[r[0] for r in GOOD_IMAGES])
def test_good_images_pass(unet, make):
  model, variables = unet
  images = make(_rgb(1))
  train_state.check_images(images)
  out = model.apply(variables, images, train=False)
  assert out.shape == (N, H, W, 3)


def test_create_train_state_rejects_0_255_images():
  model = jaxseg.models.build("unet", num_classes=3, **tu.TINY_VARIANTS["unet"])
  with pytest.raises(ValueError, match=r"jaxseg.train: images look like 0-255"):
    jaxseg.train.create_train_state(jax.random.key(0), model, optax.sgd(0.1), _rgb() * 255)


def test_threshold_is_between_augmentation_overshoot_and_0_255():
  layers.check_image_values(np.full((1, 2, 2, 3), layers.IMAGE_MAX, np.float32), "t")
  layers.check_image_values(np.full((1, 2, 2, 3), layers.IMAGE_MIN, np.float32), "t")
  with pytest.raises(ValueError, match="0-255"):
    layers.check_image_values(np.full((1, 2, 2, 3), 2.0, np.float32), "t")


def test_jit_and_export_skip_values_and_hold_no_callback(unet):
  """Under jit the values are unknown: nothing is checked and no host callback is compiled in
  (the trainer checks its host batches); the model stays exportable."""
  model, variables = unet
  fn = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
  images = _rgb() * 255
  assert jax.jit(fn)(variables, images).shape == (N, H, W, 3)
  jaxpr = jax.make_jaxpr(fn)(variables, images)
  prims = {e.primitive.name for e in tu.jaxpr_equations(jaxpr.jaxpr)}
  assert not {p for p in prims if "callback" in p}, prims
  exported = jax.export.export(jax.jit(fn))(
      variables, jax.ShapeDtypeStruct((N, H, W, 3), jnp.float32))
  assert exported.out_avals[0].shape == (N, H, W, 3)


def test_device_images_closed_over_by_a_traced_function_are_not_checked(unet):
  """A concrete jax.Array captured as a constant inside jit/grad is traced, not run: the check
  must not try to fetch a value (it did: ConcretizationTypeError in the remat tests)."""
  model, variables = unet
  images = jnp.asarray(_rgb())

  def loss(params):
    return jnp.mean(model.apply({**variables, "params": params}, images, train=False))

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  assert np.isfinite(float(value)) and jax.tree.leaves(grads)


# ----------------------------------------------------------------------------
# Mask R-CNN targets
# ----------------------------------------------------------------------------

MH, MW, C = 64, 96, 3


def _targets(slots=None):
  """Image 0: a class-1 box on the canvas edges, a class-2 box, a padding slot holding a
  garbage box; image 1: one box, the rest padding. ``slots`` maps (image, slot) to a
  replacement (box, class)."""
  boxes = np.array([[[0, 0, MH - 1, MW - 1], [10, 20, 30, 40], [-5, 99, -7, 300]],
                    [[5, 5, 5, 5], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
  classes = np.array([[1, 2, -1], [2, -1, -1]], np.int32)
  for (i, j), (box, cls) in (slots or {}).items():
    boxes[i, j], classes[i, j] = box, cls
  return {"boxes": boxes, "box_classes": classes}


BAD_TARGETS = [
    ("class 0", {(1, 1): ((1, 1, 2, 2), 0)}, r"box_classes'\] 0 is the background class "
     r"\(1 slot\(s\), the first at image 1, slot 1\); object classes are 1..2.*-1 pads"),
    ("class C", {(0, 1): ((10, 20, 30, 40), 3)}, r"has \[3\] >= num_classes .*1..2"),
    ("class -2", {(1, 2): ((0, 0, 1, 1), -2)}, r"has \[-2\].*-1 pads"),
    ("inverted y", {(1, 1): ((30, 0, 10, 5), 1)}, r"inverted box \(30.0, 0.0, 10.0, 5.0\) at "
     r"image 1, slot 1.*y0 <= y1 and x0 <= x1 \(not \(x0, y0, x1, y1\)"),
    ("inverted x", {(0, 1): ((0, 40, 5, 20), 1)}, r"inverted box"),
    ("y1 = H", {(0, 1): ((0, 0, MH, 5), 1)}, r"outside the 64x96 image .*0 <= y0 <= y1 <= 63 "
     r"and 0 <= x0 <= x1 <= 95; clip them"),
    ("x1 = W", {(1, 0): ((0, 0, 5, MW), 1)}, r"outside the 64x96 image"),
    ("negative", {(1, 0): ((-1, 0, 5, 5), 1)}, r"outside the 64x96 image"),
    ("NaN box", {(1, 0): ((np.nan, 0, 5, 5), 1)}, r"non-finite box"),
]


@pytest.mark.parametrize("slots, msg", [r[1:] for r in BAD_TARGETS],
                         ids=[r[0] for r in BAD_TARGETS])
def test_check_target_values_rejects(slots, msg):
  with pytest.raises(ValueError, match=msg):
    mrcnn.check_target_values(_targets(slots), (MH, MW), C)


@pytest.mark.parametrize("targets", [
    _targets(),
    {k: jnp.asarray(v) for k, v in _targets().items()},
    _targets({(1, 0): ((0, 0, 0, 0), 2)}),  # a one-pixel box
    {"boxes": np.zeros((1, 2, 4), np.float32), "box_classes": -np.ones((1, 2), np.int32)},
], ids=["edges and padding", "device", "one pixel", "all padding"])
def test_check_target_values_accepts(targets):
  mrcnn.check_target_values(targets, (MH, MW), C)


@pytest.fixture(scope="module")
def maskrcnn():
  model = jaxseg.models.build("maskrcnn", num_classes=C, **mrcnn.TINY,
                              mask_supervision="boxes")
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((N, MH, MW, 3), jnp.float32))
  return model, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)


@pytest.mark.parametrize("slots, msg", [BAD_TARGETS[0][1:], BAD_TARGETS[3][1:],
                                        BAD_TARGETS[5][1:]], ids=["class 0", "inverted", "H"])
def test_model_checks_concrete_targets(maskrcnn, slots, msg):
  model, variables = maskrcnn
  images = np.random.default_rng(0).random((N, MH, MW, 3), dtype=np.float32)
  with pytest.raises(ValueError, match="maskrcnn: .*" + msg):
    model.apply(variables, images, train=True, targets=_targets(slots),
                rngs={"sampling": jax.random.key(0)})


def test_model_traces_targets_without_a_check(maskrcnn):
  """Under tracing the targets are unknown: the model builds its program (no callback); the
  trainer checks the host batch with check_target_values."""
  model, variables = maskrcnn
  images = jax.ShapeDtypeStruct((N, MH, MW, 3), jnp.float32)
  targets = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in _targets({(1, 1): ((1, 1, 2, 2), 0)}).items()}
  out = jax.eval_shape(lambda v, x, t: model.apply(v, x, train=True, targets=t,
                                                   rngs={"sampling": jax.random.key(0)}),
                       variables, images, targets)
  assert out["roi_labels"].shape[0] == N
