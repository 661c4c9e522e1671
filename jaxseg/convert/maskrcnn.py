"""torchvision Mask R-CNN checkpoints -> ``jaxseg.models.MaskRCNN`` variables.

``maskrcnn_state_dict`` renames a torchvision ``maskrcnn_resnet50_fpn`` (or any
``MaskRCNN(resnet_fpn_backbone(...))``) state dict to the flax-side dotted names and
reorders the tensors whose layout differs; ``maskrcnn_from_torch`` then converts it with
``from_torch_state_dict``. The renaming:

| torchvision | jaxseg |
|---|---|
| ``backbone.body.*`` | ``backbone.body.*`` (jaxseg's ResNet names) |
| ``backbone.fpn.inner_blocks.{i}.0`` (old: ``inner_blocks.{i}``) | ``backbone.fpn.inner_{i}`` |
| ``backbone.fpn.layer_blocks.{i}.0`` (old: ``layer_blocks.{i}``) | ``backbone.fpn.layer_{i}`` |
| ``rpn.head.conv.0.0`` (old: ``rpn.head.conv``) | ``rpn.conv`` |
| ``rpn.head.cls_logits`` / ``rpn.head.bbox_pred`` | ``rpn.cls_logits`` / ``rpn.bbox_pred`` |
| ``roi_heads.box_head.fc6`` / ``fc7`` | ``box_head.fc6`` / ``box_head.fc7`` |
| ``roi_heads.box_predictor.{cls_score,bbox_pred}`` | ``box_predictor.{cls_score,bbox_pred}`` |
| ``roi_heads.mask_head.{i}.0`` (old: ``mask_head.mask_fcn{i+1}``) | ``mask_head.mask_fcn{i+1}`` |
| ``roi_heads.mask_predictor.{conv5_mask,mask_fcn_logits}`` | ``mask_predictor.*`` |

Layout changes (the rest is ``from_torch_state_dict``'s structural conversion):

- box deltas: torchvision orders the four channels of each anchor (``rpn.head.bbox_pred``)
  and of each class (``box_predictor.bbox_pred``) as (dx, dy, dw, dh); jaxseg's boxes are
  (y0, x0, y1, x1), so its deltas are (dy, dx, dh, dw) and those output rows are swapped;
- ``fc6``: torchvision flattens the [C, 7, 7] RoI features in NCHW order, jaxseg flattens
  [7, 7, C] (NHWC), so the input columns of the weight are permuted.
"""
import re
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from jaxseg.convert.torch import from_torch_state_dict

# Blocks per stage and block type of each backbone the model accepts.
RESNET_LAYOUTS = {
    "resnet18": ("BasicBlock", (2, 2, 2, 2)),
    "resnet34": ("BasicBlock", (3, 4, 6, 3)),
    "resnet50": ("Bottleneck", (3, 4, 6, 3)),
    "resnet101": ("Bottleneck", (3, 4, 23, 3)),
}

# (dx, dy, dw, dh) -> (dy, dx, dh, dw): output k of jaxseg reads torch channel _SWAP[k].
_SWAP = np.array([1, 0, 3, 2])

_RENAMES = (
    (re.compile(r"^backbone\.fpn\.inner_blocks\.(\d+)(?:\.0)?\.(weight|bias)$"),
     r"backbone.fpn.inner_\1.\2"),
    (re.compile(r"^backbone\.fpn\.layer_blocks\.(\d+)(?:\.0)?\.(weight|bias)$"),
     r"backbone.fpn.layer_\1.\2"),
    (re.compile(r"^rpn\.head\.conv(?:\.0\.0)?\.(weight|bias)$"), r"rpn.conv.\1"),
    (re.compile(r"^rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)$"), r"rpn.\1.\2"),
    (re.compile(r"^roi_heads\.(box_head\.fc[67]|box_predictor\.(?:cls_score|bbox_pred)|"
                r"mask_predictor\.(?:conv5_mask|mask_fcn_logits))\.(weight|bias)$"), r"\1.\2"),
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"),
     r"mask_head.mask_fcn\1.\2"),
)
_NEW_MASK_HEAD = re.compile(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$")
_BODY_BLOCK = re.compile(r"^backbone\.body\.layer([1-4])\.(\d+)\.(conv\d)\.weight$")


def _rename(key: str) -> str:
  m = _NEW_MASK_HEAD.match(key)
  if m:
    return f"mask_head.mask_fcn{int(m.group(1)) + 1}.{m.group(2)}"
  for pattern, repl in _RENAMES:
    if pattern.match(key):
      return pattern.sub(repl, key)
  return key  # backbone.body.* keeps its name; anything else is left for the caller to report


def _body_layout(keys: Sequence[str]):
  """(block type, blocks per stage) of the ResNet whose ``backbone.body`` entries are ``keys``."""
  blocks = [0, 0, 0, 0]
  bottleneck = False
  for key in keys:
    m = _BODY_BLOCK.match(key)
    if m:
      stage, block = int(m.group(1)) - 1, int(m.group(2))
      blocks[stage] = max(blocks[stage], block + 1)
      bottleneck |= m.group(3) == "conv3"
  return ("Bottleneck" if bottleneck else "BasicBlock"), tuple(blocks)


def _swap_deltas(w: np.ndarray, key: str) -> np.ndarray:
  if w.shape[0] % 4:
    raise ValueError(f"maskrcnn_state_dict: {key} has {w.shape[0]} output channels, "
                     "not a multiple of 4 box deltas")
  groups = w.shape[0] // 4
  return w.reshape((groups, 4) + w.shape[1:])[:, _SWAP].reshape(w.shape)


def maskrcnn_state_dict(state_dict: Mapping[str, Any], *, backbone: str,
                        roi_resolution: int = 7) -> Dict[str, np.ndarray]:
  """Renames a torchvision Mask R-CNN state dict to ``jaxseg.models.MaskRCNN``'s names.

  Accepts both torchvision's current names (``inner_blocks.{i}.0``, ``rpn.head.conv.0.0``,
  ``mask_head.{i}.0``) and the pre-0.13 ones of the legacy COCO checkpoints
  (``inner_blocks.{i}``, ``rpn.head.conv``, ``mask_head.mask_fcn{i}``). ``num_batches_tracked``
  and other unknown entries are passed through for ``from_torch_state_dict`` to drop or
  report.

  Args:
    state_dict: torch parameter names -> arrays (``t.numpy()``, or
      ``jaxseg.convert.load_torch_file``'s output).
    backbone: the jaxseg model's backbone name (``resnet18``, ``resnet34``, ``resnet50``,
      ``resnet101``); checked against the ResNet stored under ``backbone.body``.
    roi_resolution: side of the RoI features that ``fc6`` flattens (torchvision: 7).

  Returns:
    flax-side dotted names -> float32 NumPy arrays, still in torch layout except for the
    permutations of the rpn/box-predictor ``bbox_pred`` rows (per anchor/class (dx, dy, dw,
    dh) -> (dy, dx, dh, dw)) and of ``fc6``'s input columns (NCHW -> NHWC flatten).

  Raises:
    ValueError: unknown ``backbone``, a ResNet body of another depth or block type, or
      tensors whose shapes cannot be those of a Mask R-CNN.
    TypeError: ``state_dict`` is not a mapping.
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(f"maskrcnn_state_dict: state_dict must be a mapping of names to arrays, "
                    f"got {type(state_dict).__name__}")
  if backbone not in RESNET_LAYOUTS:
    raise ValueError(f"maskrcnn_state_dict: backbone must be one of "
                     f"{', '.join(RESNET_LAYOUTS)}, got {backbone!r}")
  if roi_resolution < 1:
    raise ValueError(f"maskrcnn_state_dict: roi_resolution must be >= 1, got {roi_resolution}")
  body_keys = [k for k in state_dict if k.startswith("backbone.body.")]
  if body_keys:
    found = _body_layout(body_keys)
    if found != RESNET_LAYOUTS[backbone]:
      names = [n for n, layout in RESNET_LAYOUTS.items() if layout == found]
      what = names[0] if names else f"a ResNet of {found[0]}s {found[1]}"
      raise ValueError(f"maskrcnn_state_dict: the state dict's backbone.body is {what} "
                       f"({found[0]}s per stage {found[1]}), not {backbone}")

  out = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float32)
    new = _rename(key)
    if new in out:
      raise ValueError(f"maskrcnn_state_dict: {key} and another entry both map to {new} "
                       "(the state dict mixes old and new torchvision names)")
    if new in ("rpn.bbox_pred.weight", "rpn.bbox_pred.bias", "box_predictor.bbox_pred.weight",
               "box_predictor.bbox_pred.bias"):
      value = _swap_deltas(value, key)
    elif new == "box_head.fc6.weight":
      cells = roi_resolution * roi_resolution
      if value.ndim != 2 or value.shape[1] % cells:
        raise ValueError(f"maskrcnn_state_dict: {key} must be [out, C*{cells}] (an NCHW flatten "
                         f"of {roi_resolution}x{roi_resolution} RoI features), got {value.shape}")
      rows, channels = value.shape[0], value.shape[1] // cells
      value = (value.reshape(rows, channels, roi_resolution, roi_resolution)
               .transpose(0, 2, 3, 1).reshape(rows, -1))
    out[new] = np.ascontiguousarray(value)
  return out


def maskrcnn_from_torch(model, state_dict: Mapping[str, Any], *,
                        sample_input_shape: Optional[Sequence[int]] = None) -> Dict[str, Any]:
  """Flax variables for ``model`` (a ``jaxseg.models.MaskRCNN``) from a torchvision state dict.

  Example::

    model = jaxseg.models.build("maskrcnn", num_classes=91, backbone="resnet50",
                                frozen_bn_eps=0.0)  # legacy COCO_V1 weights use eps 0
    sd = jaxseg.convert.load_torch_file("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    variables = jaxseg.convert.maskrcnn_from_torch(model, sd)

  Args:
    model: an unbound ``MaskRCNN`` module (its ``backbone_name`` field names the ResNet).
    state_dict: torch parameter names -> arrays, as for ``maskrcnn_state_dict``.
    sample_input_shape: an input shape the model accepts, only traced abstractly
      (default ``(1, 128, 128, 3)``).

  Returns:
    ``{"params": ..., "batch_stats": ...}`` for ``model.apply`` (the frozen BatchNorm
    statistics live in ``batch_stats``).

  Raises:
    ValueError: as ``maskrcnn_state_dict``, and from ``from_torch_state_dict`` listing every
      missing, unexpected and mis-shaped entry (e.g. another ``num_classes`` or width).
    TypeError: ``model`` has no string ``backbone_name`` field.
  """
  backbone = getattr(model, "backbone_name", None)
  if not isinstance(backbone, str):
    raise TypeError(f"maskrcnn_from_torch: model must be a jaxseg MaskRCNN (with a string "
                    f"`backbone_name` field), got {type(model).__name__}")
  shape = (1, 128, 128, 3) if sample_input_shape is None else tuple(sample_input_shape)
  renamed = maskrcnn_state_dict(state_dict, backbone=backbone)
  return from_torch_state_dict(model, renamed, sample_input_shape=shape,
                               init_kwargs={"train": False})
