"""``jaxseg_coco``: COCO-format instance segmentation (COCO 2017 or a user's own export), prepared
offline without TensorFlow.

The data is never downloaded: it is read from the folder the user extracted it into::

  source = jaxseg.data.load("coco", "validation", manual_dir="/data/coco")

``manual_dir`` defaults to ``$JAXSEG_SHARED_DATA/coco``. Layout read (COCO's own, see `LAYOUT`):
``annotations/instances_<name>.json`` with its images in ``<name>/<file_name>``. Every such pair
is a split: ``train2017`` becomes ``train``, ``val2017`` becomes ``validation`` and any other
``<name>`` keeps its name, so a COCO-format export of one's own data works as it is. An
annotation file without its image folder is skipped (e.g. the train json when only val2017's
images were downloaded).

Per example (images in ascending image id order; the ids are in the metadata, `image_ids`):

* ``image`` uint8 [H, W, 3]: grey and CMYK files are converted to RGB. At native size an RGB
  JPEG is stored as its own bytes (no re-encoding), anything else as a lossless PNG.
* ``instance_masks`` uint8 [M, H, W] decoded from the annotation's ``segmentation`` as
  pycocotools' ``COCO.annToMask`` decodes it: polygons (all parts of an annotation merged),
  uncompressed RLE (``counts`` a list) and compressed RLE (``counts`` a string). Polygon parts
  with fewer than 3 points have no area and are dropped (given a first part of exactly 2 points,
  pycocotools takes the parts for boxes and fails). An annotation without a segmentation gets its filled box.
* ``boxes`` float32 [M, 4] (y0, x0, y1, x1) INCLUSIVE pixel boxes (the library's data
  convention) from COCO's ``bbox`` [x, y, w, h] (from the mask when there is none). COCO's box
  edges are continuous (a polygon with corners x=4 and x=20 covers pixel columns 4..19), so
  each edge is clipped to the image and rounded to the nearest pixel boundary (halves up):
  ``y0 = floor(y + 0.5)``, ``y1 = floor(y + h + 0.5) - 1`` (at least ``y0``), likewise for x.
  A whole-pixel box gives exactly ``y0 = y, y1 = y + h - 1``. Annotations whose clipped box
  has no area are dropped, as torchvision's reference scripts drop them.
* ``box_classes`` int32 [M]: with ``contiguous_ids=True`` (default) the categories, sorted by
  their COCO id, become 1..K (0 is background; COCO 2017 has K = 80); with
  ``contiguous_ids=False`` the raw COCO ids are kept and there are max(id) + 1 classes (91 for
  COCO, torchvision's convention; ids without a category are named "N/A"). The metadata's
  ``category_ids[c]`` is the COCO id of class ``c``.
* ``mask`` uint8 [H, W] semantic labels: the class of the instance on top (later annotations
  over earlier ones, in file order), 0 background. Crowd regions (``iscrowd=1``) are 255
  (ignore) where no instance covers them: they hold objects of their class that are not
  individually delineated, so neither background nor one instance. Crowd annotations are not
  instances (torchvision's reference scripts drop them from the targets).
* ``tags`` float32 [C]: the classes present in the mask, plus the classes of crowd regions (a
  crowd of people means people are in the image).
* at most ``max_instances`` instances (default `MAX_INSTANCES` = 100, TF Model Garden's value
  for COCO); with more, the largest masks are kept, in file order. The preparation log counts
  the images that had more. Padding has class -1, a zero box and an empty mask. The semantic
  mask always shows every instance.

Memory: instance masks are stored zlib-compressed and kept bit-packed by `jaxseg.data.Source`'s
cache, ``max_instances * H * W / 8`` bytes per example: 3.8 MB for a 640x480 COCO image at 100
instances, plus 0.9 MB of decoded image and 0.3 MB of mask; reading an example back inflates
``max_instances * H * W`` bytes (about 0.1 s on one core at that size). Caching all of
train2017 this way does not fit in memory: load it with ``cache=False`` (or a smaller
``image_size`` / ``max_instances``). Training batches (`jaxseg.data.train_batches`) carry
``instance_masks`` uint8 [B, M, h, w] and recompute the boxes as the tight boxes of the
augmented masks.

``image_size=(height, width)`` resizes at preparation (image bilinear, masks nearest, box edges
scaled then rounded as above). Each setting (``image_size``, ``max_instances``,
``contiguous_ids``) and each set of annotation files (names and sizes) prepares into its own
TFDS config, so pointing ``manual_dir`` at another export prepares afresh.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
import zlib
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils

from jaxseg.constants import IGNORE_INDEX
from jaxseg.data import features, weak_labels

# TF Model Garden pads COCO to 100 instances (torchvision keeps them all); far above the other
# builders' 8, as COCO images hold 7 objects on average and some dozens. Memory: see above.
MAX_INSTANCES = 100
SPLIT_NAMES = {"train2017": "train", "val2017": "validation"}
BACKGROUND_NAME = "background"
UNUSED_NAME = "N/A"  # raw ids without a category (torchvision's COCO_V1 category list)
_ANNOTATION_FILE = re.compile(r"instances_([\w-]+)\.json")

LAYOUT = """\
Download from https://cocodataset.org/#download the images (train2017.zip, val2017.zip) and
annotations_trainval2017.zip, and unzip them into one folder so that this tree exists:
  $JAXSEG_SHARED_DATA/coco/               or pass manual_dir=<folder>
    annotations/instances_train2017.json
    annotations/instances_val2017.json
    train2017/<file_name>.jpg             images named as in the json's "images"
    val2017/<file_name>.jpg
A COCO-format export of your own data works too: annotations/instances_<name>.json with its
images in <name>/ becomes the split <name>."""


@dataclasses.dataclass(eq=False)
class CocoConfig(tfds.core.BuilderConfig):
  """One setting; ``fingerprint`` identifies the annotation files it was prepared from."""
  image_size: tuple[int, int] | None = None
  max_instances: int = MAX_INSTANCES
  contiguous_ids: bool = True
  fingerprint: str = ""


def _options_name(size_name: str, max_instances: int, contiguous_ids: bool) -> str:
  return f"{size_name}_m{max_instances}_{'contiguous' if contiguous_ids else 'raw'}"


def make_config(image_size=None, max_instances: int = MAX_INSTANCES, contiguous_ids: bool = True,
                fingerprint: str = "") -> CocoConfig:
  """The config of one setting and one set of annotation files (`fingerprint`)."""
  image_size, size_name = features.image_size_name(image_size)
  if isinstance(max_instances, bool) or int(max_instances) != max_instances or max_instances < 1:
    raise ValueError(f"max_instances must be a positive integer, got {max_instances!r}")
  if not isinstance(contiguous_ids, (bool, np.bool_)):
    raise TypeError(f"contiguous_ids must be a bool, got {contiguous_ids!r}")
  options = _options_name(size_name, int(max_instances), bool(contiguous_ids))
  name = f"{options}_{fingerprint}" if fingerprint else options
  return CocoConfig(
      name=name, image_size=image_size, max_instances=int(max_instances),
      contiguous_ids=bool(contiguous_ids), fingerprint=fingerprint,
      description=f"COCO-format instances at {size_name} resolution; {options}")


# ----------------------------------------------------------------------------------------------
# The folder.


def default_manual_dir() -> str:
  """``$JAXSEG_SHARED_DATA/coco`` (default ``../shared/data/coco`` next to the checkout)."""
  from jaxseg.configs import shared_data_dir  # the one definition of the shared data folder
  return shared_data_dir("coco")


def resolve_root(manual_dir=None) -> str:
  """The COCO folder: ``manual_dir``, or `default_manual_dir` when it is None."""
  return default_manual_dir() if manual_dir is None else os.fspath(manual_dir)


def find_splits(root: str) -> dict[str, tuple[str, str]]:
  """Split name -> (annotation json, image folder) of every pair found in ``root``.

  Raises:
    `features.MissingDataError` (naming what is missing, with `LAYOUT`) when there is none;
    ValueError when two pairs map to one split name (``train`` and ``train2017``).
  """
  ann_dir = os.path.join(root, "annotations")
  if not os.path.isdir(root):
    raise features.MissingDataError(f"coco: {root}: folder not found.\n{LAYOUT}")
  if not os.path.isdir(ann_dir):
    raise features.MissingDataError(f"coco: {root}: missing annotations/.\n{LAYOUT}")
  splits, lonely = {}, []
  for file_name in sorted(os.listdir(ann_dir)):
    match = _ANNOTATION_FILE.fullmatch(file_name)
    if not match:
      continue
    folder = match.group(1)
    if not os.path.isdir(os.path.join(root, folder)):
      lonely.append(file_name)
      continue
    split = SPLIT_NAMES.get(folder, folder)
    if split in splits:
      raise ValueError(f"coco: {root}: annotations/{file_name} and "
                       f"{os.path.relpath(splits[split][0], root)} both make the split {split!r}")
    splits[split] = (os.path.join(ann_dir, file_name), os.path.join(root, folder))
  if not splits:
    found = (f"annotation files without their image folder: {', '.join(lonely)}" if lonely
             else "no annotations/instances_<name>.json")
    raise features.MissingDataError(f"coco: {root}: {found}.\n{LAYOUT}")
  return splits


def fingerprint(splits: Mapping[str, tuple[str, str]]) -> str:
  """8 hex digits naming the annotation files (split, file name, size in bytes)."""
  parts = [f"{split}:{os.path.basename(path)}:{os.path.getsize(path)}"
           for split, (path, _) in sorted(splits.items())]
  return f"{zlib.crc32(';'.join(parts).encode()):08x}"


def read_annotations(path: str) -> dict:
  """A COCO instances json, checked for the ``images``, ``annotations`` and ``categories`` lists."""
  if not os.path.isfile(path):
    raise features.MissingDataError(f"coco: annotation file not found: {path}")
  try:
    with open(path) as f:
      dataset = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(dataset, dict):
    raise ValueError(f"{path}: expected a COCO json object, got {type(dataset).__name__}")
  missing = [k for k in ("images", "annotations", "categories") if not isinstance(
      dataset.get(k), list)]
  if missing:
    raise ValueError(f"{path}: not a COCO instances file: missing the list(s) {missing}")
  return dataset


# ----------------------------------------------------------------------------------------------
# Label space.


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """Class ids of the dataset.

  Attributes:
    class_names: name of each class id, background (0) first.
    category_ids: the COCO category id of each class id (0 for background and unused ids).
    lookup: COCO category id -> class id.
  """
  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]
  lookup: Mapping[int, int]


def label_space(categories: Sequence[Mapping[str, Any]], contiguous_ids: bool = True,
                path: str = "categories") -> LabelSpace:
  """Class ids of COCO ``categories``: 1..K in sorted id order, or the raw ids.

  Raises:
    ValueError: a category without an integer id >= 1 or a name, or a repeated id.
  """
  cats = {}
  for cat in categories:
    cat_id, name = cat.get("id"), cat.get("name")
    if isinstance(cat_id, bool) or not isinstance(cat_id, int) or cat_id < 1:
      raise ValueError(f"{path}: category ids must be integers >= 1, got {cat_id!r}")
    if not isinstance(name, str):
      raise ValueError(f"{path}: category {cat_id} has no name")
    if cat_id in cats:
      raise ValueError(f"{path}: category id {cat_id} appears twice")
    cats[cat_id] = name
  if not cats:
    raise ValueError(f"{path}: no categories")
  ids = sorted(cats)
  if contiguous_ids:
    return LabelSpace((BACKGROUND_NAME,) + tuple(cats[i] for i in ids), (0,) + tuple(ids),
                      {cat_id: k + 1 for k, cat_id in enumerate(ids)})
  names = [UNUSED_NAME] * (ids[-1] + 1)
  names[0] = BACKGROUND_NAME
  for cat_id in ids:
    names[cat_id] = cats[cat_id]
  return LabelSpace(tuple(names), tuple(i if i in cats else 0 for i in range(len(names))),
                    {i: i for i in ids})


# ----------------------------------------------------------------------------------------------
# Annotations.


def annotation_rle(segmentation: Any, height: int, width: int) -> dict | None:
  """The RLE of a COCO ``segmentation`` (polygons, uncompressed or compressed RLE).

  Returns:
    a pycocotools RLE dict, or None when the annotation has no segmentation (no polygon with
    3 points or more).

  Raises:
    ValueError: an RLE of another size than the image, or an unknown format.
  """
  if isinstance(segmentation, list):
    polygons = [list(map(float, p)) for p in segmentation
                if isinstance(p, (list, tuple)) and len(p) >= 6]
    if not polygons:
      return None
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
  if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
    if list(segmentation["size"]) != [height, width]:
      raise ValueError(f"RLE of size {segmentation['size']} in an image of size "
                       f"{[height, width]}")
    counts = segmentation["counts"]
    if isinstance(counts, list):
      return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(counts, (str, bytes)):
      return {"size": [height, width],
              "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
  raise ValueError(f"unknown segmentation format {type(segmentation).__name__} (expected "
                   "polygons or an RLE dict with 'counts' and 'size')")


def inclusive_box(bbox: Sequence[float], height: int, width: int,
                  scale: tuple[float, float] = (1.0, 1.0)) -> tuple[int, int, int, int] | None:
  """COCO's [x, y, w, h] as an inclusive pixel box (y0, x0, y1, x1) (see the module docstring).

  Args:
    bbox: COCO box, continuous pixel edges.
    height, width: the image size (after ``scale``).
    scale: (sy, sx) applied to the edges first (resizing at preparation).

  Returns:
    the box, or None when the box clipped to the image has no area.
  """
  x, y, w, h = (float(v) for v in bbox)
  sy, sx = scale
  y0c, y1c = min(max(y * sy, 0.0), height), min(max((y + h) * sy, 0.0), height)
  x0c, x1c = min(max(x * sx, 0.0), width), min(max((x + w) * sx, 0.0), width)
  if not (y1c > y0c and x1c > x0c):
    return None
  # Halves round up (floor(v + 0.5)) so that the rounding does not depend on parity.
  y0, x0 = min(math.floor(y0c + 0.5), height - 1), min(math.floor(x0c + 0.5), width - 1)
  y1 = min(max(math.floor(y1c + 0.5) - 1, y0), height - 1)
  x1 = min(max(math.floor(x1c + 0.5) - 1, x0), width - 1)
  return y0, x0, y1, x1


@dataclasses.dataclass(frozen=True)
class Instance:
  """One annotation decoded: class id, inclusive box, mask uint8 [H, W], crowd flag."""
  class_id: int
  box: tuple[int, int, int, int] | None
  mask: np.ndarray
  crowd: bool


def decode_annotation(ann: Mapping[str, Any], height: int, width: int,
                      lookup: Mapping[int, int], where: str = "annotation") -> Instance:
  """One COCO annotation as an `Instance` at the image's native size.

  Raises:
    ValueError: unknown category, malformed box or segmentation (message names ``where``).
  """
  cat_id = ann.get("category_id")
  if cat_id not in lookup:
    raise ValueError(f"{where}: category_id {cat_id!r} is not among the categories")
  try:
    rle = annotation_rle(ann.get("segmentation"), height, width)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e
  bbox = ann.get("bbox")
  if bbox is not None and (not isinstance(bbox, (list, tuple)) or len(bbox) != 4):
    raise ValueError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
  if bbox is None and rle is not None:
    bbox = mask_utils.toBbox(rle).tolist()
  box = inclusive_box(bbox, height, width) if bbox is not None else None
  if rle is not None:
    with warnings.catch_warnings():  # pycocotools' __array__ predates NumPy 2's copy keyword
      warnings.simplefilter("ignore", DeprecationWarning)
      mask = mask_utils.decode(rle)
  else:  # no segmentation: the filled box stands for the object
    mask = np.zeros((height, width), np.uint8)
    if box is not None:
      mask[box[0]:box[2] + 1, box[1]:box[3] + 1] = 1
  return Instance(lookup[cat_id], box, mask, bool(ann.get("iscrowd", 0)))


def _read_image(path: str) -> tuple[np.ndarray, bool]:
  """The image as RGB uint8 [H, W, 3], and whether the file is an RGB JPEG."""
  if not os.path.isfile(path):
    raise features.MissingDataError(f"coco: image file not found: {path}")
  with Image.open(path) as image:
    is_rgb_jpeg = image.format == "JPEG" and image.mode == "RGB"
    if image.mode != "RGB":
      image = image.convert("RGB")
    return np.asarray(image), is_rgb_jpeg


def _resize_box(box, size, new_size):
  return inclusive_box((box[1], box[0], box[3] - box[1] + 1, box[2] - box[0] + 1), *new_size,
                       scale=(new_size[0] / size[0], new_size[1] / size[1]))


def read_example(image_path: str, image_info: Mapping[str, Any],
                 annotations: Sequence[Mapping[str, Any]], lookup: Mapping[int, int],
                 num_classes: int, *, max_instances: int = MAX_INSTANCES,
                 image_size: tuple[int, int] | None = None) -> dict:
  """One image with its labels as NumPy arrays (see the module docstring), plus bookkeeping
  keys ``num_instances``, ``num_crowd`` and ``image_is_rgb_jpeg`` (not stored)."""
  image, is_rgb_jpeg = _read_image(image_path)
  height, width = image.shape[:2]
  expected = (image_info.get("height"), image_info.get("width"))
  if expected != (None, None) and expected != (height, width):
    raise ValueError(f"{image_path}: the image is {height}x{width} but the annotation file says "
                     f"{expected[0]}x{expected[1]}")
  instances, crowds = [], []
  for ann in annotations:
    where = f"{image_path}: annotation {ann.get('id', '?')}"
    inst = decode_annotation(ann, height, width, lookup, where)
    if inst.crowd:
      crowds.append(inst)
    elif inst.box is not None:
      instances.append(inst)

  mask = np.zeros((height, width), np.uint8)
  for inst in crowds:
    mask[inst.mask != 0] = IGNORE_INDEX
  for inst in instances:  # file order: later annotations over earlier ones
    mask[inst.mask != 0] = inst.class_id
  tags = weak_labels.tags_from_mask(mask, num_classes)
  for inst in crowds:
    tags[inst.class_id] = 1.0

  kept = instances
  if len(instances) > max_instances:
    areas = np.asarray([int(inst.mask.sum()) for inst in instances])
    order = np.argsort(-areas, kind="stable")[:max_instances]
    kept = [instances[k] for k in sorted(order.tolist())]
  boxes = np.zeros((max_instances, 4), np.float32)
  classes = np.full((max_instances,), -1, np.int32)
  size = image_size or (height, width)
  instance_masks = np.zeros((max_instances,) + tuple(size), np.uint8)
  for k, inst in enumerate(kept):
    box, inst_mask = inst.box, inst.mask
    if image_size is not None:
      box = _resize_box(box, (height, width), image_size)
      inst_mask = features.resize(inst_mask, image_size, nearest=True)
    if box is None:
      continue
    boxes[k], classes[k], instance_masks[k] = box, inst.class_id, inst_mask
  if image_size is not None:
    image = features.resize(image, image_size, nearest=False)
    mask = features.resize(mask, image_size, nearest=True)
  return {"image": image, "mask": mask, "boxes": boxes, "box_classes": classes, "tags": tags,
          "instance_masks": instance_masks, "num_instances": len(instances),
          "num_crowd": len(crowds), "image_is_rgb_jpeg": is_rgb_jpeg and image_size is None}


def coco_features(image_size: tuple[int, int] | None,
                  max_instances: int) -> tfds.features.FeaturesDict:
  """The stored features: image, mask, boxes, box_classes, tags, instance_masks (no scribble).

  ``tags`` has a free length: the number of classes comes from the annotation files, which
  are read after the schema is made.
  """
  height, width = image_size or (None, None)
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(height, width, 3)),
      "mask": tfds.features.Image(shape=(height, width, 1), encoding_format="png"),
      "boxes": tfds.features.Tensor(shape=(max_instances, 4), dtype=np.float32),
      "box_classes": tfds.features.Tensor(shape=(max_instances,), dtype=np.int32),
      "tags": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      "instance_masks": tfds.features.Tensor(
          shape=(max_instances, height, width), dtype=np.uint8,
          encoding=tfds.features.Encoding.ZLIB),
  })


def encode_example(example: Mapping[str, Any], image_bytes: bytes | None = None) -> dict:
  """What `coco_features` accepts; ``image_bytes`` (an encoded file) replaces the image."""
  return {
      "image": image_bytes if image_bytes is not None else features.png_bytes(example["image"]),
      "mask": features.png_bytes(np.asarray(example["mask"], np.uint8)),
      "boxes": np.asarray(example["boxes"], np.float32),
      "box_classes": np.asarray(example["box_classes"], np.int32),
      "tags": np.asarray(example["tags"], np.float32),
      "instance_masks": np.asarray(example["instance_masks"], np.uint8),
  }


# ----------------------------------------------------------------------------------------------
# The builder.


class JaxsegCoco(tfds.core.GeneratorBasedBuilder):
  """COCO-format instance segmentation from a manual folder in COCO's layout."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [make_config()]
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
  url_infos = None  # Nothing is downloaded (see JaxsegShapes.url_infos).

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    # class_names, category_ids and image_ids come from the annotation files, so they are
    # added in _split_generators; keys set here would override the prepared ones on reload.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=coco_features(config.image_size, config.max_instances),
        metadata=tfds.core.MetadataDict(ignore_label=IGNORE_INDEX),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    splits = find_splits(root)
    config = self.builder_config
    if config.fingerprint and fingerprint(splits) != config.fingerprint:
      raise ValueError(f"coco: the annotation files in {root} changed since this builder was "
                       f"made (config {config.name}); make it again with jaxseg.data.load")
    space, image_ids = None, {}
    for split, (path, _) in splits.items():
      dataset = read_annotations(path)
      this = label_space(dataset["categories"], config.contiguous_ids, path)
      if space is not None and this != space:
        raise ValueError(f"coco: {path} has other categories than the other annotation files")
      space = this
      image_ids[split] = sorted(int(image["id"]) for image in dataset["images"])
      del dataset  # the train json is large: read it again split by split
    thing_classes = [c for c, cat_id in enumerate(space.category_ids) if cat_id]
    self.info.metadata.update(
        class_names=list(space.class_names), category_ids=list(space.category_ids),
        thing_classes=thing_classes, contiguous_ids=config.contiguous_ids,
        max_instances=config.max_instances, image_ids=image_ids)
    return {split: self._generate_examples(split, path, image_dir, space)
            for split, (path, image_dir) in splits.items()}

  def _generate_examples(self, split: str, path: str, image_dir: str, space: LabelSpace):
    config = self.builder_config
    dataset = read_annotations(path)
    images = {}
    for image in dataset["images"]:
      if "id" not in image or "file_name" not in image:
        raise ValueError(f"{path}: every image needs an 'id' and a 'file_name', got {image}")
      images[int(image["id"])] = image
    by_image = {image_id: [] for image_id in images}
    for ann in dataset["annotations"]:
      image_id = ann.get("image_id")
      if image_id not in by_image:
        raise ValueError(f"{path}: annotation {ann.get('id', '?')} refers to image {image_id!r}, "
                         "which is not in 'images'")
      by_image[image_id].append(ann)
    del dataset
    truncated = crowd = empty = 0
    for image_id in sorted(images):
      info = images[image_id]
      image_path = os.path.join(image_dir, info["file_name"])
      example = read_example(image_path, info, by_image.pop(image_id), space.lookup,
                             len(space.class_names), max_instances=config.max_instances,
                             image_size=config.image_size)
      truncated += example["num_instances"] > config.max_instances
      crowd += example["num_crowd"] > 0
      empty += example["num_instances"] == 0
      image_bytes = None
      if example["image_is_rgb_jpeg"]:
        with open(image_path, "rb") as f:  # its own bytes decode to the same pixels
          image_bytes = f.read()
      yield image_id, encode_example(example, image_bytes)
    print(f"coco/{config.name} {split}: {len(images)} images, {empty} without instances, "
          f"{crowd} with crowd regions, {truncated} with more than {config.max_instances} "
          "instances (largest kept)")


def _prepared_configs(data_dir: str, options: str) -> list[str]:
  """Names of the configs of this setting (any annotation files) prepared in ``data_dir``."""
  folder = os.path.join(data_dir, JaxsegCoco.name)
  if not os.path.isdir(folder):
    return []
  return sorted(n for n in os.listdir(folder)
                if re.fullmatch(re.escape(options) + r"_[0-9a-f]{8}", n))


def make_builder(data_dir: str, manual_dir=None, image_size=None,
                 max_instances: int = MAX_INSTANCES,
                 contiguous_ids: bool = True) -> tuple[JaxsegCoco, object]:
  """The builder for `jaxseg.data.load`.

  The config follows the annotation files found in the folder. Without the folder, the one
  prepared config of the same setting is used; otherwise `features.MissingDataError` says what
  to download and where to put it.
  """
  root = resolve_root(manual_dir)
  make = lambda fp: make_config(image_size, max_instances, contiguous_ids, fp)
  options = make("").name
  if os.path.isdir(os.path.join(root, "annotations")):
    config = make(fingerprint(find_splits(root)))
  else:
    prepared = [n for n in _prepared_configs(data_dir, options)
                if JaxsegCoco(data_dir=data_dir, config=make(n[-8:]),
                              file_format="array_record").is_prepared()]
    if len(prepared) > 1:
      raise features.MissingDataError(
          f"coco: {root} is missing and {data_dir} holds {len(prepared)} prepared copies of the "
          f"setting {options} (from different annotation files: {prepared}); pass the "
          f"manual_dir they were made from.\n{LAYOUT}")
    if not prepared:
      find_splits(root)  # raises, naming what is missing
    config = make(prepared[0][-8:])
  builder = JaxsegCoco(data_dir=data_dir, config=config, file_format="array_record")
  return builder, tfds.download.DownloadConfig(manual_dir=root)
