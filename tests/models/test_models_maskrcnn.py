"""Mask R-CNN model behaviour: structure, output contracts, target assignment, mask pasting.

References are independent of the code under test: torchvision's ``AnchorGenerator``,
``box_iou``, ``BoxCoder``, ``roi_align`` and ``paste_masks_in_image``, and hand-made cases.
Numerical parity of the whole network with torchvision lives in the converter's tests.
All model tests share one tiny model (ResNet-18 x 0.25, a 64x96 canvas) and one compiled
eval and train function (plus one forward of the box-supervised variant), so the file runs in
about a minute on two CPU cores.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torchvision.models.detection import anchor_utils, image_list
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import box_iou as tv_box_iou
from torchvision.ops import roi_align as tv_roi_align

import jaxseg
from jaxseg.models import maskrcnn as mrcnn
from jaxseg.models.detection import heads as heads_lib
from jaxseg.models.detection import paste as paste_lib

H, W = 64, 96
N, M = 2, 4
NUM_CLASSES = 3
# P2..P6 of the canvas: P6 = P5[::2, ::2] rounds up (3 -> 2 columns).
LEVELS = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
NUM_ANCHORS = 3 * sum(h * w for h, w in LEVELS)


def _model(**kw):
  return jaxseg.models.build("maskrcnn", num_classes=NUM_CLASSES, **{**mrcnn.TINY, **kw})


def _fill(abstract, seed=0):
  """Deterministic random variables with the structure of ``abstract`` (no init compile).

  Kernels ~ N(0, 1/fan_in), biases 0; frozen BN is the identity.
  """
  rng = np.random.RandomState(seed)

  def leaf(path, x):
    name = path[-1].key
    if name in ("scale", "var"):
      return jnp.ones(x.shape, x.dtype)
    if name in ("bias", "mean"):
      return jnp.zeros(x.shape, x.dtype)
    fan_in = int(np.prod(x.shape[:-1])) or 1
    return jnp.asarray(rng.randn(*x.shape) / np.sqrt(fan_in), x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _images(seed=0):
  return jnp.asarray(np.random.RandomState(seed).rand(N, H, W, 3), jnp.float32)


def _batch(counts=(2, 1)):
  """Gt of the two images: the first ``counts[i]`` of a fixed list of boxes, rest padding."""
  spec = [[((10, 10, 30, 40), 1), ((40, 50, 60, 90), 2), ((2, 60, 20, 80), 1)],
          [((5, 5, 50, 50), 2), ((30, 60, 62, 94), 1), ((0, 0, 9, 9), 2)]]
  boxes = np.zeros((N, M, 4), np.float32)
  classes = -np.ones((N, M), np.int32)
  masks = np.zeros((N, M, H, W), np.uint8)
  for i, count in enumerate(counts):
    for j, ((y0, x0, y1, x1), c) in enumerate(spec[i][:count]):
      boxes[i, j] = (y0, x0, y1, x1)
      classes[i, j] = c
      # An ellipse inside the (inclusive) box: soft targets differ from the box.
      yy, xx = np.mgrid[:H, :W]
      cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0 + 1) / 2, (x1 - x0 + 1) / 2
      masks[i, j] = ((yy - cy) ** 2 / ry ** 2 + (xx - cx) ** 2 / rx ** 2) <= 1
  return {"image": _images(), "boxes": jnp.asarray(boxes), "box_classes": jnp.asarray(classes),
          "instance_masks": jnp.asarray(masks)}


@pytest.fixture(scope="module")
def model():
  return _model()


@pytest.fixture(scope="module")
def variables(model):
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((N, H, W, 3), jnp.float32))
  return _fill(abstract)


@pytest.fixture(scope="module")
def eval_out(model, variables):
  """Eval outputs, intermediates, and the heads re-run on the detected boxes (one compile)."""
  def run(v, x):
    out, state = model.apply(v, x, train=False, mutable=["intermediates"])
    heads = model.apply(v, x, out["boxes"], method="predict_for_boxes")
    return out, state["intermediates"], heads

  return jax.device_get(jax.jit(run)(variables, _images()))


def _surrogate_loss(out):
  """A loss touching every training output that carries a gradient."""
  mask = jnp.where(out["mask_valid"][..., None, None], out["mask_logits"], 0.0)
  return (jnp.sum(out["rpn_logits"] ** 2) + jnp.sum(out["rpn_deltas"] ** 2)
          + jnp.sum(out["class_logits"] ** 2) + jnp.sum(out["box_deltas"] ** 2)
          + jnp.sum(mask ** 2))


@pytest.fixture(scope="module")
def train_fn(model):
  """Training outputs, intermediates and the parameter gradients of a surrogate loss."""
  def run(v, batch, key):
    def loss(params):
      out, state = model.apply({**v, "params": params}, batch["image"], train=True,
                               targets=batch, rngs={"sampling": key}, mutable=["intermediates"])
      return _surrogate_loss(out), (out, state["intermediates"])

    grads, (out, inter) = jax.grad(loss, has_aux=True)(v["params"])
    return out, inter, grads

  return jax.jit(run)


@pytest.fixture(scope="module")
def train_out(train_fn, variables):
  batch = _batch()
  out, inter, grads = jax.device_get(train_fn(variables, batch, jax.random.key(1)))
  return batch, out, inter, grads


def _tv_anchors(model):
  """torchvision's AnchorGenerator on the canvas, as (y0, x0, y1, x1)."""
  gen = anchor_utils.AnchorGenerator(model.anchor_sizes, model.aspect_ratios)
  feats = [torch.zeros(1, 1, h, w) for h, w in LEVELS]
  anchors = gen(image_list.ImageList(torch.zeros(1, 3, H, W), [(H, W)]), feats)[0]
  return anchors[:, [1, 0, 3, 2]]


def _xyxy(boxes):
  return torch.as_tensor(np.asarray(boxes)[..., [1, 0, 3, 2]].copy())


# ----------------------------------------------------------------------------
# Registry, structure, configuration errors
# ----------------------------------------------------------------------------

def test_registered_with_targets_flag():
  assert "maskrcnn" in jaxseg.models.names()
  model = jaxseg.models.build("maskrcnn", num_classes=91)
  assert isinstance(model, mrcnn.MaskRCNN) and model.takes_targets
  assert model.backbone_name == "resnet50" and model.box_candidates >= 1000
  assert mrcnn.maskrcnn_resnet18_fpn(num_classes=5).backbone_name == "resnet18"
  assert mrcnn.maskrcnn_resnet50_fpn_coco_v1().frozen_bn_eps == 0.0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(backbone="vgg16"), ValueError, "backbone 'vgg16' is not supported"),
    (dict(num_classes=1), ValueError, "num_classes must be an int >= 2"),
    (dict(colour="red"), TypeError, "unknown option"),
    (dict(anchor_sizes=((32,),) * 4), ValueError, "one entry per pyramid level"),
    (dict(anchor_sizes=((32, 64),) + ((32,),) * 4), ValueError, "same number of anchors"),
    (dict(box_positive_fraction=0.0), ValueError, "box_positive_fraction"),
    (dict(box_candidates=0), ValueError, "box_candidates"),
    (dict(mask_supervision="scribbles"), ValueError, "mask_supervision must be one of"),
])
def test_invalid_configuration(kwargs, error, match):
  kwargs = {"num_classes": 91, **kwargs}
  with pytest.raises(error, match=match):
    jaxseg.models.build("maskrcnn", **kwargs)


def test_resnet50_parameters_match_torchvision():
  """Same parameter tensors as torchvision's maskrcnn_resnet50_fpn (91 classes)."""
  from torchvision.models.detection import maskrcnn_resnet50_fpn
  tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
  tv_shapes = sorted(tuple(p.shape) for p in tv.parameters())
  model = jaxseg.models.build("maskrcnn", num_classes=91)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                     jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  flat = {"/".join(str(p.key) for p in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(v)[0]}
  # Frozen BN keeps its affine in batch_stats; torch's weights=None model has BN parameters.
  ours = [s for k, s in flat.items()
          if k.startswith("params/") or k.endswith(("/scale", "/bias"))]
  assert sum(int(np.prod(s)) for s in ours) == sum(int(np.prod(s)) for s in tv_shapes)
  assert len(ours) == len(tv_shapes)


def test_module_paths_and_shapes(variables):
  p = variables["params"]
  c, a = 32, 3
  assert set(p) == {"backbone", "rpn", "box_head", "box_predictor", "mask_head",
                    "mask_predictor"}
  assert set(p["backbone"]) == {"body", "fpn"}
  assert {"conv1", "layer1", "layer4"} <= set(p["backbone"]["body"])
  assert set(p["backbone"]["fpn"]) == {f"{k}_{i}" for k in ("inner", "layer") for i in range(4)}
  assert p["backbone"]["fpn"]["layer_0"]["kernel"].shape == (3, 3, c, c)
  assert p["rpn"]["conv"]["kernel"].shape == (3, 3, c, c)
  assert p["rpn"]["cls_logits"]["kernel"].shape == (1, 1, c, a)
  assert p["rpn"]["bbox_pred"]["kernel"].shape == (1, 1, c, 4 * a)
  assert p["box_head"]["fc6"]["kernel"].shape == (7 * 7 * c, 64)
  assert p["box_head"]["fc7"]["kernel"].shape == (64, 64)
  assert p["box_predictor"]["cls_score"]["kernel"].shape == (64, NUM_CLASSES)
  assert p["box_predictor"]["bbox_pred"]["kernel"].shape == (64, 4 * NUM_CLASSES)
  assert set(p["mask_head"]) == {f"mask_fcn{i}" for i in range(1, 5)}
  assert p["mask_head"]["mask_fcn1"]["kernel"].shape == (3, 3, c, 16)
  assert p["mask_predictor"]["conv5_mask"]["kernel"].shape == (2, 2, 16, 16)
  assert p["mask_predictor"]["mask_fcn_logits"]["kernel"].shape == (1, 1, 16, NUM_CLASSES)
  assert set(variables["batch_stats"]["backbone"]["body"]["bn1"]) == {"scale", "bias", "mean",
                                                                    "var"}


def test_mask_predictor_upsamples_like_torch():
  """conv5_mask with the contract's kernel layout equals torch's ConvTranspose2d(2, 2)."""
  pred = heads_lib.MaskRCNNPredictor(num_classes=3, channels=4)
  x = np.random.RandomState(0).randn(2, 5, 5, 6).astype(np.float32)
  v = pred.init(jax.random.key(0), x)
  tconv = torch.nn.ConvTranspose2d(6, 4, 2, 2)
  logits = torch.nn.Conv2d(4, 3, 1)
  p = v["params"]
  with torch.no_grad():
    tconv.weight.copy_(torch.tensor(np.asarray(p["conv5_mask"]["kernel"]).transpose(3, 2, 0, 1)))
    tconv.bias.copy_(torch.tensor(np.asarray(p["conv5_mask"]["bias"])))
    logits.weight.copy_(torch.tensor(np.asarray(p["mask_fcn_logits"]["kernel"]).transpose(3, 2,
                                                                                        0, 1)))
    logits.bias.copy_(torch.tensor(np.asarray(p["mask_fcn_logits"]["bias"])))
    ref = logits(torch.relu(tconv(torch.tensor(x).permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(pred.apply(v, x)), ref.numpy(), atol=1e-5)


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

def test_invalid_inputs(model, variables):
  with pytest.raises(ValueError, match="multiple of 32"):
    model.apply(variables, jnp.zeros((1, 64, 80, 3)), train=False)
  with pytest.raises(TypeError, match="floating point"):
    model.apply(variables, jnp.zeros((1, 64, 64, 3), jnp.uint8), train=False)
  with pytest.raises(ValueError, match="needs targets"):
    model.apply(variables, _images(), train=True, rngs={"sampling": jax.random.key(0)})
  batch = _batch()
  with pytest.raises(ValueError, match="instance_masks"):
    bad = dict(batch, instance_masks=batch["instance_masks"][:, :, :32])
    model.apply(variables, batch["image"], train=True, targets=bad,
                rngs={"sampling": jax.random.key(0)})
  with pytest.raises(ValueError, match="box_classes"):
    bad = dict(batch, box_classes=batch["box_classes"][:, :2])
    model.apply(variables, batch["image"], train=True, targets=bad,
                rngs={"sampling": jax.random.key(0)})
  with pytest.raises(ValueError, match="lack"):
    bad = {k: v for k, v in batch.items() if k != "instance_masks"}
    model.apply(variables, batch["image"], train=True, targets=bad,
                rngs={"sampling": jax.random.key(0)})
  with pytest.raises(ValueError, match=r"boxes must be \[N,K,4\]"):
    model.apply(variables, _images(), jnp.zeros((N, 3, 5)), method="predict_for_boxes")


# ----------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------

def test_inference_output_contract(model, eval_out):
  out, _, _ = eval_out
  k = model.box_detections_per_img
  assert out["boxes"].shape == (N, k, 4) and out["boxes"].dtype == np.float32
  assert out["scores"].shape == (N, k) and out["classes"].shape == (N, k)
  assert out["classes"].dtype == np.int32 and out["valid"].dtype == bool
  assert out["masks"].shape == (N, k, H, W) and out["masks"].dtype == np.float32
  valid = out["valid"]
  assert valid.any(axis=1).all()  # 3 classes: random softmax scores clear 0.05
  for i in range(N):
    n_valid = int(valid[i].sum())
    assert valid[i, :n_valid].all() and not valid[i, n_valid:].any()  # valid first
    s = out["scores"][i, :n_valid]
    assert (np.diff(s) <= 0).all() and (s > model.box_score_thresh).all()
    b = out["boxes"][i, :n_valid]
    assert (b >= 0).all() and (b[:, [0, 2]] <= H).all() and (b[:, [1, 3]] <= W).all()
    assert ((b[:, 2:] - b[:, :2]) >= 1e-2).all()
    c = out["classes"][i, :n_valid]
    assert ((c >= 1) & (c < NUM_CLASSES)).all()
    # Per-class NMS at 0.5: no two kept boxes of one class overlap more.
    iou = tv_box_iou(_xyxy(b), _xyxy(b)).numpy()
    same = (c[:, None] == c[None, :]) & ~np.eye(n_valid, dtype=bool)
    assert (iou[same] <= model.box_nms_thresh + 1e-6).all()
    for name in ("boxes", "scores", "classes", "masks"):
      assert not out[name][i, n_valid:].any()
  assert (out["masks"] >= 0).all() and (out["masks"] <= 1).all()


def test_inference_intermediates(model, eval_out):
  _, inter, _ = eval_out
  num_anchors = NUM_ANCHORS
  r = min(model.rpn_post_nms_top_n_test, num_anchors)
  fpn = inter["fpn"][0]
  assert [f.shape for f in fpn] == [(N, h, w, 32) for h, w in LEVELS]
  # P6 is P5 subsampled (LastLevelMaxPool with a 1x1 window).
  np.testing.assert_array_equal(fpn[4], fpn[3][:, ::2, ::2])
  assert inter["rpn_logits"][0].shape == (N, num_anchors)
  assert inter["rpn_deltas"][0].shape == (N, num_anchors, 4)
  assert inter["proposals"][0].shape == (N, r, 4)
  assert inter["box_roi_features"][0].shape == (N, r, 7, 7, 32)
  assert inter["class_logits"][0].shape == (N, r, NUM_CLASSES)
  assert inter["box_deltas"][0].shape == (N, r, NUM_CLASSES, 4)
  props, valid = inter["proposals"][0], inter["proposal_valid"][0]
  assert valid.any(axis=1).all()
  ok = props[valid]
  assert (ok >= 0).all() and (ok[:, [0, 2]] <= H).all() and (ok[:, [1, 3]] <= W).all()
  assert ((ok[:, 2:] - ok[:, :2]) >= 1e-3).all()
  assert not props[~valid].any()


def test_inference_masks_are_pasted_mask_probs(eval_out):
  """The pasted masks equal torchvision's paste of the mask head's probabilities."""
  out, _, heads = eval_out
  logits = np.take_along_axis(heads["mask_logits"], out["classes"][:, :, None, None, None],
                              axis=4)[..., 0]
  probs = 1 / (1 + np.exp(-logits))
  for i in range(N):
    n_valid = int(out["valid"][i].sum())
    ref = paste_masks_in_image(torch.tensor(probs[i, :n_valid])[:, None],
                               _xyxy(out["boxes"][i, :n_valid]), (H, W))[:, 0].numpy()
    np.testing.assert_allclose(out["masks"][i, :n_valid], ref, atol=1e-5)


def test_mask_probs_option_contract(variables):
  model = _model(paste_masks=False, box_detections_per_img=7)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, _images())
  assert "masks" not in out and out["mask_probs"].shape == (N, 7, 28, 28)
  assert out["boxes"].shape == (N, 7, 4) and out["valid"].shape == (N, 7)


def test_predict_for_boxes_shapes(model, variables):
  boxes = jnp.asarray([[[0, 0, 64, 96], [10, 20, 30, 50], [5, 5, 6, 6]]] * N, jnp.float32)
  out = jax.eval_shape(lambda v, x, b: model.apply(v, x, b, method="predict_for_boxes"),
                       variables, _images(), boxes)
  assert out["class_logits"].shape == (N, 3, NUM_CLASSES)
  assert out["box_deltas"].shape == (N, 3, NUM_CLASSES, 4)
  assert out["mask_logits"].shape == (N, 3, 28, 28, NUM_CLASSES)


# ----------------------------------------------------------------------------
# Mask pasting
# ----------------------------------------------------------------------------

def _paste_case(k=120, seed=0):
  rng = np.random.RandomState(seed)
  masks = rng.rand(k, 28, 28).astype(np.float32)
  y0, x0 = rng.uniform(0, H - 1, k), rng.uniform(0, W - 1, k)
  h, w = rng.uniform(0.01, 40, k), rng.uniform(0.01, 60, k)
  h[:30] = rng.uniform(0.01, 2, 30)  # boxes under two pixels
  boxes = np.stack([y0, x0, np.minimum(y0 + h, H), np.minimum(x0 + w, W)], 1)
  boxes[:10] = np.round(boxes[:10])  # integer corners
  boxes[10] = (0, 0, H, W)  # the whole canvas: the expanded box leaves it
  return masks, boxes.astype(np.float32)


def test_paste_masks_matches_torchvision():
  masks, boxes = _paste_case()
  ref = paste_masks_in_image(torch.tensor(masks)[:, None], _xyxy(boxes), (H, W))[:, 0].numpy()
  np.testing.assert_allclose(mrcnn.paste_masks(masks, boxes, (H, W)), ref, atol=1e-6)
  batched = mrcnn.paste_masks(masks.reshape(2, -1, 28, 28), boxes.reshape(2, -1, 4), (H, W))
  np.testing.assert_allclose(batched.reshape(ref.shape), ref, atol=1e-6)
  on_device = jax.jit(functools.partial(paste_lib.paste_masks_jax, image_size=(H, W)))(
      masks.reshape(2, -1, 28, 28), boxes.reshape(2, -1, 4))
  np.testing.assert_allclose(np.asarray(on_device).reshape(ref.shape), ref, atol=1e-6)


def test_paste_masks_hand_case():
  """A constant mask on an integer box fills exactly the box's pixels, torchvision's way.

  Box rows 2..6 (continuous 2..7): expanded by 30/28 about 4.5 -> 1.82..7.18 -> int 1..7;
  the padded 30-px mask resized to 7 rows fades on the first and last rows.
  """
  mask = np.ones((1, 28, 28), np.float32)
  out = mrcnn.paste_masks(mask, np.asarray([[2, 3, 7, 9]], np.float32), (10, 12))[0]
  assert not out[0].any() and not out[8:].any() and not out[:, :2].any()
  assert not out[:, 10:].any()
  np.testing.assert_allclose(out[4, 5], 1.0)
  # Row 1 is the first resized row: src = 0.5 * 30 / 7 - 0.5 = 1.642..., between padding
  # sample 1 (value 1, as index 1 is the first mask row) and 2: 1.0. Row 0 of the padded mask
  # is zero, reached for src < 1 only.
  assert 0 < out[1, 5] <= 1
  with pytest.raises(ValueError, match="image_size"):
    mrcnn.paste_masks(mask, np.zeros((1, 4), np.float32), (0, 5))
  with pytest.raises(ValueError, match="boxes must be"):
    mrcnn.paste_masks(mask, np.zeros((2, 4), np.float32), (10, 12))


# ----------------------------------------------------------------------------
# Training mode
# ----------------------------------------------------------------------------

def test_train_output_shapes(model, train_out):
  _, out, inter, _ = train_out
  a = NUM_ANCHORS
  s, p = model.box_batch_size_per_image, int(model.box_batch_size_per_image * 0.25)
  expected = {
      "rpn_logits": (N, a), "rpn_deltas": (N, a, 4), "rpn_labels": (N, a),
      "rpn_targets": (N, a, 4), "class_logits": (N, s, NUM_CLASSES), "box_deltas": (N, s, 4),
      "roi_labels": (N, s), "roi_valid": (N, s), "roi_targets": (N, s, 4),
      "mask_logits": (N, p, 28, 28), "mask_targets": (N, p, 28, 28), "mask_valid": (N, p)}
  assert {k: v.shape for k, v in out.items()} == expected
  assert out["rpn_labels"].dtype == np.int32 and out["roi_labels"].dtype == np.int32
  assert out["roi_valid"].dtype == bool and out["mask_valid"].dtype == bool
  assert inter["sampled_boxes"][0].shape == (N, s, 4)
  for v in out.values():
    assert np.isfinite(v).all()


def test_rpn_targets_follow_the_matcher(model, train_out):
  batch, out, _, _ = train_out
  anchors = _tv_anchors(model)
  coder = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
  for i in range(N):
    labels = out["rpn_labels"][i]
    pos, neg = labels == 1, labels == 0
    assert 1 <= pos.sum() <= 128 and pos.sum() + neg.sum() == 256
    gt = _gt(batch, i)
    iou = tv_box_iou(_xyxy(gt), anchors[:, [1, 0, 3, 2]]).numpy()  # [G, A]
    best = iou.max(axis=0)
    low_quality = (iou == iou.max(axis=1, keepdims=True)).any(axis=0)
    assert ((best >= 0.7) | low_quality)[pos].all()
    assert (best < 0.3)[neg].all() and not low_quality[neg].any()
    # The regression target decodes back onto the matched (highest-IoU) gt box.
    t = torch.tensor(out["rpn_targets"][i][pos][:, [1, 0, 3, 2]])
    decoded = coder.decode_single(t, anchors[pos][:, [1, 0, 3, 2]]).numpy()[:, [1, 0, 3, 2]]
    np.testing.assert_allclose(decoded, gt[iou[:, pos].argmax(axis=0)], atol=1e-3)
    assert not out["rpn_targets"][i][neg].any()


def _gt(batch, i):
  """Continuous gt boxes of image i (inclusive boxes + 1)."""
  valid = np.asarray(batch["box_classes"][i]) >= 0
  return np.asarray(batch["boxes"][i])[valid] + np.asarray([0, 0, 1, 1], np.float32)


def test_roi_sampling_and_targets(model, train_out):
  batch, out, inter, _ = train_out
  coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
  for i in range(N):
    rois = inter["sampled_boxes"][0][i]
    valid, labels = out["roi_valid"][i], out["roi_labels"][i]
    pos = valid & (labels > 0)
    assert valid.sum() <= 512 and 1 <= pos.sum() <= 128
    assert not labels[~valid].any()
    gt = _gt(batch, i)
    gt_classes = np.asarray(batch["box_classes"][i])[np.asarray(batch["box_classes"][i]) >= 0]
    iou = tv_box_iou(_xyxy(gt), _xyxy(rois)).numpy()
    best, arg = iou.max(axis=0), iou.argmax(axis=0)
    assert (best >= 0.5)[pos].all() and (best < 0.5)[valid & ~pos].all()
    np.testing.assert_array_equal(labels[pos], gt_classes[arg[pos]])
    # add_gt_proposals: with fewer than 128 positives every gt box is a sampled positive.
    for g in gt:
      assert (np.abs(rois[pos] - g).max(axis=1) == 0).any()
    t = torch.tensor(out["roi_targets"][i][pos][:, [1, 0, 3, 2]])
    decoded = coder.decode_single(t, _xyxy(rois[pos])).numpy()[:, [1, 0, 3, 2]]
    np.testing.assert_allclose(decoded, gt[arg[pos]], atol=1e-3)
    # Sampled RoIs keep candidate order (torchvision's where(pos | neg)); proposals come
    # first and the appended gt boxes last.
    assert not out["roi_targets"][i][~pos].any()


def test_mask_targets_are_torchvision_roi_align(model, train_out):
  batch, out, inter, _ = train_out
  for i in range(N):
    rois = inter["sampled_boxes"][0][i]
    pos = np.flatnonzero(out["roi_valid"][i] & (out["roi_labels"][i] > 0))
    mv = out["mask_valid"][i]
    assert mv.sum() == len(pos) and mv[:len(pos)].all() and not mv[len(pos):].any()
    gt = _gt(batch, i)
    arg = tv_box_iou(_xyxy(gt), _xyxy(rois[pos])).numpy().argmax(axis=0)
    gt_masks = torch.tensor(np.asarray(batch["instance_masks"][i]), dtype=torch.float32)
    roi = torch.cat([torch.tensor(arg, dtype=torch.float32)[:, None], _xyxy(rois[pos])], 1)
    ref = tv_roi_align(gt_masks[:, None], roi, (28, 28), 1.0)[:, 0].numpy()
    np.testing.assert_allclose(out["mask_targets"][i][:len(pos)], ref, atol=1e-5)
    assert not out["mask_targets"][i][len(pos):].any()
    assert 0 < ref.mean() < 1  # soft targets of ellipses, not boxes


def test_no_recompile_for_changing_gt_counts(train_fn, variables, train_out):
  """Gt counts change inside the padded size M without retracing; an empty image works."""
  before = train_fn._cache_size()
  out, _, grads = jax.device_get(train_fn(variables, _batch(counts=(3, 0)), jax.random.key(2)))
  assert train_fn._cache_size() == before
  # Image 1 has no gt: every sampled anchor and RoI is background, no mask slot is valid.
  assert not (out["rpn_labels"][1] == 1).any() and (out["rpn_labels"][1] == 0).sum() == 256
  assert not (out["roi_labels"][1] > 0).any() and out["roi_valid"][1].sum() > 0
  assert not out["mask_valid"][1].any() and not out["mask_targets"][1].any()
  assert (out["mask_valid"][0].sum() >= 3)
  for v in list(out.values()) + jax.tree.leaves(grads):
    assert np.isfinite(v).all()


def test_injected_sampler_is_used_by_rpn_and_roi_heads(variables):
  """Both heads sample through the ``sampler`` field, with torchvision's label conventions."""
  calls = []

  def first_k(labels, key, num_samples, positive_fraction):
    calls.append((labels.shape, num_samples, positive_fraction))
    pos, neg = labels >= 1, labels == 0
    n_pos = jnp.minimum(pos.sum(), int(num_samples * positive_fraction))
    n_neg = jnp.minimum(neg.sum(), num_samples - n_pos)
    return pos & (jnp.cumsum(pos) <= n_pos), neg & (jnp.cumsum(neg) <= n_neg)

  model = _model(sampler=first_k, rpn_batch_size_per_image=16, box_batch_size_per_image=8)
  batch = _batch()
  out = jax.eval_shape(lambda v, b: model.apply(v, b["image"], train=True, targets=b,
                                                rngs={"sampling": jax.random.key(0)}),
                       variables, batch)
  r = min(model.rpn_post_nms_top_n_train, NUM_ANCHORS)
  assert calls == [((NUM_ANCHORS,), 16, 0.5), ((r + M,), 8, 0.25)]  # traced once per vmap
  assert out["roi_labels"].shape == (N, 8) and out["mask_valid"].shape == (N, 2)


def test_gradients_reach_every_head(train_out):
  grads = train_out[3]
  for name in ("backbone", "rpn", "box_head", "box_predictor", "mask_head", "mask_predictor"):
    norms = [float(np.abs(g).sum()) for g in jax.tree.leaves(grads[name])]
    assert all(np.isfinite(norms)) and sum(norms) > 0, name


# ----------------------------------------------------------------------------
# Box supervision (BoxInst on the mask head)
# ----------------------------------------------------------------------------

def _box_batch():
  return {k: v for k, v in _batch().items() if k != "instance_masks"}


def test_mask_supervision_from_masks_needs_instance_masks(model, variables):
  with pytest.raises(ValueError, match="lack.*instance_masks.*mask_supervision='boxes'"):
    model.apply(variables, _images(), train=True, targets=_box_batch(),
                rngs={"sampling": jax.random.key(0)})


def test_box_supervision_targets_and_colors(variables, train_out):
  """Without instance masks: the same sampling and heads as mask supervision, box-footprint
  mask targets (torchvision RoIAlign of the hand-rasterised matched gt box) and the image
  sampled on the mask grid (torchvision RoIAlign, sampling_ratio 2)."""
  model = _model(mask_supervision="boxes")
  batch = _box_batch()
  out = jax.device_get(jax.jit(lambda v, b: model.apply(
      v, b["image"], train=True, targets=b, rngs={"sampling": jax.random.key(1)}))(
          variables, batch))
  _, ref, inter, _ = train_out  # mask supervision, same variables, batch and key
  assert set(out) == set(ref) | {"mask_colors"}
  for k in ref:
    if k != "mask_targets":
      np.testing.assert_allclose(out[k], ref[k], atol=1e-4, err_msg=k)
  assert out["mask_colors"].shape == (N, ref["mask_valid"].shape[1], 28, 28, 3)
  image = torch.tensor(np.asarray(batch["image"])).permute(0, 3, 1, 2)
  for i in range(N):
    rois = inter["sampled_boxes"][0][i]
    pos = np.flatnonzero(out["roi_valid"][i] & (out["roi_labels"][i] > 0))
    gt = _gt(batch, i)
    arg = tv_box_iou(_xyxy(gt), _xyxy(rois[pos])).numpy().argmax(axis=0)
    raster = np.zeros((len(gt), H, W), np.float32)
    for g, (y0, x0, y1, x1) in enumerate(np.asarray(batch["boxes"][i][:len(gt)], int)):
      raster[g, y0:y1 + 1, x0:x1 + 1] = 1.0  # inclusive pixel boxes
    roi = torch.cat([torch.tensor(arg, dtype=torch.float32)[:, None], _xyxy(rois[pos])], 1)
    ref_t = tv_roi_align(torch.tensor(raster)[:, None], roi, (28, 28), 1.0)[:, 0].numpy()
    np.testing.assert_allclose(out["mask_targets"][i][:len(pos)], ref_t, atol=1e-5)
    roi = torch.cat([torch.full((len(pos), 1), float(i)), _xyxy(rois[pos])], 1)
    ref_c = tv_roi_align(image, roi, (28, 28), 1.0, sampling_ratio=2, aligned=False)
    np.testing.assert_allclose(out["mask_colors"][i][:len(pos)],
                               ref_c.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    assert not out["mask_targets"][i][len(pos):].any()
    assert not out["mask_colors"][i][len(pos):].any()


@pytest.mark.slow  # compiling the full train step takes ~25 s on two CPU cores
def test_box_supervision_trains_through_make_train_step(variables):
  """Boxes only, end to end through the library's train step: the loss goes down."""
  model = _model(mask_supervision="boxes", box_batch_size_per_image=64)
  state = jaxseg.train.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                         batch_stats=variables["batch_stats"],
                                         tx=optax.adam(1e-3))
  loss_fn = functools.partial(jaxseg.losses.maskrcnn_loss, mask_loss="boxinst", warmup_steps=0)
  step = jaxseg.train.make_train_step(loss_fn, donate=False)
  batch = _box_batch()
  values = []
  for _ in range(4):
    state, metrics = step(state, batch, jax.random.key(0))
    values.append(float(jax.device_get(metrics["loss"])))
  assert np.isfinite(values).all() and values[-1] < values[0], values


@pytest.mark.parametrize("positives,cap", [((40, 7), 64), ((0, 0), 32)])
def test_mask_branch_on_positive_buckets_equals_the_full_branch(model, variables, positives,
                                                                cap):
  """Only the leading slots holding the positives are computed (P/4, P/2 or P of them); every
  valid slot's logits equal the full branch's, and the gradient through them too."""
  p = int(model.box_batch_size_per_image * model.box_positive_fraction)
  assert p == 128
  rng = np.random.RandomState(sum(positives))
  y0 = rng.uniform(0, H / 2, (N, p, 1))
  x0 = rng.uniform(0, W / 2, (N, p, 1))
  boxes = jnp.asarray(np.concatenate([y0, x0, y0 + rng.uniform(4, H / 2, (N, p, 1)),
                                      x0 + rng.uniform(4, W / 2, (N, p, 1))], -1), jnp.float32)
  valid = jnp.asarray(np.arange(p)[None, :] < np.asarray(positives)[:, None])

  def run(v, x, boxes, which):
    def fn(m, x, boxes):
      fpn = m.backbone(x, train=False)
      if which == "full":
        return m._mask_branch(fpn, boxes, (H, W))
      return m._positive_mask_branch(fpn, boxes, valid, (H, W))
    return model.apply(v, x, boxes, method=fn)

  x = _images()
  full = run(variables, x, boxes, "full")
  ours = run(variables, x, boxes, "ours")
  mask = np.asarray(valid)[:, :, None, None, None]
  np.testing.assert_allclose(np.asarray(ours) * mask, np.asarray(full) * mask, rtol=1e-5,
                             atol=1e-5)
  assert not np.asarray(ours)[:, cap:].any()  # slots past the bucket were not computed

  def loss(v, which):
    return jnp.sum(jnp.where(mask, run(v, x, boxes, which), 0.0) ** 2)

  g_full = jax.grad(loss)(variables, "full")["params"]["mask_predictor"]
  g_ours = jax.grad(loss)(variables, "ours")["params"]["mask_predictor"]
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
