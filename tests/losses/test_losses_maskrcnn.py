"""``maskrcnn_loss`` against torchvision's own Mask R-CNN loss functions.

The references are ``RegionProposalNetwork.compute_loss``, ``roi_heads.fastrcnn_loss`` and
``roi_heads.maskrcnn_loss`` (whose mask targets come from torchvision's
``project_masks_on_boxes``) on random inputs: values and gradients (torch autograd) agree,
padded/unsampled entries get no gradient, and the pmap-sharded normalisation equals jit.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxseg.losses as losses
from jaxseg.losses import _common
from jaxseg.losses.maskrcnn import TERMS, maskrcnn_loss, maskrcnn_loss_terms

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
from torchvision.models.detection import roi_heads as tv_roi_heads  # noqa: E402
from torchvision.models.detection.rpn import RegionProposalNetwork  # noqa: E402

C = 5  # classes, background included
M = 28


class _MaskSampler:
  """torchvision's fg_bg_sampler interface returning fixed per-image masks."""

  def __init__(self, pos, neg):
    self.pos, self.neg = pos, neg

  def __call__(self, labels):
    del labels
    return ([torch.from_numpy(p.astype(np.uint8)) for p in self.pos],
            [torch.from_numpy(n.astype(np.uint8)) for n in self.neg])


def _rpn_case(rng, n=2, a=60):
  full = rng.choice([1.0, 0.0, -1.0], size=(n, a), p=[0.2, 0.6, 0.2]).astype(np.float32)
  # A sampled subset of the fg/bg anchors (what torchvision's sampler would pick).
  chosen = rng.uniform(size=(n, a)) < 0.6
  pos, neg = (full == 1) & chosen, (full == 0) & chosen
  labels = np.where(pos, 1, np.where(neg, 0, -1)).astype(np.int32)
  logits = rng.normal(0, 2, (n, a)).astype(np.float32)
  deltas = rng.normal(0, 0.3, (n, a, 4)).astype(np.float32)
  targets = rng.normal(0, 0.3, (n, a, 4)).astype(np.float32)
  targets[labels < 1] = np.nan  # what a padded gt could leave; must not leak
  return dict(rpn_logits=logits, rpn_deltas=deltas, rpn_labels=labels,
              rpn_targets=targets), full, pos, neg


def _roi_case(rng, n=2, s=12, counts=(12, 7)):
  valid = np.zeros((n, s), bool)
  for i, k in enumerate(counts):
    valid[i, :k] = True
  labels = np.where(rng.uniform(size=(n, s)) < 0.4, rng.integers(1, C, (n, s)), 0)
  labels = np.where(valid, labels, 0).astype(np.int32)
  logits = rng.normal(0, 2, (n, s, C)).astype(np.float32)
  all_deltas = rng.normal(0, 0.3, (n, s, C, 4)).astype(np.float32)
  targets = rng.normal(0, 0.3, (n, s, 4)).astype(np.float32)
  logits[~valid] = 1e4  # padding: garbage that must not count
  targets[~valid] = np.inf
  return dict(class_logits=logits, box_deltas=all_deltas, roi_labels=labels, roi_valid=valid,
              roi_targets=targets)


def _mask_case(rng, n=2, p=4, counts=(3, 1), h=24, w=20, g=3):
  gt_masks = (rng.uniform(size=(n, g, h, w)) < 0.5).astype(np.uint8)
  gt_labels = rng.integers(1, C, (n, g))
  matched = rng.integers(0, g, (n, p))
  y0, x0 = rng.uniform(0, h / 2, (n, p)), rng.uniform(0, w / 2, (n, p))
  boxes_xyxy = np.stack([x0, y0, x0 + rng.uniform(2, w / 2, (n, p)),
                         y0 + rng.uniform(2, h / 2, (n, p))], -1).astype(np.float32)
  logits_all = rng.normal(0, 2, (n, p, C, M, M)).astype(np.float32)
  valid = np.zeros((n, p), bool)
  for i, k in enumerate(counts):
    valid[i, :k] = True
  return gt_masks, gt_labels, matched, boxes_xyxy, logits_all, valid


def _torch_mask_loss(case, requires_grad=False):
  gt_masks, gt_labels, matched, boxes, logits_all, valid = case
  t_logits = torch.tensor(logits_all, requires_grad=requires_grad)
  sel = [np.flatnonzero(v) for v in valid]
  flat = torch.cat([t_logits[i, s] for i, s in enumerate(sel)])
  loss = tv_roi_heads.maskrcnn_loss(
      flat, [torch.from_numpy(boxes[i, s]) for i, s in enumerate(sel)],
      [torch.from_numpy(m) for m in gt_masks], [torch.from_numpy(lab) for lab in gt_labels],
      [torch.from_numpy(matched[i, s]) for i, s in enumerate(sel)])
  return loss, t_logits


def _mask_outputs(case):
  """Our layout: the gt-class channel and torchvision's targets, padded to [N, P, M, M]."""
  gt_masks, gt_labels, matched, boxes, logits_all, valid = case
  n, p = valid.shape
  cls = np.take_along_axis(gt_labels, matched, 1)
  logits = np.take_along_axis(logits_all, cls[:, :, None, None, None], 2)[:, :, 0]
  targets = np.full((n, p, M, M), np.nan, np.float32)
  for i in range(n):
    t = tv_roi_heads.project_masks_on_boxes(torch.from_numpy(gt_masks[i]),
                                            torch.from_numpy(boxes[i]),
                                            torch.from_numpy(matched[i]), M)
    targets[i] = t.numpy()
  targets[~valid] = np.nan  # padding
  logits[~valid] = 50.0
  return dict(mask_logits=logits, mask_targets=targets, mask_valid=valid)


def _outputs(seed=0):
  rng = np.random.default_rng(seed)
  rpn, _, _, _ = _rpn_case(rng)
  roi = _roi_case(rng)
  mask = _mask_outputs(_mask_case(rng))
  return {**rpn, **roi, **mask}


def _full(part):
  """``part`` completed with the other outputs of a 2-image batch (terms are independent)."""
  return {**_outputs(9), **part}


def test_rpn_terms_match_region_proposal_network_compute_loss():
  rng = np.random.default_rng(0)
  out, full, pos, neg = _rpn_case(rng)
  out = _full(out)
  n, a = full.shape
  t_logits = torch.tensor(out["rpn_logits"].reshape(-1, 1), requires_grad=True)
  t_deltas = torch.tensor(out["rpn_deltas"].reshape(-1, 4), requires_grad=True)
  targets = np.nan_to_num(out["rpn_targets"], nan=0.0)
  fake_rpn = types.SimpleNamespace(fg_bg_sampler=_MaskSampler(pos, neg))
  t_obj, t_box = RegionProposalNetwork.compute_loss(
      fake_rpn, t_logits, t_deltas, [torch.from_numpy(f) for f in full],
      [torch.from_numpy(t) for t in targets])
  (t_obj + 3.0 * t_box).backward()

  def f(logits, deltas):
    terms = maskrcnn_loss_terms(dict(out, rpn_logits=logits, rpn_deltas=deltas))
    return terms["loss_objectness"] + 3.0 * terms["loss_rpn_box_reg"], terms

  (_, terms), (g_logits, g_deltas) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(
      out["rpn_logits"], out["rpn_deltas"])
  assert float(terms["loss_objectness"]) == pytest.approx(t_obj.item(), rel=1e-5)
  assert float(terms["loss_rpn_box_reg"]) == pytest.approx(t_box.item(), rel=1e-5)
  np.testing.assert_allclose(g_logits, t_logits.grad.numpy().reshape(n, a), rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(g_deltas, t_deltas.grad.numpy().reshape(n, a, 4), rtol=1e-4,
                             atol=1e-7)
  assert np.all(np.asarray(g_logits)[out["rpn_labels"] < 0] == 0)
  assert np.all(np.isfinite(np.asarray(g_deltas)))


@pytest.mark.parametrize("class_specific", [True, False], ids=["deltas_NSC4", "deltas_NS4"])
def test_roi_terms_match_fastrcnn_loss(class_specific):
  rng = np.random.default_rng(1)
  out = _full(_roi_case(rng))
  valid, labels = out["roi_valid"], out["roi_labels"]
  sel = [np.flatnonzero(v) for v in valid]
  t_logits = torch.tensor(out["class_logits"], requires_grad=True)
  t_deltas = torch.tensor(out["box_deltas"], requires_grad=True)
  t_cls, t_box = tv_roi_heads.fastrcnn_loss(
      torch.cat([t_logits[i, s] for i, s in enumerate(sel)]),
      torch.cat([t_deltas[i, s].reshape(len(s), C * 4) for i, s in enumerate(sel)]),
      [torch.from_numpy(labels[i, s]).long() for i, s in enumerate(sel)],
      [torch.from_numpy(out["roi_targets"][i, s]) for i, s in enumerate(sel)])
  (t_cls + 2.0 * t_box).backward()

  deltas = out["box_deltas"]
  if not class_specific:  # the model's training layout: the gt class's deltas
    deltas = np.take_along_axis(deltas, labels[:, :, None, None], 2)[:, :, 0]

  def f(logits, deltas):
    terms = maskrcnn_loss_terms(dict(out, class_logits=logits, box_deltas=deltas))
    return terms["loss_classifier"] + 2.0 * terms["loss_box_reg"], terms

  (_, terms), (g_logits, g_deltas) = jax.value_and_grad(f, (0, 1), has_aux=True)(
      out["class_logits"], deltas)
  assert float(terms["loss_classifier"]) == pytest.approx(t_cls.item(), rel=1e-5)
  assert float(terms["loss_box_reg"]) == pytest.approx(t_box.item(), rel=1e-5)
  np.testing.assert_allclose(g_logits, t_logits.grad.numpy(), rtol=1e-4, atol=1e-7)
  want = t_deltas.grad.numpy()
  if not class_specific:
    want = np.take_along_axis(want, labels[:, :, None, None], 2)[:, :, 0]
  np.testing.assert_allclose(g_deltas, want, rtol=1e-4, atol=1e-7)
  assert np.all(np.asarray(g_logits)[~valid] == 0)


def test_mask_term_matches_maskrcnn_loss_with_torchvision_targets():
  rng = np.random.default_rng(2)
  case = _mask_case(rng)
  t_loss, t_logits = _torch_mask_loss(case, requires_grad=True)
  t_loss.backward()
  out = _full(_mask_outputs(case))
  # Soft targets (torchvision does not threshold the RoIAlign of the binary gt masks).
  valid_targets = out["mask_targets"][out["mask_valid"]]
  assert np.any((valid_targets > 0.01) & (valid_targets < 0.99))

  def f(logits):
    return maskrcnn_loss_terms(dict(out, mask_logits=logits))["loss_mask"]

  value, grad = jax.jit(jax.value_and_grad(f))(out["mask_logits"])
  assert float(value) == pytest.approx(t_loss.item(), rel=1e-5)
  gt_labels, matched = case[1], case[2]
  cls = np.take_along_axis(gt_labels, matched, 1)
  want = np.take_along_axis(t_logits.grad.numpy(), cls[:, :, None, None, None], 2)[:, :, 0]
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-9)
  assert np.all(np.asarray(grad)[~out["mask_valid"]] == 0)


def test_no_positive_roi_gives_zero_mask_loss_like_torchvision():
  rng = np.random.default_rng(3)
  case = list(_mask_case(rng, counts=(0, 0)))
  case[-1] = np.zeros_like(case[-1])
  # torchvision's empty case (no positives anywhere): logits.sum() * 0.
  t_loss = tv_roi_heads.maskrcnn_loss(
      torch.zeros((0, C, M, M)), [torch.zeros((0, 4))] * 2,
      [torch.from_numpy(m) for m in case[0]], [torch.from_numpy(lab) for lab in case[1]],
      [torch.zeros((0,), dtype=torch.long)] * 2)
  out = _full(_mask_outputs(tuple(case)))
  value, grad = jax.value_and_grad(
      lambda x: maskrcnn_loss_terms(dict(out, mask_logits=x))["loss_mask"])(out["mask_logits"])
  assert float(value) == t_loss.item() == 0.0
  assert np.all(np.asarray(grad) == 0)


def test_total_is_the_sum_of_the_terms_weights_and_registry():
  out = _outputs()
  terms = maskrcnn_loss_terms(out)
  assert set(terms) == set(TERMS)
  assert all(np.isfinite(float(v)) and float(v) > 0 for v in terms.values())
  total = float(maskrcnn_loss(out, {"image": np.zeros((2, 32, 32, 3), np.float32)}))
  assert total == pytest.approx(sum(float(v) for v in terms.values()), rel=1e-6)
  weighted = float(maskrcnn_loss(out, weights={"loss_mask": 0.0, "loss_box_reg": 2.0}))
  assert weighted == pytest.approx(
      total - float(terms["loss_mask"]) + float(terms["loss_box_reg"]), rel=1e-6)
  assert losses.get("maskrcnn_loss") is maskrcnn_loss
  assert "maskrcnn_loss" in losses.names()
  assert losses.maskrcnn_loss_terms is maskrcnn_loss_terms
  with pytest.raises(ValueError, match=r"unknown loss terms in weights: \['loss_rpn'\]"):
    maskrcnn_loss(out, weights={"loss_rpn": 1.0})


def test_gradient_matches_finite_differences():
  """Central differences of the total (float32, smooth region) agree with jax.grad."""
  out = _outputs(4)
  params = {k: jnp.asarray(out[k]) for k in ("rpn_logits", "rpn_deltas", "class_logits",
                                             "box_deltas", "mask_logits")}

  def total(p):
    return maskrcnn_loss(dict(out, **p))

  grads = jax.grad(total)(params)
  rng = np.random.default_rng(0)
  f = jax.jit(total)
  for name, g in grads.items():
    g = np.asarray(g)
    candidates = np.argwhere(np.abs(g) > 1e-3 * np.abs(g).max())
    for idx in candidates[rng.choice(len(candidates), 3, replace=False)]:
      idx = tuple(idx)
      eps = 1e-2
      plus = dict(params, **{name: params[name].at[idx].add(eps)})
      minus = dict(params, **{name: params[name].at[idx].add(-eps)})
      fd = (float(f(plus)) - float(f(minus))) / (2 * eps)
      assert fd == pytest.approx(g[idx], rel=0.05, abs=2e-5), (name, idx)


def _sharded_mean(outputs, shards):
  """The pmap step's loss: the mean over shards of the loss traced per shard under
  ``batch_sharded_over`` (vmap with an axis name stands in for the devices)."""

  def split(x):
    x = jnp.asarray(x)
    return x.reshape((shards, x.shape[0] // shards) + x.shape[1:])

  def per_shard(o):
    with _common.batch_sharded_over("shards"):
      return maskrcnn_loss_terms(o)

  terms = jax.jit(jax.vmap(per_shard, axis_name="shards"))(
      {k: split(v) for k, v in outputs.items()})
  return {k: float(jnp.mean(v)) for k, v in terms.items()}


def test_sharded_normalisation_equals_jit():
  """Shards with very different numbers of sampled anchors/RoIs and positives."""
  rng = np.random.default_rng(5)
  rpn, _, _, _ = _rpn_case(rng, n=4)
  rpn["rpn_labels"][2:, 10:] = -1  # the second shard samples few anchors
  roi = _roi_case(rng, n=4, counts=(12, 11, 3, 1))
  mask = _mask_outputs(_mask_case(rng, n=4, counts=(4, 3, 0, 1)))
  out = {**rpn, **roi, **mask}
  whole = {k: float(v) for k, v in jax.jit(maskrcnn_loss_terms)(out).items()}
  sharded = _sharded_mean(out, 2)
  for k in TERMS:
    assert sharded[k] == pytest.approx(whole[k], rel=1e-5), k
  # No positive mask on one shard at all: still the global value.
  out["mask_valid"] = out["mask_valid"].copy()
  out["mask_valid"][:2] = False
  assert _sharded_mean(out, 2)["loss_mask"] == pytest.approx(
      float(maskrcnn_loss_terms(out)["loss_mask"]), rel=1e-5)


def test_jit_does_not_retrace_for_new_values():
  f = jax.jit(maskrcnn_loss)
  a, b = float(f(_outputs(0))), float(f(_outputs(1)))
  assert f._cache_size() == 1 and a != b


def test_bad_outputs_raise_clear_errors():
  out = _outputs()
  with pytest.raises(TypeError, match="outputs must be the dict"):
    maskrcnn_loss([1, 2])
  with pytest.raises(ValueError, match=r"outputs\['rpn_labels'\] is missing"):
    maskrcnn_loss({k: v for k, v in out.items() if k != "rpn_labels"})
  with pytest.raises(ValueError, match=r"outputs\['rpn_deltas'\] must start with"):
    maskrcnn_loss(dict(out, rpn_deltas=out["rpn_deltas"][:, :-1]))
  with pytest.raises(TypeError, match=r"outputs\['roi_labels'\] must be integer"):
    maskrcnn_loss(dict(out, roi_labels=out["roi_labels"].astype(np.float32)))
  with pytest.raises(TypeError, match=r"outputs\['rpn_labels'\] must be integer, got bool"):
    maskrcnn_loss(dict(out, rpn_labels=out["rpn_labels"] > 0))
  with pytest.raises(ValueError, match=r"outputs\['mask_targets'\] .* must have the shape"):
    maskrcnn_loss(dict(out, mask_targets=out["mask_targets"][..., :14, :14]))
  with pytest.raises(ValueError, match=r"box_deltas'\] \[N, S, C, 4\] must have C = 5"):
    maskrcnn_loss(dict(out, box_deltas=out["box_deltas"][:, :, :3]))
  with pytest.raises(ValueError, match=r"outputs\['class_logits'\] must have 3 dimensions"):
    maskrcnn_loss(dict(out, class_logits=out["class_logits"][0]))
