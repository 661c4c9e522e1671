"""``jaxseg_voc2012``: PASCAL VOC 2012 segmentation, with SBD's train_aug masks and ScribbleSup's
scribbles when present, prepared offline without TensorFlow.

The data is never downloaded: it is read from the folder the user extracted it into::

  source = jaxseg.data.load("voc2012", "train_aug", manual_dir="/data/VOCdevkit/VOC2012")

``manual_dir`` defaults to ``$JAXSEG_SHARED_DATA/voc2012``; a folder holding
``VOCdevkit/VOC2012`` or ``VOC2012`` works too. Layout read (VOC's own, see `LAYOUT`):

* ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs whose indices are the
  class ids 0-20, 255 = the void border, kept as ignore), ``ImageSets/Segmentation/{train,val}.txt``:
  splits ``train`` (1,464 images) and ``validation`` (val.txt, 1,449 images).
* ``SegmentationObject/<id>.png`` (optional): instance ids 1..K, 0 background, 255 border.
* ``Annotations/<id>.xml`` (optional): detection boxes, ``bndbox`` 1-based inclusive, become
  ``boxes`` (y0, x0, y1, x1) 0-based inclusive, rounded to whole pixels and clipped to the image.
* ``SegmentationClassAug/<id>.png`` (optional, SBD's masks as distributed with DeepLab: grey or
  palette PNGs with values 0-20 and 255): adds the split ``train_aug``, read from
  ``ImageSets/Segmentation/train_aug.txt`` when present (plain ids or DeepLab's
  ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` lines), otherwise every id with a
  ``SegmentationClassAug`` PNG and a JPEG; val.txt's ids are removed in both cases (10,582 images
  with the usual 12,031-file release). train_aug masks come from ``SegmentationClassAug``.
* ``pascal_2012/<id>.xml`` or ``scribble_annotation/pascal_2012/<id>.xml`` (optional):
  ScribbleSup's scribbles, drawn with `jaxseg.data.scribblesup` at ``scribble_width`` pixels
  (3, as rloss' ``pascal_2012_scribble`` PNGs). An image without a file gets no scribble (all
  255). Without the folder, scribbles are synthesised from the masks
  (`jaxseg.data.weak_labels.scribbles_from_mask`, seeded by the file name).

Instances and boxes share one list per example (``box_classes`` is the class of both):

* one entry per ``Annotations`` object, with its XML box. ``difficult`` objects are kept by
  default: their pixels are not background in the masks (their class or void), so dropping
  their boxes would let a box loss push them to background (``include_difficult=False`` drops
  them, and their instances).
* its instance mask is the ``SegmentationObject`` region paired with it: id k with the k-th
  object (VOC's numbering) when the classes agree, otherwise the same-class object of highest
  box IoU. Objects with no region (no ``SegmentationObject`` file, as for SBD's train_aug
  images) get the pixels of their class inside their box (the whole box if there are none), an
  approximation that merges overlapping same-class objects.
* instance regions paired with no object become entries with their tight box; an image with
  neither file gets connected components of the classes (`weak_labels.instances_from_mask`).
* at most ``max_instances`` entries (default 8, like the other builders), the largest boxes;
  the rest are dropped (some VOC images have more objects: raise it for box supervision, at
  ``max_instances * H * W / 8`` more bytes per cached example). Padding has class -1.

Note that `jaxseg.data.train_batches` recomputes boxes from the instance masks after
augmentation, so training batches carry the masks' tight boxes (VOC's void border excluded)
rather than the XML boxes; `Source` returns the XML boxes.

``tags`` are the classes present in the mask; ``tags_large`` (CCNN's size bit: classes over 10%
of the image's pixels) is not stored but derived from the mask on read, as for every builder
(`jaxseg.data.features.expand_example`).

Each setting (``scribble_width``, ``max_instances``, ``include_difficult``) and each set of
optional parts found in the folder prepares into its own TFDS config, so adding SBD or
ScribbleSup later prepares afresh instead of serving stale data.
"""
from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxseg.constants import IGNORE_INDEX
from jaxseg.data import features, scribblesup, weak_labels

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
NUM_CLASSES = len(CLASS_NAMES)
THING_CLASSES = tuple(range(1, NUM_CLASSES))
# Optional parts of the folder; the ones found are part of the TFDS config name.
PARTS = ("aug", "boxes", "objects", "scribblesup")
SPLIT_LISTS = {"train": "train.txt", "validation": "val.txt"}

LAYOUT = """\
Download VOCtrainval_11-May-2012.tar from the PASCAL VOC 2012 site
(http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) and extract it so that this tree exists
(the folder itself, or a folder holding VOCdevkit/VOC2012):
  $JAXSEG_SHARED_DATA/voc2012/            or pass manual_dir=<folder>
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png            palette PNGs, class ids 0-20, 255 = border
    ImageSets/Segmentation/train.txt, val.txt
    SegmentationObject/<id>.png           (in the tar) instances
    Annotations/<id>.xml                  (in the tar) boxes
  optional:
    SegmentationClassAug/<id>.png         SBD's 10,582-image train_aug masks
                                          (SegmentationClassAug.zip, as used by DeepLab)
    ImageSets/Segmentation/train_aug.txt  (else: the SegmentationClassAug files minus val)
    pascal_2012/<id>.xml                  ScribbleSup scribbles (scribble_annotation.zip,
                                          jifengdai.org/downloads/scribble_sup)"""


@dataclasses.dataclass(frozen=True)
class VocObject:
  """One object of a VOC annotation file.

  Attributes:
    class_id: 1..20.
    box: (y0, x0, y1, x1), 0-based inclusive pixel coordinates.
    difficult: VOC's ``difficult`` flag.
  """
  class_id: int
  box: tuple[int, int, int, int]
  difficult: bool


@dataclasses.dataclass(eq=False)
class Voc2012Config(tfds.core.BuilderConfig):
  scribble_width: int = 3
  max_instances: int = features.MAX_INSTANCES
  include_difficult: bool = True
  parts: tuple[str, ...] = ()


def _options_name(scribble_width: int, max_instances: int, include_difficult: bool) -> str:
  return f"w{scribble_width}_m{max_instances}_{'diff' if include_difficult else 'nodiff'}"


def make_config(scribble_width: int = 3, max_instances: int = features.MAX_INSTANCES,
                include_difficult: bool = True, parts=()) -> Voc2012Config:
  """The config of one setting and one set of optional parts (see `PARTS`)."""
  if int(scribble_width) < 1 or int(scribble_width) % 2 != 1:
    raise ValueError(f"scribble_width must be a positive odd integer, got {scribble_width}")
  if int(max_instances) < 1:
    raise ValueError(f"max_instances must be >= 1, got {max_instances}")
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise ValueError(f"unknown parts {unknown}; valid: {PARTS}")
  parts = tuple(p for p in PARTS if p in parts)
  options = _options_name(int(scribble_width), int(max_instances), bool(include_difficult))
  name = "_".join((options,) + parts)
  return Voc2012Config(
      name=name, scribble_width=int(scribble_width), max_instances=int(max_instances),
      include_difficult=bool(include_difficult), parts=parts,
      description=f"VOC 2012 with {', '.join(parts) or 'no optional parts'}; {options}")


# ----------------------------------------------------------------------------------------------
# The folder.


def default_manual_dir() -> str:
  """``$JAXSEG_SHARED_DATA/voc2012`` (default ``../shared/data/voc2012`` next to the checkout)."""
  from jaxseg.configs import shared_data_dir  # the one definition of the shared data folder
  return shared_data_dir("voc2012")


def resolve_root(manual_dir=None) -> str:
  """The VOC2012 folder: ``manual_dir`` itself, or its ``VOCdevkit/VOC2012`` or ``VOC2012``."""
  root = default_manual_dir() if manual_dir is None else os.fspath(manual_dir)
  for sub in (os.path.join("VOCdevkit", "VOC2012"), "VOC2012"):
    if os.path.isdir(os.path.join(root, sub, "JPEGImages")):
      return os.path.join(root, sub)
  return root


def _scribble_dir(root: str) -> str | None:
  for sub in ("pascal_2012", os.path.join("scribble_annotation", "pascal_2012")):
    if os.path.isdir(os.path.join(root, sub)):
      return os.path.join(root, sub)
  return None


def check_layout(root: str) -> None:
  """Raises `features.MissingDataError` naming what is missing and what to download."""
  needed = ["JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")]
  needed += [os.path.join("ImageSets", "Segmentation", f) for f in SPLIT_LISTS.values()]
  missing = [n for n in needed if not os.path.exists(os.path.join(root, n))]
  if missing:
    where = "folder not found" if not os.path.isdir(root) else f"missing {', '.join(missing)}"
    raise features.MissingDataError(f"voc2012: {root}: {where}.\n{LAYOUT}")


def find_parts(root: str) -> tuple[str, ...]:
  """The optional parts (`PARTS`) present in ``root``."""
  found = {"aug": os.path.isdir(os.path.join(root, "SegmentationClassAug")),
           "boxes": os.path.isdir(os.path.join(root, "Annotations")),
           "objects": os.path.isdir(os.path.join(root, "SegmentationObject")),
           "scribblesup": _scribble_dir(root) is not None}
  return tuple(p for p in PARTS if found[p])


def read_id_list(path: str) -> list[str]:
  """Image ids of a list file: one per line, either a bare id or DeepLab's
  ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` form (first path's stem)."""
  ids = []
  with open(path) as f:
    for line in f:
      fields = line.split()
      if fields:
        ids.append(os.path.splitext(os.path.basename(fields[0]))[0])
  return ids


def split_ids(root: str) -> dict[str, list[str]]:
  """Split name -> image ids: ``train``, ``validation`` and, with SBD's masks, ``train_aug``."""
  check_layout(root)
  lists = os.path.join(root, "ImageSets", "Segmentation")
  splits = {split: read_id_list(os.path.join(lists, name)) for split, name in SPLIT_LISTS.items()}
  aug_dir = os.path.join(root, "SegmentationClassAug")
  if os.path.isdir(aug_dir):
    listed = os.path.join(lists, "train_aug.txt")
    if os.path.isfile(listed):
      ids = read_id_list(listed)
    else:
      ids = sorted(os.path.splitext(n)[0] for n in os.listdir(aug_dir) if n.endswith(".png"))
      ids = [i for i in ids if os.path.isfile(os.path.join(root, "JPEGImages", f"{i}.jpg"))]
    val = set(splits["validation"])
    splits["train_aug"] = [i for i in ids if i not in val]
  for split, ids in splits.items():
    if not ids:
      raise features.MissingDataError(f"voc2012: the {split} list in {root} is empty.\n{LAYOUT}")
  return splits


# ----------------------------------------------------------------------------------------------
# Files.


def read_label_png(path: str, num_classes: int = NUM_CLASSES) -> np.ndarray:
  """A class-id PNG (palette or grey) as uint8 [H, W]; the palette is not applied."""
  if not os.path.isfile(path):
    raise features.MissingDataError(f"voc2012: label file not found: {path}")
  with Image.open(path) as image:
    if image.mode not in ("P", "L"):
      raise ValueError(f"{path}: expected a palette or grey PNG of class ids, got mode "
                       f"{image.mode!r} (colour-converted masks cannot be read back)")
    label = np.asarray(image)
  bad = (label >= num_classes) & (label != IGNORE_INDEX)
  if bad.any():
    raise ValueError(f"{path}: values must be class ids 0-{num_classes - 1} or {IGNORE_INDEX}, "
                     f"found {sorted(set(np.unique(label[bad]).tolist()))[:5]}")
  return label


def read_voc_xml(path: str, height: int | None = None, width: int | None = None) -> list[VocObject]:
  """The objects of a VOC annotation file, in file order.

  ``bndbox`` (xmin, ymin, xmax, ymax; 1-based inclusive) becomes (y0, x0, y1, x1) 0-based
  inclusive, rounded to whole pixels and clipped to the image when its size is given. Objects
  without a ``bndbox`` are skipped; parts (``object/part``) are not objects.

  Raises:
    FileNotFoundError; ValueError on malformed XML or an unknown class name.
  """
  if not os.path.isfile(path):
    raise features.MissingDataError(f"voc2012: annotation not found: {path}")
  try:
    root = ET.parse(path).getroot()
  except ET.ParseError as e:
    raise ValueError(f"{path}: not valid XML ({e})") from e
  lookup = {name: i for i, name in enumerate(CLASS_NAMES)}
  objects = []
  for k, node in enumerate(root.findall("object")):
    name = (node.findtext("name") or "").strip().lower()
    if name not in lookup or name == "background":
      raise ValueError(f"{path}: object #{k} has unknown class {name!r}")
    box = node.find("bndbox")
    if box is None:
      continue
    try:
      x0, y0, x1, y1 = (int(round(float(box.findtext(t)))) - 1
                        for t in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, ValueError) as e:
      raise ValueError(f"{path}: object #{k} has a malformed bndbox") from e
    if height is not None:
      y0, y1 = min(max(y0, 0), height - 1), min(max(y1, 0), height - 1)
    if width is not None:
      x0, x1 = min(max(x0, 0), width - 1), min(max(x1, 0), width - 1)
    difficult = (node.findtext("difficult") or "0").strip() == "1"
    objects.append(VocObject(lookup[name], (y0, x0, y1, x1), difficult))
  return objects


def _tight_box(region: np.ndarray) -> tuple[int, int, int, int]:
  ys, xs = np.nonzero(region)
  return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def _iou(a, b) -> float:
  h = min(a[2], b[2]) - max(a[0], b[0]) + 1
  w = min(a[3], b[3]) - max(a[1], b[1]) + 1
  if h <= 0 or w <= 0:
    return 0.0
  area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)
  return h * w / (area(a) + area(b) - h * w)


def _box_region(mask: np.ndarray, obj: VocObject) -> np.ndarray:
  """The object's class pixels inside its box (the whole box if there are none)."""
  y0, x0, y1, x1 = obj.box
  region = np.zeros(mask.shape, bool)
  region[y0:y1 + 1, x0:x1 + 1] = mask[y0:y1 + 1, x0:x1 + 1] == obj.class_id
  if not region.any():
    region[y0:y1 + 1, x0:x1 + 1] = True
  return region


def instance_entries(mask: np.ndarray, objects: list[VocObject] | None,
                     instance_map: np.ndarray | None) -> list[tuple[int, tuple, np.ndarray, bool]]:
  """Pairs annotation objects with ``SegmentationObject`` regions (see the module docstring).

  Args:
    mask: uint8 [H, W] class ids (255 ignore).
    objects: the annotation's objects, or None without an annotation file.
    instance_map: uint8 [H, W] ``SegmentationObject`` ids, or None.

  Returns:
    ``[(class_id, (y0, x0, y1, x1), region bool [H, W], difficult), ...]``: objects in file
    order, then unpaired regions by id.
  """
  if objects is None and instance_map is None:
    regions, classes = weak_labels.instances_from_mask(mask, background=(0,))
    return [(int(c), _tight_box(r), r != 0, False) for r, c in zip(regions, classes)]
  objects = objects or []
  region_class = {}
  if instance_map is not None:
    for i in np.unique(instance_map).tolist():
      if i in (0, IGNORE_INDEX):
        continue
      pixels = mask[instance_map == i]
      pixels = pixels[pixels != IGNORE_INDEX]
      if pixels.size:  # the region's class is its majority class in SegmentationClass
        c = int(np.bincount(pixels, minlength=NUM_CLASSES).argmax())
        if c != 0:
          region_class[i] = c
  paired = {}  # object index -> region id
  # First VOC's numbering (region k is the k-th XML object), trusted only where the classes
  # agree; then the unpaired regions by box IoU, so a file numbered otherwise still pairs.
  for i, c in region_class.items():
    k = i - 1
    if k < len(objects) and objects[k].class_id == c:
      paired[k] = i
  for i, c in region_class.items():
    if i in paired.values():
      continue
    box = _tight_box(instance_map == i)
    scores = [(_iou(box, o.box), -k) for k, o in enumerate(objects)
              if k not in paired and o.class_id == c]
    if scores and max(scores)[0] > 0:
      paired[-max(scores)[1]] = i
  entries = []
  for k, obj in enumerate(objects):
    region = instance_map == paired[k] if k in paired else _box_region(mask, obj)
    entries.append((obj.class_id, obj.box, region, obj.difficult))
  for i, c in region_class.items():
    if i not in paired.values():
      region = instance_map == i
      entries.append((c, _tight_box(region), region, False))
  return entries


def pack_entries(entries, shape, max_instances: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The largest ``max_instances`` entries (by box area, file order kept), padded.

  Returns:
    ``(boxes float32 [M, 4], box_classes int32 [M], instance_masks uint8 [M, H, W])``.
  """
  if len(entries) > max_instances:
    areas = [(b[2] - b[0] + 1) * (b[3] - b[1] + 1) for _, b, _, _ in entries]
    keep = sorted(np.argsort(-np.asarray(areas), kind="stable")[:max_instances].tolist())
    entries = [entries[k] for k in keep]
  boxes = np.zeros((max_instances, 4), np.float32)
  classes = np.full((max_instances,), -1, np.int32)
  masks = np.zeros((max_instances,) + tuple(shape), np.uint8)
  for k, (c, box, region, _) in enumerate(entries):
    boxes[k], classes[k], masks[k] = box, c, region
  return boxes, classes, masks


def read_example(root: str, image_id: str, split: str, config: Voc2012Config) -> dict:
  """One image with its mask and weak labels, as NumPy arrays (plus bookkeeping keys
  ``scribble_source`` and ``num_entries``, which are not stored)."""
  image = features.read_png(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), "RGB")
  mask_dir = "SegmentationClassAug" if split == "train_aug" else "SegmentationClass"
  mask_path = os.path.join(root, mask_dir, f"{image_id}.png")
  mask = read_label_png(mask_path)
  if mask.shape != image.shape[:2]:
    raise ValueError(f"{mask_path}: mask size {mask.shape} differs from image {image.shape[:2]}")
  height, width = mask.shape

  instance_map = None
  object_path = os.path.join(root, "SegmentationObject", f"{image_id}.png")
  if "objects" in config.parts and os.path.isfile(object_path):
    with Image.open(object_path) as im:
      instance_map = np.asarray(im)
    if instance_map.shape != mask.shape:
      raise ValueError(f"{object_path}: size {instance_map.shape} differs from the mask {mask.shape}")
  objects = None
  xml_path = os.path.join(root, "Annotations", f"{image_id}.xml")
  if "boxes" in config.parts and os.path.isfile(xml_path):
    objects = read_voc_xml(xml_path, height, width)
  entries = instance_entries(mask, objects, instance_map)
  if not config.include_difficult:
    entries = [e for e in entries if not e[3]]
  boxes, box_classes, instance_masks = pack_entries(entries, mask.shape, config.max_instances)

  scribble_dir = _scribble_dir(root) if "scribblesup" in config.parts else None
  if scribble_dir is not None:
    scribble_path = os.path.join(scribble_dir, f"{image_id}.xml")
    if os.path.isfile(scribble_path):
      h, w, polylines = scribblesup.read_scribblesup_xml(scribble_path, CLASS_NAMES)
      if (h, w) != (height, width):
        raise ValueError(f"{scribble_path}: size {(h, w)} differs from the image {(height, width)}")
      scribble = scribblesup.rasterize_scribbles(height, width, polylines,
                                                 width_px=config.scribble_width)
      source = "scribblesup"
    else:
      scribble = np.full(mask.shape, IGNORE_INDEX, np.int32)
      source = "none"
  else:
    seed = zlib.crc32(f"{image_id}.jpg".encode())  # as features.with_weak_labels seeds
    scribble = weak_labels.scribbles_from_mask(mask, seed, width=config.scribble_width)
    source = "synthetic"
  return {
      "image": image, "mask": mask, "scribble": scribble.astype(np.uint8),
      "boxes": boxes, "box_classes": box_classes, "instance_masks": instance_masks,
      "tags": weak_labels.tags_from_mask(mask, NUM_CLASSES),
      "scribble_source": source, "num_entries": len(entries),
  }


# ----------------------------------------------------------------------------------------------
# The builder.


class JaxsegVoc2012(tfds.core.GeneratorBasedBuilder):
  """PASCAL VOC 2012, 21 classes, from a manual folder in VOC's layout (+ SBD, + ScribbleSup)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [make_config()]
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
  CLASS_NAMES = CLASS_NAMES
  url_infos = None  # Nothing is downloaded (see JaxsegShapes.url_infos).

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=features.segmentation_features(None, None, NUM_CLASSES, config.max_instances),
        metadata=tfds.core.MetadataDict(
            class_names=list(CLASS_NAMES), ignore_label=IGNORE_INDEX,
            thing_classes=list(THING_CLASSES), parts=list(config.parts),
            scribble_source="scribblesup" if "scribblesup" in config.parts else "synthetic"),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    root = resolve_root(dl_manager.manual_dir)
    found = find_parts(root)
    if found != self.builder_config.parts:
      raise features.MissingDataError(
          f"voc2012: config {self.builder_config.name} expects the parts "
          f"{self.builder_config.parts} but {root} has {found}")
    return {split: self._generate_examples(root, split, ids)
            for split, ids in split_ids(root).items()}

  def _generate_examples(self, root: str, split: str, ids: list[str]):
    config = self.builder_config
    sources = {}
    truncated = labelled = total = 0
    for index, image_id in enumerate(ids):
      example = read_example(root, image_id, split, config)
      source = example.pop("scribble_source")
      sources[source] = sources.get(source, 0) + 1
      truncated += example.pop("num_entries") > config.max_instances
      labelled += int((example["scribble"] != IGNORE_INDEX).sum())
      total += example["scribble"].size
      yield index, features.encode_example(example)
    print(f"voc2012/{config.name} {split}: {len(ids)} examples, scribbles "
          f"{dict(sorted(sources.items()))}, coverage {labelled / max(total, 1):.2%}, "
          f"{truncated} with more than {config.max_instances} objects (largest kept)")


def _prepared_configs(data_dir: str, options: str) -> list[str]:
  """Names of the prepared configs of this setting in ``data_dir``, most parts first."""
  folder = os.path.join(data_dir, JaxsegVoc2012.name)
  if not os.path.isdir(folder):
    return []
  names = [n for n in os.listdir(folder)
           if n == options or (n.startswith(options + "_")
                               and set(n[len(options) + 1:].split("_")) <= set(PARTS))]
  return sorted(names, key=lambda n: (-len(n.split("_")), n))


def make_builder(data_dir: str, manual_dir=None, scribble_width: int = 3,
                 max_instances: int = features.MAX_INSTANCES,
                 include_difficult: bool = True) -> tuple[JaxsegVoc2012, object]:
  """The builder for `jaxseg.data.load`.

  The config follows the optional parts found in the folder. Without the folder, an already
  prepared config of the same setting is used (the one with the most parts); otherwise
  `features.MissingDataError` says what to download and where to put it.
  """
  root = resolve_root(manual_dir)
  make = lambda parts: make_config(scribble_width, max_instances, include_difficult, parts)
  if os.path.isdir(os.path.join(root, "JPEGImages")):
    check_layout(root)
    config = make(find_parts(root))
  else:
    options = _options_name(int(scribble_width), int(max_instances), bool(include_difficult))
    for name in _prepared_configs(data_dir, options):
      parts = tuple(name[len(options) + 1:].split("_")) if name != options else ()
      builder = JaxsegVoc2012(data_dir=data_dir, config=make(parts), file_format="array_record")
      if builder.is_prepared():
        return builder, tfds.download.DownloadConfig(manual_dir=root)
    check_layout(root)  # raises
  config = config.name if config.name in {c.name for c in JaxsegVoc2012.BUILDER_CONFIGS} else config
  builder = JaxsegVoc2012(data_dir=data_dir, config=config, file_format="array_record")
  return builder, tfds.download.DownloadConfig(manual_dir=root)
