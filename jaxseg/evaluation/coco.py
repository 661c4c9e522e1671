"""COCO box and mask AP (pycocotools' COCOeval) from dataset arrays and instance-model outputs.

::

  gt = coco_ground_truth([source[i] for i in range(len(source))], source.class_names)
  detections = coco_detections(outputs, image_ids=np.arange(len(source)))
  metrics = evaluate_coco(gt, detections)      # {"box_AP": .., "mask_AP50": .., ...}

or batch by batch, in the style of big_vision's evaluators::

  evaluator = InstanceEvaluator(source.class_names)
  for batch in jaxseg.data.eval_batches(source, batch_size=8, image_size=(800, 1344)):
    evaluator.add(predict(batch["image"]), batch)
  for name, value in evaluator.run():     # or metrics = dict(evaluator.result())
    print(name, value)

Conventions. Ground truth comes in the library's data convention: ``boxes`` (y0, x0, y1, x1)
INCLUSIVE pixels, which become COCO's [x, y, w, h] with ``w = x1 - x0 + 1``; instance masks
become RLE and their pixel count is the area (what sets small / medium / large). Detections come
in the model's output contract (DESIGN.md "Instance segmentation"): ``boxes`` (y0, x0, y1, x1)
CONTINUOUS pixels, which become [x0, y0, x1 - x0, y1 - y0]; ``masks`` probabilities at image
resolution, thresholded at 0.5 (``> 0.5``, as torchvision's reference ``coco_eval`` does) into
RLE. So an inclusive box of rows 0..9 and a detection of rows 0..10 are the same box.

As in torchvision's reference evaluation, box AP scores the boxes alone and mask AP the masks
alone: each detection's area for the small / medium / large ranges is its box area in one and
its mask area in the other. Metric names: ``{box,mask}_{AP, AP50, AP75, APs, APm, APl, AR1,
AR10, AR100, ARs, ARm, ARl}``, COCOeval's 12 summary numbers in its order; -1 where COCO leaves a
number undefined (no ground truth in that area range). With no detections at all, AP is 0.

Ground truth made from dataset arrays has no crowd regions (the builders turn them into the
mask's 255), so detections on crowds count as false positives; for official numbers evaluate
against the original annotation file (``pycocotools.coco.COCO(path)``) with the image ids and
category ids of the builder's metadata: ``coco_detections(outputs, image_ids,
category_ids=metadata["category_ids"])``.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
              "ARl")
IOU_TYPES = ("bbox", "segm")
_PREFIX = {"bbox": "box", "segm": "mask"}
UNUSED_NAME = "N/A"  # class ids without a category (raw COCO ids); not evaluated


def _quiet():
  """pycocotools prints progress on stdout; keep it out of the trainer's output."""
  return contextlib.redirect_stdout(io.StringIO())


def mask_to_rle(mask: np.ndarray) -> dict:
  """Compressed COCO RLE of a binary mask [H, W] (nonzero = inside), ``counts`` as str."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"mask must have rank 2 [H, W], got shape {mask.shape}")
  rle = mask_utils.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
  rle["counts"] = rle["counts"].decode("ascii")  # json-friendly, as COCO's files hold it
  return rle


def _image_size(example: Mapping[str, np.ndarray]) -> tuple[int, int]:
  for key, axes in (("instance_masks", slice(-2, None)), ("valid", slice(-2, None)),
                    ("image", slice(-3, -1)), ("mask", slice(-2, None))):
    if key in example:
      return tuple(int(s) for s in np.shape(example[key])[axes])
  raise ValueError("an example needs 'image', 'valid', 'mask' or 'instance_masks' to give its "
                   f"size; it has {sorted(example)}")


def _unbatch(item: Mapping[str, Any]) -> Iterator[dict[str, np.ndarray]]:
  """The examples of a batch (``boxes`` [N, M, 4]) or the example itself (``boxes`` [M, 4])."""
  if "boxes" not in item or "box_classes" not in item:
    raise ValueError(f"ground truth needs 'boxes' and 'box_classes'; got keys {sorted(item)}")
  boxes = np.asarray(item["boxes"])
  if boxes.ndim == 2:
    yield {k: np.asarray(v) for k, v in item.items()}
    return
  if boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [M, 4] or [N, M, 4], got shape {boxes.shape}")
  keys = [k for k in ("boxes", "box_classes", "instance_masks", "image", "valid", "mask", "index")
          if k in item]
  arrays = {k: np.asarray(item[k]) for k in keys}
  for i in range(boxes.shape[0]):
    yield {k: v[i] for k, v in arrays.items()}


def _is_padding(example: Mapping[str, np.ndarray]) -> bool:
  if "index" in example and int(example["index"]) < 0:
    return True
  return "valid" in example and not np.asarray(example["valid"]).any()


def _gt_records(example: Mapping[str, np.ndarray], image_id: int, num_classes: int,
                with_masks: bool) -> tuple[dict, list[dict]]:
  """The COCO image entry and annotations (without ids) of one example."""
  height, width = _image_size(example)
  boxes = np.asarray(example["boxes"], np.float64)
  classes = np.asarray(example["box_classes"])
  if boxes.ndim != 2 or boxes.shape[1] != 4 or classes.shape != boxes.shape[:1]:
    raise ValueError(f"boxes [M, 4] and box_classes [M] expected, got {boxes.shape} and "
                     f"{classes.shape}")
  masks = None
  if with_masks:
    if "instance_masks" not in example:
      raise ValueError("mask ground truth needs 'instance_masks' (or evaluate iou_types=('bbox',))")
    masks = np.asarray(example["instance_masks"])
    if masks.shape[:1] != classes.shape:
      raise ValueError(f"instance_masks {masks.shape} do not match {classes.shape[0]} boxes")
  anns = []
  for j in np.flatnonzero(classes > 0):  # -1 is padding and 0 background: neither is an object
    c = int(classes[j])
    if c >= num_classes:
      raise ValueError(f"box class {c} is outside the {num_classes} class names")
    y0, x0, y1, x1 = boxes[j]
    w, h = x1 - x0 + 1, y1 - y0 + 1  # inclusive pixel box -> width in pixels
    ann = {"image_id": image_id, "category_id": c, "bbox": [float(x0), float(y0), float(w),
                                                           float(h)], "iscrowd": 0}
    if masks is not None:
      ann["segmentation"] = mask_to_rle(masks[j])
      ann["area"] = float(np.count_nonzero(masks[j]))
    else:
      ann["area"] = float(w * h)
    anns.append(ann)
  return {"id": image_id, "height": height, "width": width}, anns


def _categories(class_names: Sequence[str]) -> list[dict]:
  if len(class_names) < 2:
    raise ValueError(f"class_names must hold background and at least one class, got "
                     f"{list(class_names)}")
  return [{"id": c, "name": str(name)} for c, name in enumerate(class_names)
          if c > 0 and name != UNUSED_NAME]


def _make_coco(images: list[dict], annotations: list[dict], categories: list[dict]) -> COCO:
  coco = COCO()
  # COCOeval marks an unmatched detection with gt id 0, so ids start at 1.
  anns = [{**ann, "id": k + 1} for k, ann in enumerate(annotations)]
  coco.dataset = {"images": images, "annotations": anns, "categories": categories}
  with _quiet():
    coco.createIndex()
  return coco


def coco_ground_truth(examples: Iterable[Mapping[str, Any]], class_names: Sequence[str], *,
                      image_ids: Sequence[int] | None = None, masks: bool = True) -> COCO:
  """A pycocotools ``COCO`` ground truth, in memory, from dataset examples or batches.

  Args:
    examples: examples (``boxes`` [M, 4] inclusive (y0, x0, y1, x1), ``box_classes`` [M] with
      -1 padding, ``instance_masks`` [M, H, W], and ``image`` [H, W, 3] or ``valid`` [H, W] for
      the size) or batches of them (a leading axis N, e.g. from `jaxseg.data.eval_batches`).
    class_names: the label space, background first; classes named "N/A" are left out.
    image_ids: one id per example, in order (batches flattened); default: a batch's ``index``
      when it has one, else the example's position (0, 1, ...). Examples with a negative id,
      or whose ``valid`` is all False, are padding and left out.
    masks: add instance masks (needed for mask AP); False builds boxes only.

  Returns:
    a ``COCO`` with one image per example (no annotation for an image without objects); each
    object has iscrowd 0 and area its mask's pixel count (box area without masks).
  """
  images, annotations, seen = [], [], set()
  position = 0
  for item in examples:
    for example in _unbatch(item):
      if image_ids is not None:
        if position >= len(image_ids):
          raise ValueError(f"image_ids has {len(image_ids)} ids but there are more examples")
        image_id = int(image_ids[position])
      elif "index" in example:
        image_id = int(example["index"])
      else:
        image_id = position
      position += 1
      if image_id < 0 or _is_padding(example):
        continue
      if image_id in seen:
        raise ValueError(f"image id {image_id} appears twice")
      seen.add(image_id)
      image, anns = _gt_records(example, image_id, len(class_names), masks)
      images.append(image)
      annotations.extend(anns)
  return _make_coco(images, annotations, _categories(class_names))


def coco_detections(outputs: Mapping[str, Any], image_ids: Sequence[int], *,
                    category_ids: Sequence[int] | None = None,
                    mask_threshold: float = 0.5) -> list[dict]:
  """COCO result entries from an instance model's outputs.

  Args:
    outputs: ``boxes`` [N, K, 4] (y0, x0, y1, x1) continuous pixels, ``scores`` [N, K],
      ``classes`` int [N, K], optionally ``masks`` [N, K, H, W] probabilities at image
      resolution and ``valid`` bool [N, K] (default all valid). NumPy or JAX arrays; a missing
      leading axis means one image.
    image_ids: [N] the image id of each row; a negative id marks padding (left out).
    category_ids: class id -> COCO category id (a builder's ``category_ids`` metadata), for
      evaluating against an original annotation file; default: class ids are category ids.
    mask_threshold: a mask pixel is inside when its probability is above this.

  Returns:
    one dict per valid detection: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h],
    ``score`` and, with masks, ``segmentation`` (compressed RLE).
  """
  for key in ("boxes", "scores", "classes"):
    if key not in outputs:
      raise ValueError(f"outputs need 'boxes', 'scores' and 'classes'; missing {key!r}")
  boxes = np.asarray(outputs["boxes"], np.float64)
  single = boxes.ndim == 2
  expand = (lambda a: a[None]) if single else (lambda a: a)
  boxes = expand(boxes)
  scores = expand(np.asarray(outputs["scores"], np.float64))
  classes = expand(np.asarray(outputs["classes"]))
  valid = (expand(np.asarray(outputs["valid"], bool)) if outputs.get("valid") is not None
           else np.ones(scores.shape, bool))
  masks = expand(np.asarray(outputs["masks"])) if outputs.get("masks") is not None else None
  if boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f"outputs['boxes'] must be [N, K, 4], got shape {boxes.shape}")
  n, k = boxes.shape[:2]
  for name, array in (("scores", scores), ("classes", classes), ("valid", valid)):
    if array.shape != (n, k):
      raise ValueError(f"outputs[{name!r}] must be [{n}, {k}] like the boxes, got {array.shape}")
  if masks is not None and (masks.ndim != 4 or masks.shape[:2] != (n, k)):
    raise ValueError(f"outputs['masks'] must be [{n}, {k}, H, W], got {masks.shape}")
  image_ids = np.atleast_1d(np.asarray(image_ids))
  if image_ids.shape != (n,):
    raise ValueError(f"image_ids must hold {n} ids (one per image), got shape {image_ids.shape}")
  lookup = None if category_ids is None else [int(c) for c in category_ids]
  results = []
  for i, image_id in enumerate(image_ids.tolist()):
    if image_id < 0:
      continue
    for j in np.flatnonzero(valid[i]):
      c = int(classes[i, j])
      if lookup is not None:
        if not 0 <= c < len(lookup):
          raise ValueError(f"class {c} has no entry in category_ids (length {len(lookup)})")
        c = lookup[c]
      y0, x0, y1, x1 = boxes[i, j]
      det = {"image_id": int(image_id), "category_id": c,
             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
             "score": float(scores[i, j])}
      if masks is not None:
        det["segmentation"] = mask_to_rle(masks[i, j] > mask_threshold)
      results.append(det)
  return results


def _results(gt: COCO, detections: list[dict], iou_type: str) -> COCO:
  """The detections as a result ``COCO``: only boxes for "bbox", only masks for "segm"."""
  drop = "segmentation" if iou_type == "bbox" else "bbox"
  entries = [{k: v for k, v in d.items() if k != drop} for d in detections]
  if not entries:  # loadRes indexes the first entry; an empty result set is built directly
    return _make_coco(list(gt.dataset["images"]), [], list(gt.dataset["categories"]))
  with _quiet():
    return gt.loadRes(entries)


def evaluate_coco(gt: COCO, detections: Sequence[Mapping[str, Any]],
                  iou_types: Sequence[str] = IOU_TYPES) -> dict[str, float]:
  """COCOeval's summary numbers, computed quietly.

  Args:
    gt: ground truth (`coco_ground_truth` or ``COCO(annotation_file)``).
    detections: `coco_detections` entries (may be empty).
    iou_types: any of "bbox" (box AP, prefix ``box_``) and "segm" (mask AP, prefix ``mask_``).

  Returns:
    ``{"box_AP": .., "box_AP50": .., ..., "mask_ARl": ..}``: the 12 stats of each type (see
    `STAT_NAMES`), floats; -1 where undefined.

  Raises:
    ValueError: unknown iou type, detections on images the ground truth lacks, or mask AP
    without masks.
  """
  if isinstance(iou_types, str):
    iou_types = (iou_types,)
  unknown = [t for t in iou_types if t not in IOU_TYPES]
  if unknown or not iou_types:
    raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}")
  detections = [dict(d) for d in detections]
  stray = sorted({d["image_id"] for d in detections} - set(gt.getImgIds()))
  if stray:
    raise ValueError(f"detections on image ids {stray[:5]} that the ground truth does not have")
  if "segm" in iou_types:
    if any("segmentation" not in d for d in detections):
      raise ValueError("mask AP needs every detection to have a 'segmentation' (outputs "
                       "without 'masks'?); evaluate iou_types=('bbox',)")
    if any("segmentation" not in a for a in gt.dataset["annotations"]):
      raise ValueError("mask AP needs ground truth masks; evaluate iou_types=('bbox',)")
  metrics = {}
  for iou_type in iou_types:
    evaluator = COCOeval(gt, _results(gt, detections, iou_type), iou_type)
    with _quiet():
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
    for name, value in zip(STAT_NAMES, evaluator.stats):
      metrics[f"{_PREFIX[iou_type]}_{name}"] = float(value)
  return metrics


class InstanceEvaluator:
  """COCO box / mask AP accumulated batch by batch (big_vision's evaluator style).

  ``add(outputs, batch)`` after each eval step turns the batch's ground truth and the model's
  detections into COCO records (RLE: the masks are not kept); ``result()`` runs COCOeval over
  everything added and returns its ``(name, value)`` pairs, which ``run()`` yields. Image ids
  are the batches' ``index`` (`jaxseg.data.eval_batches`) or, without one, a running count;
  padding examples (index -1, or ``valid`` all False) are left out on both sides.

  Args:
    class_names: the label space, background first.
    iou_types: "bbox" and/or "segm".
    mask_threshold: probability above which a predicted mask pixel is inside.
    prefix: prepended to every metric name (e.g. "val/").
  """

  def __init__(self, class_names: Sequence[str], *, iou_types: Sequence[str] = IOU_TYPES,
               mask_threshold: float = 0.5, prefix: str = ""):
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    if not iou_types or any(t not in IOU_TYPES for t in iou_types):
      raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}")
    self.class_names = tuple(class_names)
    self.categories = _categories(self.class_names)
    self.iou_types = iou_types
    self.mask_threshold = float(mask_threshold)
    self.prefix = prefix
    self.reset()

  def reset(self) -> None:
    """Forgets everything added."""
    self._images, self._annotations, self._detections = [], [], []
    self._seen, self._count = set(), 0

  def add(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
    """Adds one batch: ``outputs`` as in `coco_detections`, ``batch`` as in
    `coco_ground_truth` (with ``image`` or ``valid``, and ``index`` when it has padding)."""
    with_masks = "segm" in self.iou_types
    if with_masks and outputs.get("masks") is None:
      raise ValueError("mask AP needs outputs['masks']; use iou_types=('bbox',) for boxes only")
    examples = list(_unbatch(batch))
    n = len(examples)
    if n == 0:
      return
    if "index" in batch:
      ids = np.asarray(batch["index"]).astype(np.int64).reshape(-1)
    else:
      ids = np.arange(self._count, self._count + n)
    self._count += n
    if ids.shape != (n,):
      raise ValueError(f"batch['index'] must hold {n} ids, got shape {ids.shape}")
    ids = np.where([_is_padding(e) for e in examples], -1, ids)
    if with_masks:
      size = _image_size(examples[0])
      mask_size = tuple(np.shape(outputs["masks"])[-2:])
      if mask_size != size:
        raise ValueError(f"outputs['masks'] are {mask_size} but the images are {size}: paste "
                         "the masks at image resolution first")
    for example, image_id in zip(examples, ids.tolist()):
      if image_id < 0:
        continue
      if image_id in self._seen:
        raise ValueError(f"image id {image_id} was added twice (call reset() between passes)")
      self._seen.add(image_id)
      image, anns = _gt_records(example, image_id, len(self.class_names), with_masks)
      self._images.append(image)
      self._annotations.extend(anns)
    self._detections.extend(coco_detections(outputs, ids, mask_threshold=self.mask_threshold))

  def result(self) -> list[tuple[str, float]]:
    """COCOeval's numbers over everything added as ``(name, value)`` pairs, in `evaluate_coco`'s
    order (``dict(evaluator.result())`` gives a dict)."""
    if not self._images:
      raise ValueError("no images were added")
    gt = _make_coco(list(self._images), list(self._annotations), self.categories)
    metrics = evaluate_coco(gt, self._detections, self.iou_types)
    return [(f"{self.prefix}{name}", value) for name, value in metrics.items()]

  def run(self) -> Iterator[tuple[str, float]]:
    """Yields the ``(name, value)`` pairs of `result`."""
    yield from self.result()
