"""``jaxseg_cityscapes``: Cityscapes fine annotations (19 train ids), prepared offline without
TensorFlow.

The data needs a login and is never downloaded: it is read from the folder the user extracted
``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` into::

  source = jaxseg.data.load("cityscapes", "train", manual_dir="/data/cityscapes",
                            image_size=(512, 1024))

``manual_dir`` defaults to ``$JAXSEG_SHARED_DATA/cityscapes``. Layout read (the zips' own, see
`LAYOUT`): ``leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png``; splits ``train`` (2,975 images) and
``validation`` (``val``, 500). The test split is skipped: its public labels are all void.

Label ids 0-33 map to the 19 train ids of cityscapesScripts' ``helpers/labels.py``
(`LABEL_TO_TRAIN_ID`); the other ids (unlabeled, ego vehicle, parking, rail track, guard rail,
bridge, tunnel, polegroup, caravan, trailer, ...) become 255. Values above 33 raise (a
``*_labelTrainIds.png`` or colour PNG given by mistake).

Instances: from ``<stem>_gtFine_instanceIds.png`` when present (values >= 1000 are
``labelId * 1000 + k``; the 8 largest instances of the 8 "thing" train ids kept), otherwise
connected components of the thing classes (touching objects of one class merge). Boxes are
their tight boxes; tags the classes present; scribbles are synthesised from the masks
(`jaxseg.data.weak_labels`, seeded by the file name). Synthesis costs about a second per
full-resolution image at preparation.

``image_size=(height, width)`` resizes at preparation (images bilinear, labels nearest), e.g.
``(512, 1024)`` for small machines; each size prepares into its own TFDS config (``native``,
``512x1024``). At native size the original PNG bytes are stored as they are.
"""
from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxseg.constants import IGNORE_INDEX
from jaxseg.data import features, weak_labels

CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
               "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
               "bus", "train", "motorcycle", "bicycle")
NUM_CLASSES = len(CLASS_NAMES)
# Each train id's colour in cityscapesScripts' helpers/labels.py.
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
           (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
           (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
           (0, 80, 100), (0, 0, 230), (119, 11, 32))
# labelId -> trainId for ids 0..33, from cityscapesScripts' helpers/labels.py (255 = ignored).
LABEL_TO_TRAIN_ID = (
    255, 255, 255, 255, 255, 255, 255,  # 0 unlabeled, ego vehicle, rectification border,
                                        #   out of roi, static, dynamic, ground
    0, 1,                               # 7 road, 8 sidewalk
    255, 255,                           # 9 parking, 10 rail track
    2, 3, 4,                            # 11 building, 12 wall, 13 fence
    255, 255, 255,                      # 14 guard rail, 15 bridge, 16 tunnel
    5, 255, 6, 7,                       # 17 pole, 18 polegroup, 19 traffic light, 20 traffic sign
    8, 9, 10,                           # 21 vegetation, 22 terrain, 23 sky
    11, 12,                             # 24 person, 25 rider
    13, 14, 15,                         # 26 car, 27 truck, 28 bus
    255, 255,                           # 29 caravan, 30 trailer
    16, 17, 18,                         # 31 train, 32 motorcycle, 33 bicycle
)
NUM_LABEL_IDS = len(LABEL_TO_TRAIN_ID)  # 34
THING_CLASSES = tuple(range(11, 19))    # person .. bicycle: the classes with instances
STUFF_CLASSES = tuple(range(11))
SPLIT_FOLDERS = {"train": "train", "validation": "val"}
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"

LAYOUT = """\
Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from
https://www.cityscapes-dataset.com/downloads/ (free login needed) and unzip both into one folder:
  $JAXSEG_SHARED_DATA/cityscapes/         or pass manual_dir=<folder>
    leftImg8bit/train/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    leftImg8bit/val/<city>/...
    gtFine/train/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png    (and _instanceIds.png)
    gtFine/val/<city>/..."""

_LUT = np.full(256, IGNORE_INDEX, np.uint8)
_LUT[:NUM_LABEL_IDS] = LABEL_TO_TRAIN_ID


@dataclasses.dataclass(eq=False)
class CityscapesConfig(tfds.core.BuilderConfig):
  """``image_size`` None keeps the native 1024x2048."""
  image_size: tuple[int, int] | None = None


def make_config(image_size=None) -> CityscapesConfig:
  image_size, name = features.image_size_name(image_size)
  return CityscapesConfig(name=name, image_size=image_size,
                          description=f"Cityscapes gtFine at {name} resolution")


def default_manual_dir() -> str:
  """``$JAXSEG_SHARED_DATA/cityscapes`` (default ``../shared/data/cityscapes``)."""
  from jaxseg.configs import shared_data_dir  # the one definition of the shared data folder
  return shared_data_dir("cityscapes")


def to_train_ids(label_ids: np.ndarray, path: str = "labelIds") -> np.ndarray:
  """uint8 [H, W] train ids (0-18, 255) from Cityscapes label ids (0-33)."""
  label_ids = np.asarray(label_ids)
  if label_ids.size and (label_ids.min() < 0 or label_ids.max() >= NUM_LABEL_IDS):
    raise ValueError(f"{path}: label ids must lie in [0, {NUM_LABEL_IDS - 1}], found "
                     f"[{label_ids.min()}, {label_ids.max()}] (is this a *_labelIds.png file?)")
  return _LUT[label_ids.astype(np.int64)]


def split_files(manual_dir: str) -> dict[str, list[tuple[str, str]]]:
  """Split -> sorted (image, labelIds) paths; raises `features.MissingDataError` with `LAYOUT`."""
  missing = [os.path.join(top, folder) for top in ("leftImg8bit", "gtFine")
             for folder in SPLIT_FOLDERS.values()
             if not os.path.isdir(os.path.join(manual_dir, top, folder))]
  if missing:
    where = "folder not found" if not os.path.isdir(manual_dir) else f"missing {', '.join(missing)}"
    raise features.MissingDataError(f"cityscapes: {manual_dir}: {where}.\n{LAYOUT}")
  splits = {}
  for split, folder in SPLIT_FOLDERS.items():
    image_root = os.path.join(manual_dir, "leftImg8bit", folder)
    pairs = []
    for city in sorted(os.listdir(image_root)):
      city_dir = os.path.join(image_root, city)
      if not os.path.isdir(city_dir):
        continue
      for name in sorted(os.listdir(city_dir)):
        if not name.endswith(IMAGE_SUFFIX):
          continue
        stem = name[:-len(IMAGE_SUFFIX)]
        label = os.path.join(manual_dir, "gtFine", folder, city, stem + LABEL_SUFFIX)
        if not os.path.isfile(label):
          raise features.MissingDataError(f"cityscapes: label file not found: {label}")
        pairs.append((os.path.join(city_dir, name), label))
    if not pairs:
      raise features.MissingDataError(f"cityscapes: no *{IMAGE_SUFFIX} images in {image_root}\n{LAYOUT}")
    splits[split] = pairs
  return splits


def instances_from_ids(instance_ids: np.ndarray, max_instances: int) -> tuple[np.ndarray, np.ndarray]:
  """Thing instances of an ``instanceIds`` map, the ``max_instances`` largest, padded.

  Returns:
    ``(instance_masks uint8 [M, H, W], classes int32 [M])`` ordered by instance id.
  """
  values, counts = np.unique(instance_ids, return_counts=True)
  keep = values >= 1000
  values, counts = values[keep], counts[keep]
  classes = _LUT[np.minimum(values // 1000, 255).astype(np.int64)].astype(np.int32)
  thing = np.isin(classes, THING_CLASSES)
  values, counts, classes = values[thing], counts[thing], classes[thing]
  if len(values) > max_instances:
    order = np.sort(np.argsort(-counts, kind="stable")[:max_instances])
    values, classes = values[order], classes[order]
  masks = (instance_ids[None] == values[:, None, None]).astype(np.uint8)
  return weak_labels.pad_instances(masks, classes, max_instances)


def read_example(image_path: str, label_path: str, image_size=None) -> dict[str, np.ndarray]:
  """One image, its train-id mask and weak labels (instances from instanceIds when present)."""
  image = features.read_png(image_path, "RGB")
  label_ids = features.read_png(label_path)
  if label_ids.ndim != 2:
    raise ValueError(f"{label_path}: expected a single-channel labelIds PNG, got shape {label_ids.shape}")
  if label_ids.shape != image.shape[:2]:
    raise ValueError(f"{label_path}: label size {label_ids.shape} differs from image {image.shape[:2]}")
  mask = to_train_ids(label_ids, label_path)
  image = features.resize(image, image_size, nearest=False)
  mask = features.resize(mask, image_size, nearest=True)
  example = {"image": image, "mask": mask}
  instance_path = label_path[:-len(LABEL_SUFFIX)] + INSTANCE_SUFFIX
  if os.path.isfile(instance_path):
    instance_ids = features.read_png(instance_path).astype(np.int32)
    if instance_ids.shape != label_ids.shape:
      raise ValueError(f"{instance_path}: size {instance_ids.shape} differs from {label_ids.shape}")
    instance_ids = features.resize(instance_ids, image_size, nearest=True)
    example["instance_masks"], example["box_classes"] = instances_from_ids(
        instance_ids, features.MAX_INSTANCES)
  # Seeded by the file name, as features.with_weak_labels seeds; synthesize keeps the instances
  # given and derives the boxes from them.
  seed = zlib.crc32(os.path.basename(image_path).encode())
  out = weak_labels.synthesize(example, seed, num_classes=NUM_CLASSES, background=STUFF_CLASSES,
                               max_instances=features.MAX_INSTANCES)
  out["scribble"] = out["scribble"].astype(np.uint8)
  return out


def _png_is_rgb8(path: str) -> bool:
  with Image.open(path) as image:
    return image.format == "PNG" and image.mode == "RGB"


class JaxsegCityscapes(tfds.core.GeneratorBasedBuilder):
  """Cityscapes gtFine, 19 train ids, from a manual folder in the official layout."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [make_config()]
  DEFAULT_CONFIG_NAME = "native"
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
  CLASS_NAMES = CLASS_NAMES
  url_infos = None  # Nothing is downloaded (see JaxsegShapes.url_infos).

  def _info(self) -> tfds.core.DatasetInfo:
    return features.dataset_info(self, __doc__, CLASS_NAMES, self.builder_config.image_size,
                                 thing_classes=list(THING_CLASSES))

  def _split_generators(self, dl_manager):
    splits = split_files(os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(split, pairs) for split, pairs in splits.items()}

  def _generate_examples(self, split: str, pairs):
    size = self.builder_config.image_size
    labelled = total = 0
    for index, (image_path, label_path) in enumerate(pairs):
      example = read_example(image_path, label_path, size)
      labelled += int((example["scribble"] != IGNORE_INDEX).sum())
      total += example["scribble"].size
      if size is None and _png_is_rgb8(image_path):
        # At native size the file already is a lossless RGB PNG: store its bytes (decoding gives
        # the same pixels) instead of re-encoding 2048x1024 pixels (~0.2 s each).
        out = features.encode_example({**example, "image": np.zeros((1, 1, 3), np.uint8)})
        with open(image_path, "rb") as f:
          out["image"] = f.read()
      else:
        out = features.encode_example(example)
      yield index, out
    print(f"cityscapes/{self.builder_config.name} {split}: {len(pairs)} examples, "
          f"scribble coverage {labelled / max(total, 1):.2%}")


def make_builder(data_dir: str, manual_dir=None, image_size=None) -> tuple[JaxsegCityscapes, object]:
  """The builder for `jaxseg.data.load`; the manual folder is checked unless already prepared."""
  manual_dir = default_manual_dir() if manual_dir is None else os.fspath(manual_dir)
  config = make_config(image_size)
  config = config.name if config.name in {c.name for c in JaxsegCityscapes.BUILDER_CONFIGS} else config
  builder = JaxsegCityscapes(data_dir=data_dir, config=config, file_format="array_record")
  if not builder.is_prepared():
    split_files(manual_dir)
  return builder, tfds.download.DownloadConfig(manual_dir=manual_dir)
