"""Bad label values get errors naming the key, the values and the valid set; empty batches
give 0 with zero gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.losses import _common
from jaxseg.losses import box_loss, cross_entropy, partial_cross_entropy, scribble_loss
from jaxseg.losses import maskrcnn_loss, scribble_em_loss, scribble_pseudo_labels
from jaxseg.losses.box import box_label_set_nll
from jaxseg.losses.supervised import pixel_nll
from tests.models.models_testutil import jaxpr_equations

N, H, W, C = 2, 16, 16, 3


def _logits(seed=0):
  return np.random.default_rng(seed).normal(size=(N, H, W, C)).astype(np.float32)


def _labels(*bad, seed=1):
  """Random labels in [0, C) with some 255s and the values ``bad`` at fixed pixels."""
  labels = np.random.default_rng(seed).integers(0, C, (N, H, W)).astype(np.int32)
  labels[:, :2] = 255
  for k, value in enumerate(bad):
    labels[k % N, 5 + k, 7] = value
  return labels


def _image():
  return np.random.default_rng(2).random((N, H, W, 3), dtype=np.float32)


def _boxes(classes=((1, 2, -1), (2, -1, -1))):
  boxes = np.array([[[2, 3, 9, 12], [8, 1, 14, 7], [0, 0, 0, 0]],
                    [[4, 4, 15, 15], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
  return {"boxes": boxes, "box_classes": np.array(classes, np.int32), "image": _image()}


_scribble_fast = functools.partial(scribble_loss, kernel="local", radius=1)

# (id, loss, batch key, extra batch entries)
LABEL_LOSSES = [
    ("cross_entropy", cross_entropy, "mask", {}),
    ("partial_cross_entropy", partial_cross_entropy, "scribble", {}),
    ("scribble_loss", _scribble_fast, "scribble", {"image": _image()}),
    ("scribble_pseudo_labels", functools.partial(scribble_pseudo_labels, iterations=1),
     "scribble", {"image": _image()}),
    ("box_loss(bbox_seg)", functools.partial(box_loss, mode="bbox_seg"), "box_seg", {}),
]
_LOSS_IDS = [r[0] for r in LABEL_LOSSES]


@pytest.mark.parametrize("where, loss, key, extra", LABEL_LOSSES, ids=_LOSS_IDS)
@pytest.mark.parametrize("bad, shown", [
    ((7,), r"\[7\]"),
    ((-1,), r"\[-1\]"),
    ((3, 9, -4, 254), r"\[-4, 3, 9, 254\]"),
], ids=["7", "-1", "several"])
def test_out_of_range_labels_raise(where, loss, key, extra, bad, shown):
  batch = {key: _labels(*bad), **extra}
  msg = (rf"{where.replace('(', '.').replace(')', '.')}: batch\['{key}'\] has labels {shown} "
         rf"outside \[0, 3\) \(255 is the only ignore value\) \(in {len(bad)} of {N * H * W} "
         r"entries\); the logits have 3 classes")
  with pytest.raises(ValueError, match=msg):
    loss(_logits(), batch)
  with pytest.raises(ValueError, match=msg):  # a committed jax.Array: checked on device
    loss(_logits(), {**batch, key: jnp.asarray(batch[key])})


@pytest.mark.parametrize("where, loss, key, extra", LABEL_LOSSES, ids=_LOSS_IDS)
def test_float_labels_raise_type_error(where, loss, key, extra):
  batch = {key: _labels().astype(np.float32), **extra}
  with pytest.raises(TypeError, match=rf"batch\['{key}'\] must hold integer class ids, got "
                     r"dtype float32; convert with .astype\(np.int32\)"):
    loss(_logits(), batch)


@pytest.mark.parametrize("where, loss, key, extra", LABEL_LOSSES, ids=_LOSS_IDS)
def test_in_range_and_ignore_labels_pass(where, loss, key, extra):
  labels = _labels()
  labels[0, 4] = C - 1
  labels[1, 4] = 0
  out = loss(_logits(), {key: labels, **extra})
  assert np.all(np.isfinite(np.asarray(out)))


def test_pixel_nll_checks_labels():
  with pytest.raises(TypeError, match=r"pixel_nll: labels must hold integer"):
    pixel_nll(_logits(), _labels().astype(np.float32))
  with pytest.raises(ValueError, match=r"pixel_nll: labels has labels \[5\] outside \[0, 3\)"):
    pixel_nll(_logits(), _labels(5))


def test_custom_ignore_index():
  labels = _labels()
  labels[labels == 255] = -1
  logits = _logits()
  a = cross_entropy(logits, {"mask": labels}, ignore_index=-1)
  b = cross_entropy(logits, {"mask": _labels()})
  assert float(a) == pytest.approx(float(b), rel=1e-6)
  with pytest.raises(ValueError, match=r"labels \[255\] outside \[0, 3\) \(-1 is the only"):
    cross_entropy(logits, {"mask": _labels()}, ignore_index=-1)


def test_class_weights_must_have_one_weight_per_class():
  with pytest.raises(ValueError, match=r"class_weights must have one weight per class, shape "
                     r"\(3,\), got \(2,\)"):
    cross_entropy(_logits(), {"mask": _labels()}, class_weights=[1.0, 2.0])


# ----------------------------------------------------------------------------
# Inside the user's jit: a host callback raises.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [7, -1])
def test_jitted_cross_entropy_raises_with_the_message(bad):
  with pytest.raises(jax.errors.JaxRuntimeError) as info:
    float(jax.jit(cross_entropy)(_logits(), {"mask": _labels(bad)}))
  text = str(info.value)
  assert f"[{bad}]" in text and "[0, 3)" in text and "batch['mask']" in text


def test_jitted_losses_pass_good_labels_and_match_eager():
  logits, batch = _logits(), {"mask": _labels()}
  assert float(jax.jit(cross_entropy)(logits, batch)) == pytest.approx(
      float(cross_entropy(logits, batch)), rel=1e-6)


@pytest.mark.parametrize("loss, batch", [
    (partial_cross_entropy, {"scribble": _labels(4)}),
    (functools.partial(box_loss, mode="bbox_seg"), {"box_seg": _labels(3)}),
    (functools.partial(box_loss, mode="em_fixed"), _boxes(((1, 5, -1), (2, -1, -1)))),
], ids=["pce", "bbox_seg", "box_classes"])
def test_other_jitted_losses_raise(loss, batch):
  with pytest.raises(jax.errors.JaxRuntimeError, match=r"outside \[-?[01], 3\)"):
    float(jax.jit(loss)(_logits(), batch))


def _callbacks(fn, *args):
  eqns = jaxpr_equations(jax.make_jaxpr(fn)(*args).jaxpr)
  return sum(e.primitive.name == "debug_callback" for e in eqns)


@pytest.mark.parametrize("loss, batch", [
    (cross_entropy, {"mask": _labels()}),
    (_scribble_fast, {"scribble": _labels(), "image": _image()}),
    (functools.partial(box_loss, mode="bbox_seg"), {"box_seg": _labels()}),
    (functools.partial(box_loss, mode="em_fixed"), _boxes()),
    (functools.partial(box_loss, mode="boxinst"), _boxes()),
], ids=["ce", "scribble", "bbox_seg", "em_fixed", "boxinst"])
def test_labels_checked_removes_the_callback(loss, batch):
  # Fresh lambdas: jit caches traces by function, and the flag is read while tracing.
  assert _callbacks(lambda l, b: loss(l, b), _logits(), batch) == 1
  with _common.labels_checked():
    assert _callbacks(lambda l, b: loss(l, b), _logits(), batch) == 0
  assert not _common._LABELS_CHECKED.get()


def test_labels_checked_lets_bad_labels_through():
  """Under the flag the caller vouches for the labels: a label 7 reads past the logits (NaN)."""
  with _common.labels_checked():
    out = jax.jit(lambda l, b: cross_entropy(l, b))(_logits(), {"mask": _labels(7)})
  assert np.isnan(float(out))


# ----------------------------------------------------------------------------
# Box classes and Mask R-CNN's roi_labels
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["em_fixed", "em_adapt", "bbox_soft", "boxinst"])
@pytest.mark.parametrize("classes, shown", [
    (((1, 3, -1), (2, -1, -1)), r"\[3\]"),
    (((1, 2, -2), (2, -1, -1)), r"\[-2\]"),
], ids=["C", "-2"])
def test_box_classes_out_of_range(mode, classes, shown):
  with pytest.raises(ValueError, match=rf"box_loss\({mode}\): batch\['box_classes'\] has labels "
                     rf"{shown} outside \[-1, 3\) \(-1 = padding\).*padding slots -1"):
    box_loss(_logits(), _boxes(classes), mode=mode)


def test_roi_labels_out_of_range():
  rng = np.random.default_rng(0)
  n, s, a, p, m = 2, 6, 10, 3, 4
  outputs = dict(
      rpn_logits=rng.normal(size=(n, a)).astype(np.float32),
      rpn_deltas=np.zeros((n, a, 4), np.float32), rpn_targets=np.zeros((n, a, 4), np.float32),
      rpn_labels=np.ones((n, a), np.int32),
      class_logits=rng.normal(size=(n, s, C)).astype(np.float32),
      box_deltas=np.zeros((n, s, 4), np.float32), roi_targets=np.zeros((n, s, 4), np.float32),
      roi_labels=np.array([[1, 2, 0, 0, 9, 9], [0, 0, 0, 0, 0, 0]], np.int32),
      roi_valid=np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool),
      mask_logits=np.zeros((n, p, m, m), np.float32), mask_targets=np.zeros((n, p, m, m),
                                                                             np.float32),
      mask_valid=np.ones((n, p), bool))
  assert np.isfinite(float(maskrcnn_loss(outputs)))  # 9 only on unsampled slots: fine
  outputs["roi_labels"][1, 3] = 3
  with pytest.raises(ValueError, match=r"outputs\['roi_labels'\] has labels \[3\] outside "
                     r"\[0, 3\).*check_target_values"):
    maskrcnn_loss(outputs)


# ----------------------------------------------------------------------------
# Empty batches
# ----------------------------------------------------------------------------

def _value_and_grad(loss, logits, batch):
  value, grad = jax.value_and_grad(lambda x: loss(x, batch))(jnp.asarray(logits))
  return float(value), np.asarray(grad)


@pytest.mark.parametrize("loss, batch", [
    (cross_entropy, {"mask": np.full((N, H, W), 255, np.int32)}),
    (cross_entropy, {"mask": _labels(), "valid": np.zeros((N, H, W), bool)}),
    (partial_cross_entropy, {"scribble": np.full((N, H, W), 255, np.int32)}),
    (functools.partial(cross_entropy, class_weights=[1.0, 2.0, 0.5]),
     {"mask": np.full((N, H, W), 255, np.int32)}),
    (_scribble_fast, {"scribble": np.full((N, H, W), 255, np.int32), "image": _image()}),
    (functools.partial(box_loss, mode="bbox_seg"), {"box_seg": np.full((N, H, W), 255,
                                                                       np.int32)}),
], ids=["ce all-ignore", "ce none valid", "pce", "weighted ce",
        "scribble_loss", "bbox_seg"])
def test_no_labelled_pixel_gives_zero_and_zero_gradient(loss, batch):
  """Nothing to learn from: 0 and a zero gradient, not NaN. For scribble_loss the pairwise
  term is scaled by pCE's gradient norm, so it vanishes too: the CRF term alone would pull
  the network to one constant label."""
  value, grad = _value_and_grad(loss, _logits(), batch)
  assert value == 0.0
  assert np.all(grad == 0.0)


def test_zero_sized_batch_gives_zero():
  logits = np.zeros((0, H, W, C), np.float32)
  assert float(cross_entropy(logits, {"mask": np.zeros((0, H, W), np.int32)})) == 0.0


@pytest.mark.parametrize("loss", [
    functools.partial(box_loss, mode="em_fixed"),
    functools.partial(box_loss, mode="em_adapt"),
    functools.partial(box_loss, mode="bbox_soft"),
    functools.partial(box_loss, mode="boxinst"),
    box_label_set_nll,
], ids=["em_fixed", "em_adapt", "bbox_soft", "boxinst", "label_set"])
def test_no_boxes_means_all_background(loss):
  """An image without boxes holds no object: every box loss becomes cross-entropy towards the
  background, log(C) for uniform logits; BoxInst's box terms average over no box and are 0."""
  batch = _boxes(((-1, -1, -1), (-1, -1, -1)))
  value, grad = _value_and_grad(loss, np.zeros((N, H, W, C), np.float32), batch)
  assert value == pytest.approx(np.log(C), rel=1e-5)
  # d/dz of -log softmax(z)_0 at z = 0 is softmax - onehot = (1/C - 1, 1/C, 1/C) per pixel.
  expected = np.broadcast_to(np.array([1 / C - 1, 1 / C, 1 / C]) / (N * H * W), grad.shape)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-9)


def test_scribble_em_loss_labels_are_not_rechecked():
  batch = {"scribble": _labels(), "image": _image()}
  fn = functools.partial(scribble_em_loss, iterations=1)
  assert _callbacks(lambda l, b: fn(l, b), _logits(), batch) == 1  # the scribbles only
