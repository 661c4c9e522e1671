"""Mask R-CNN parity with torchvision: converted weights give the same network.

The torch twin is a torchvision ``MaskRCNN`` around a ResNet-18 ``BackboneWithFPN`` with small
FPN/box/mask widths (and, marked slow, torchvision's real ResNet-50 sizes), its
FrozenBatchNorm statistics set to random non-trivial values and built with
``min_size``/``max_size`` equal to the canvas so that its transform does not resize. Forward
hooks capture its FPN outputs, RPN head outputs, proposals, ``box_roi_pool`` features and box
predictions, which are compared with the JAX model's sown intermediates; the box and mask
heads are compared on the same given boxes (``predict_for_boxes``); the final detections and
pasted masks are compared with ``box_score_thresh=0``; the five training losses are compared
with both sides sampling anchors and RoIs by the same deterministic rule (the first positives
and negatives in index order, torchvision's counts). Boxes: torch xyxy, JAX (y0, x0, y1, x1);
box deltas: torch (dx, dy, dw, dh), JAX (dy, dx, dh, dw).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg
from jaxseg.convert import maskrcnn_from_torch, maskrcnn_state_dict
from jaxseg.losses import maskrcnn_loss_terms

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import MaskRCNN as TorchMaskRCNN  # noqa: E402
from torchvision.models.detection._utils import overwrite_eps  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.backbone_utils import (BackboneWithFPN,  # noqa: E402
                                                         resnet_fpn_backbone)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

TOL = 1e-4
C = 4  # classes, background included
SIZES = ((8,), (16,), (32,), (64,), (128,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
# (dx, dy, dw, dh) <-> (dy, dx, dh, dw) and xyxy <-> (y0, x0, y1, x1): the same swap.
SWAP = [1, 0, 3, 2]
TINY_FIELDS = dict(backbone="resnet18", width_multiplier=1.0, fpn_channels=32,
                   representation_size=64, mask_head_channels=16, anchor_sizes=SIZES,
                   aspect_ratios=RATIOS)


# ----------------------------------------------------------------------------------------------
# Deterministic samplers: the first positives and negatives in index order, with torchvision's
# BalancedPositiveNegativeSampler counts.
# ----------------------------------------------------------------------------------------------

def first_k_sampler(labels, key, num_samples, positive_fraction):
  """The JAX model's ``sampler`` field."""
  del key
  is_pos, is_neg = labels >= 1, labels == 0
  num_pos = jnp.minimum(jnp.sum(is_pos), int(num_samples * positive_fraction))
  num_neg = jnp.minimum(jnp.sum(is_neg), num_samples - num_pos)
  return (is_pos & (jnp.cumsum(is_pos) <= num_pos), is_neg & (jnp.cumsum(is_neg) <= num_neg))


class TorchFirstKSampler:
  """Replaces ``fg_bg_sampler``; also records what it was given and chose."""

  def __init__(self, batch_size_per_image, positive_fraction):
    self.batch_size_per_image = batch_size_per_image
    self.positive_fraction = positive_fraction
    self.labels, self.pos, self.neg = [], [], []

  def __call__(self, matched_idxs):
    pos_masks, neg_masks = [], []
    for labels in matched_idxs:
      is_pos, is_neg = labels >= 1, labels == 0
      num_pos = min(int(is_pos.sum()), int(self.batch_size_per_image * self.positive_fraction))
      num_neg = min(int(is_neg.sum()), self.batch_size_per_image - num_pos)
      pos_masks.append((is_pos & (torch.cumsum(is_pos, 0) <= num_pos)).to(torch.uint8))
      neg_masks.append((is_neg & (torch.cumsum(is_neg, 0) <= num_neg)).to(torch.uint8))
    self.labels.append([t.clone() for t in matched_idxs])
    self.pos.append(pos_masks)
    self.neg.append(neg_masks)
    return pos_masks, neg_masks


# ----------------------------------------------------------------------------------------------
# torch models and inputs
# ----------------------------------------------------------------------------------------------

def _randomise(model, seed):
  """Non-trivial FrozenBatchNorm statistics, and RPN weights that spread the objectness out
  (torchvision's N(0, 0.01) init gives near-tied scores everywhere) without saturating its
  float32 sigmoid (which ties the proposal scores)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, FrozenBatchNorm2d):
        c = m.weight.shape[0]
        m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    head = model.rpn.head
    for layer, std in ((head.conv[0][0], 0.05), (head.cls_logits, 0.1), (head.bbox_pred, 0.05)):
      layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * std)
      layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * std)
  return model


def _torch_kwargs(h, w):
  return dict(min_size=min(h, w), max_size=max(h, w), box_score_thresh=0.0,
              rpn_anchor_generator=AnchorGenerator(SIZES, RATIOS))


def tiny_torch_model(h, w, seed=0):
  torch.manual_seed(seed)
  body = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
  backbone = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                             [64, 128, 256, 512], 32)
  model = TorchMaskRCNN(backbone, num_classes=None, box_head=TwoMLPHead(32 * 7 * 7, 64),
                        box_predictor=FastRCNNPredictor(64, C),
                        mask_head=MaskRCNNHeads(32, (16, 16, 16, 16), 1),
                        mask_predictor=MaskRCNNPredictor(16, 16, C), **_torch_kwargs(h, w))
  return _randomise(model, seed).eval()


def resnet50_torch_model(h, w, seed=0):
  torch.manual_seed(seed)
  backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                 norm_layer=FrozenBatchNorm2d, trainable_layers=5)
  model = TorchMaskRCNN(backbone, num_classes=C, **_torch_kwargs(h, w))
  model = _randomise(model, seed)
  overwrite_eps(model, 0.0)  # as maskrcnn_resnet50_fpn(weights=COCO_V1)
  return model.eval()


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def make_inputs(n, h, w, seed=0, instances=(3, 2)):
  """Images with painted elliptic instances, and the batch (inclusive pixel boxes) + torch
  targets (xyxy continuous boxes) describing them."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0.0, 0.3, (n, h, w, 3)).astype(np.float32)
  m = max(instances) + 1  # one padding slot at least
  boxes = np.zeros((n, m, 4), np.float32)
  classes = np.full((n, m), -1, np.int32)
  masks = np.zeros((n, m, h, w), np.uint8)
  yy, xx = np.mgrid[:h, :w]
  targets = []
  for i in range(n):
    t_boxes, t_labels = [], []
    for j in range(instances[i]):
      bh, bw = rng.integers(12, h // 2), rng.integers(12, w // 2)
      y0, x0 = rng.integers(0, h - bh), rng.integers(0, w - bw)
      cy, cx = y0 + (bh - 1) / 2, x0 + (bw - 1) / 2
      inside = ((yy - cy) / (bh / 2)) ** 2 + ((xx - cx) / (bw / 2)) ** 2 <= 1
      masks[i, j] = inside
      ys, xs = np.nonzero(inside)
      boxes[i, j] = [ys.min(), xs.min(), ys.max(), xs.max()]
      classes[i, j] = rng.integers(1, C)
      images[i][inside] = rng.uniform(0.3, 1.0, 3)
      t_boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
      t_labels.append(classes[i, j])
    targets.append({"boxes": torch.tensor(t_boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor(t_labels, dtype=torch.int64),
                    "masks": torch.from_numpy(masks[i, :instances[i]].copy())})
  batch = {"image": images, "boxes": boxes, "box_classes": classes, "instance_masks": masks}
  return batch, targets


def _torch_images(images):
  return [torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))) for x in images]


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _sown(inter, name):
  return inter[name][0]


# ----------------------------------------------------------------------------------------------
# Running both sides
# ----------------------------------------------------------------------------------------------

def torch_eval(tmodel, images):
  """Detections and the hooked intermediates, converted to the JAX layout."""
  store = {}

  def keep(name):
    return lambda module, args, out: store.__setitem__(name, out)

  roi = tmodel.roi_heads
  filter_proposals = tmodel.rpn.filter_proposals

  def keep_scores(*args, **kwargs):
    store["rpn"] = result = filter_proposals(*args, **kwargs)
    return result

  tmodel.rpn.filter_proposals = keep_scores
  hooks = [tmodel.backbone.register_forward_hook(keep("fpn")),
           tmodel.rpn.head.register_forward_hook(keep("rpn_head")),
           roi.box_roi_pool.register_forward_hook(keep("box_roi")),
           roi.box_predictor.register_forward_hook(keep("box_pred"))]
  try:
    with torch.no_grad():
      dets = tmodel(_torch_images(images))
  finally:
    del tmodel.rpn.filter_proposals
    for h in hooks:
      h.remove()
  n = len(images)
  objectness, deltas = store["rpn_head"]
  counts = [len(p) for p in store["rpn"][0]]
  splits = np.cumsum(counts)[:-1]
  class_logits, box_regression = (t.numpy() for t in store["box_pred"])
  out = {
      "fpn": [_nhwc(store["fpn"][k]) for k in ("0", "1", "2", "3", "pool")],
      "rpn_logits": np.concatenate([_nhwc(o).reshape(n, -1) for o in objectness], 1),
      "rpn_deltas": np.concatenate(
          [d.view(n, -1, 4, *d.shape[2:]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4).numpy()
           for d in deltas], 1)[..., SWAP],
      "proposals": [p.numpy()[:, SWAP] for p in store["rpn"][0]],
      "proposal_scores": [s.numpy() for s in store["rpn"][1]],
      "box_roi_features": np.split(_nhwc(store["box_roi"]), splits),
      "class_logits": np.split(class_logits, splits),
      "box_deltas": np.split(box_regression.reshape(len(class_logits), -1, 4)[..., SWAP], splits),
      "detections": [{"boxes": d["boxes"].numpy()[:, SWAP], "scores": d["scores"].numpy(),
                      "classes": d["labels"].numpy(), "masks": d["masks"].numpy()[:, 0]}
                     for d in dets],
  }
  return out


def torch_predict_for_boxes(tmodel, images, boxes_yxyx):
  roi = tmodel.roi_heads
  with torch.no_grad():
    image_list, _ = tmodel.transform(_torch_images(images))
    feats = tmodel.backbone(image_list.tensors)
    boxes = [torch.from_numpy(np.ascontiguousarray(b[:, SWAP])) for b in boxes_yxyx]
    box_feats = roi.box_head(roi.box_roi_pool(feats, boxes, image_list.image_sizes))
    class_logits, box_regression = roi.box_predictor(box_feats)
    mask_logits = roi.mask_predictor(roi.mask_head(
        roi.mask_roi_pool(feats, boxes, image_list.image_sizes)))
  n, k = boxes_yxyx.shape[:2]
  return {"class_logits": class_logits.numpy().reshape(n, k, -1),
          "box_deltas": box_regression.numpy().reshape(n, k, -1, 4)[..., SWAP],
          "mask_logits": mask_logits.numpy().reshape(n, k, -1, 28, 28).transpose(0, 1, 3, 4, 2)}


def torch_train_losses(tmodel, images, targets):
  rpn_sampler = TorchFirstKSampler(tmodel.rpn.fg_bg_sampler.batch_size_per_image,
                                   tmodel.rpn.fg_bg_sampler.positive_fraction)
  roi_sampler = TorchFirstKSampler(tmodel.roi_heads.fg_bg_sampler.batch_size_per_image,
                                   tmodel.roi_heads.fg_bg_sampler.positive_fraction)
  original = tmodel.rpn.fg_bg_sampler, tmodel.roi_heads.fg_bg_sampler
  tmodel.rpn.fg_bg_sampler, tmodel.roi_heads.fg_bg_sampler = rpn_sampler, roi_sampler
  tmodel.train()
  try:
    with torch.no_grad():
      losses = tmodel(_torch_images(images), targets)
  finally:
    tmodel.eval()
    tmodel.rpn.fg_bg_sampler, tmodel.roi_heads.fg_bg_sampler = original
  return {k: float(v) for k, v in losses.items()}, rpn_sampler, roi_sampler


def random_boxes(n, k, h, w, seed=0):
  """RoIs of all sizes, some reaching past the canvas (FPN levels 4-5, zero padding)."""
  rng = np.random.default_rng(seed)
  side = np.exp(rng.uniform(np.log(2.0), np.log(600.0), (n, k, 2)))
  cy, cx = rng.uniform(0, h, (n, k)), rng.uniform(0, w, (n, k))
  return np.stack([cy - side[..., 0] / 2, cx - side[..., 1] / 2, cy + side[..., 0] / 2,
                   cx + side[..., 1] / 2], -1).astype(np.float32)


class Pair:
  """A torch model, its JAX twin with converted weights, and jitted JAX entry points."""

  def __init__(self, tmodel, fields, h, w):
    self.tmodel, self.h, self.w = tmodel, h, w
    self.model = jaxseg.models.build("maskrcnn", num_classes=C, box_score_thresh=0.0,
                                     sampler=first_k_sampler, **fields)
    self.variables = maskrcnn_from_torch(self.model, _state_dict(tmodel))
    model = self.model
    self.eval = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))
    self.for_boxes = jax.jit(lambda v, x, b: model.apply(v, x, b, method="predict_for_boxes"))
    self.train = jax.jit(lambda v, x, t: model.apply(
        v, x, train=True, targets=t, rngs={"sampling": jax.random.key(0)},
        mutable=["intermediates"]))


# ----------------------------------------------------------------------------------------------
# Checks shared by the tiny and the ResNet-50 models
# ----------------------------------------------------------------------------------------------

def align_ties(got, want, scores):
  """Indices into ``want`` that line it up with ``got`` where torchvision's order is arbitrary.

  Both sides sort by score; among exactly equal float32 scores (a saturated sigmoid, equal
  softmax outputs) torchvision's sort leaves the order unspecified, so within each run of
  equal ``scores`` every ``got`` row takes the closest unused ``want`` row.
  """
  order = np.arange(len(want))
  runs = np.split(order, np.flatnonzero(np.diff(scores) != 0) + 1)
  for run in runs:
    if len(run) > 1:
      free = list(run)
      for p in run:
        q = min(free, key=lambda j: np.abs(got[p] - want[j]).max())
        order[p] = q
        free.remove(q)
  return order


def check_intermediates(pair, images):
  ref = torch_eval(pair.tmodel, images)
  out, state = pair.eval(pair.variables, images)
  inter = state["intermediates"]
  fpn = _sown(inter, "fpn")
  assert len(fpn) == 5
  for level, (a, b) in enumerate(zip(fpn, ref["fpn"])):
    assert _rel(a, b) <= TOL, f"FPN level {level}"
  assert _rel(_sown(inter, "rpn_logits"), ref["rpn_logits"]) <= TOL
  assert _rel(_sown(inter, "rpn_deltas"), ref["rpn_deltas"]) <= TOL

  proposals = np.asarray(_sown(inter, "proposals"))
  valid = np.asarray(_sown(inter, "proposal_valid"))
  feats = np.asarray(_sown(inter, "box_roi_features"))
  logits = np.asarray(_sown(inter, "class_logits"))
  deltas = np.asarray(_sown(inter, "box_deltas"))
  for i in range(len(images)):
    count = int(valid[i].sum())
    assert count == len(ref["proposals"][i]), \
        f"image {i}: {count} proposals, torchvision {len(ref['proposals'][i])}"
    assert valid[i, :count].all() and not proposals[i, count:].any()
    order = align_ties(proposals[i, :count], ref["proposals"][i], ref["proposal_scores"][i])
    assert _rel(proposals[i, :count], ref["proposals"][i][order]) <= TOL
    assert _rel(feats[i, :count], ref["box_roi_features"][i][order]) <= TOL
    assert _rel(logits[i, :count], ref["class_logits"][i][order]) <= TOL
    assert _rel(deltas[i, :count], ref["box_deltas"][i][order]) <= TOL

  for i, want in enumerate(ref["detections"]):
    k = len(want["scores"])
    assert k > 0
    got_valid = np.asarray(out["valid"][i])
    assert int(got_valid.sum()) == k and got_valid[:k].all()
    assert _rel(out["scores"][i, :k], want["scores"]) <= TOL
    order = align_ties(np.asarray(out["boxes"][i, :k]), want["boxes"], want["scores"])
    np.testing.assert_array_equal(out["classes"][i, :k], want["classes"][order])
    assert _rel(out["boxes"][i, :k], want["boxes"][order]) <= TOL
    masks = np.asarray(out["masks"][i, :k])
    # Pasting truncates box corners to integers: a corner within float noise of an integer
    # may land one pixel apart; elsewhere the masks agree.
    close = np.abs(masks - want["masks"][order]) <= 1e-4
    assert close.mean() > 0.999, f"image {i}: {1 - close.mean():.2%} mask pixels differ"
    assert not np.asarray(out["masks"][i, k:]).any()
    assert not np.asarray(out["boxes"][i, k:]).any()


def check_given_boxes(pair, images, k=12):
  boxes = random_boxes(len(images), k, pair.h, pair.w)
  ref = torch_predict_for_boxes(pair.tmodel, images, boxes)
  got = pair.for_boxes(pair.variables, images, boxes)
  for name in ("class_logits", "box_deltas", "mask_logits"):
    assert got[name].shape == ref[name].shape, name
    assert _rel(got[name], ref[name]) <= TOL, name


def check_training_losses(pair, batch, targets):
  ref, rpn_sampler, roi_sampler = torch_train_losses(pair.tmodel, batch["image"], targets)
  out, state = pair.train(pair.variables, batch["image"],
                          {k: batch[k] for k in ("boxes", "box_classes", "instance_masks")})
  # The same sampled anchors: label 1/0 on the sampled positives/negatives.
  for i in range(len(targets)):
    want = np.full(out["rpn_labels"].shape[1], -1)
    want[rpn_sampler.neg[0][i].numpy().astype(bool)] = 0
    want[rpn_sampler.pos[0][i].numpy().astype(bool)] = 1
    np.testing.assert_array_equal(out["rpn_labels"][i], want)
    # The same sampled RoIs (torchvision keeps them in candidate order).
    sampled = (roi_sampler.pos[0][i] | roi_sampler.neg[0][i]).numpy().astype(bool)
    want_labels = roi_sampler.labels[0][i].numpy()[sampled]
    s = len(want_labels)
    assert int(np.sum(out["roi_valid"][i])) == s
    np.testing.assert_array_equal(out["roi_labels"][i, :s], want_labels)
  terms = {k: float(v) for k, v in maskrcnn_loss_terms(out).items()}
  assert set(terms) == set(ref)
  for name, value in ref.items():
    assert terms[name] == pytest.approx(value, rel=TOL, abs=1e-6), (name, terms, ref)
  assert min(ref.values()) > 0


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

TINY_H, TINY_W = 96, 128


@pytest.fixture(scope="module")
def tiny():
  return Pair(tiny_torch_model(TINY_H, TINY_W), TINY_FIELDS, TINY_H, TINY_W)


@pytest.fixture(scope="module")
def tiny_inputs():
  return make_inputs(2, TINY_H, TINY_W, seed=0)


def test_tiny_intermediates_and_detections_match_torchvision(tiny, tiny_inputs):
  check_intermediates(tiny, tiny_inputs[0]["image"])


def test_tiny_heads_on_given_boxes_match_torchvision(tiny, tiny_inputs):
  check_given_boxes(tiny, tiny_inputs[0]["image"])


def test_tiny_training_losses_match_torchvision(tiny, tiny_inputs):
  check_training_losses(tiny, *tiny_inputs)
  # Same shapes, no recompilation: one image without any instance (all anchors and RoIs
  # background; torchvision's empty-target path), gt slots filled differently.
  check_training_losses(tiny, *make_inputs(2, TINY_H, TINY_W, seed=3, instances=(0, 3)))


@pytest.mark.slow
def test_resnet50_at_torchvision_sizes_matches():
  """fpn 256, representation 1024, mask head 256, frozen BN eps 0 (the COCO_V1 setting)."""
  h = w = 128
  pair = Pair(resnet50_torch_model(h, w), dict(backbone="resnet50", frozen_bn_eps=0.0,
                                                anchor_sizes=SIZES, aspect_ratios=RATIOS), h, w)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pair.variables)) == sum(
      v.numel() for k, v in pair.tmodel.state_dict().items() if "num_batches" not in k)
  batch, targets = make_inputs(1, h, w, seed=1, instances=(3,))
  check_intermediates(pair, batch["image"])
  check_given_boxes(pair, batch["image"], k=6)
  check_training_losses(pair, batch, targets)


# ----------------------------------------------------------------------------------------------
# The converter on its own
# ----------------------------------------------------------------------------------------------

def _old_names(sd):
  """torchvision < 0.13 names (the legacy COCO checkpoints)."""
  out = {}
  for key, value in sd.items():
    key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
    parts = key.split(".")
    if key.startswith(("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.")):
      key = ".".join(parts[:4] + parts[5:])
    elif key.startswith("roi_heads.mask_head."):
      key = ".".join(parts[:2] + [f"mask_fcn{int(parts[2]) + 1}"] + parts[4:])
    out[key] = value
  return out


@pytest.fixture(scope="module")
def tiny_sd(tiny):
  return _state_dict(tiny.tmodel)


def test_state_dict_accepts_old_and_new_torchvision_names(tiny_sd):
  new = maskrcnn_state_dict(tiny_sd, backbone="resnet18")
  old_sd = _old_names(tiny_sd)
  assert "rpn.head.conv.weight" in old_sd and "roi_heads.mask_head.mask_fcn4.bias" in old_sd
  assert "backbone.fpn.inner_blocks.3.weight" in old_sd
  old = maskrcnn_state_dict(old_sd, backbone="resnet18")
  assert sorted(old) == sorted(new)
  for key in new:
    np.testing.assert_array_equal(old[key], new[key])
  assert {"backbone.fpn.inner_0.weight", "backbone.fpn.layer_3.bias", "rpn.conv.weight",
          "mask_head.mask_fcn1.weight", "mask_predictor.conv5_mask.weight",
          "box_predictor.bbox_pred.weight", "backbone.body.layer4.1.bn2.running_var"} <= set(new)
  with pytest.raises(ValueError, match="both map to rpn.conv.weight"):
    maskrcnn_state_dict({**tiny_sd, "rpn.head.conv.weight": tiny_sd["rpn.head.conv.0.0.weight"]},
                        backbone="resnet18")


def test_state_dict_permutes_fc6_and_box_deltas_as_the_layouts_require(tiny_sd):
  """torch's modules applied to torch-layout inputs equal the renamed weights applied to the
  JAX layouts: fc6 on an NHWC flatten, bbox_pred rows in (dy, dx, dh, dw) order."""
  sd = maskrcnn_state_dict(tiny_sd, backbone="resnet18")
  rng = np.random.default_rng(0)
  fc6 = torch.nn.Linear(32 * 49, 64)
  fc6.load_state_dict({"weight": torch.from_numpy(tiny_sd["roi_heads.box_head.fc6.weight"]),
                       "bias": torch.from_numpy(tiny_sd["roi_heads.box_head.fc6.bias"])})
  x = rng.normal(size=(3, 32, 7, 7)).astype(np.float32)
  want = fc6(torch.from_numpy(x).flatten(1)).detach().numpy()
  got = x.transpose(0, 2, 3, 1).reshape(3, -1) @ sd["box_head.fc6.weight"].T
  np.testing.assert_allclose(got + sd["box_head.fc6.bias"], want, rtol=1e-5, atol=1e-5)

  feats = rng.normal(size=(64,)).astype(np.float32)
  w, b = tiny_sd["roi_heads.box_predictor.bbox_pred.weight"], \
      tiny_sd["roi_heads.box_predictor.bbox_pred.bias"]
  want = (w @ feats + b).reshape(C, 4)[:, SWAP]
  got = (sd["box_predictor.bbox_pred.weight"] @ feats + sd["box_predictor.bbox_pred.bias"])
  np.testing.assert_allclose(got.reshape(C, 4), want, rtol=1e-6)
  w, b = tiny_sd["rpn.head.bbox_pred.weight"][:, :, 0, 0], tiny_sd["rpn.head.bbox_pred.bias"]
  feats = rng.normal(size=(32,)).astype(np.float32)
  want = (w @ feats + b).reshape(3, 4)[:, SWAP]
  got = sd["rpn.bbox_pred.weight"][:, :, 0, 0] @ feats + sd["rpn.bbox_pred.bias"]
  np.testing.assert_allclose(got.reshape(3, 4), want, rtol=1e-6)


def test_converter_errors(tiny_sd):
  with pytest.raises(ValueError, match="backbone.body is resnet18 .* not resnet34"):
    maskrcnn_state_dict(tiny_sd, backbone="resnet34")
  with pytest.raises(ValueError, match="backbone must be one of resnet18, resnet34"):
    maskrcnn_state_dict(tiny_sd, backbone="vgg16")
  with pytest.raises(TypeError, match="state_dict must be a mapping"):
    maskrcnn_state_dict(list(tiny_sd.items()), backbone="resnet18")
  with pytest.raises(TypeError, match="must be a jaxseg MaskRCNN"):
    maskrcnn_from_torch(jaxseg.models.build("unet", num_classes=2), tiny_sd)
  # Another number of classes: from_torch_state_dict lists the mis-shaped heads.
  model = jaxseg.models.build("maskrcnn", num_classes=C + 1, **TINY_FIELDS)
  with pytest.raises(ValueError, match="mis-shaped.*box_predictor.cls_score"):
    maskrcnn_from_torch(model, tiny_sd)
  bad = dict(tiny_sd)
  bad["roi_heads.box_head.fc6.weight"] = bad["roi_heads.box_head.fc6.weight"][:, :-3]
  with pytest.raises(ValueError, match="fc6.weight must be"):
    maskrcnn_state_dict(bad, backbone="resnet18")
