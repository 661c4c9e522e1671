"""``jaxseg_isbi2012``: the ISBI 2012 EM segmentation challenge training stack, offline.

The data is never downloaded: pass the folder holding it::

  source = jaxseg.data.load("isbi2012", "train", manual_dir="/data/isbi2012")

Layout read: ``image/<k>.png`` (grayscale 512x512 slices) and ``label/<k>.png`` with the same
names, ordered by the number in the name. Label PNGs hold 0 on membranes (black) and 255 inside
cells (white); they become class 0 ``membrane`` and class 1 ``cell`` (other values raise).
Images are stored as RGB (the gray value repeated), like every jaxseg dataset.

Splits are deterministic: ``validation`` holds the last ``num_validation`` slices (default 5),
``train`` the others. ``image_size`` optionally resizes at preparation (bilinear / nearest).
Each setting prepares into its own TFDS config. Weak labels come from
`jaxseg.data.weak_labels.synthesize` (seeded by the file name): instances/boxes are connected
cell regions (the 8 largest), scribbles of width 1.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from jaxseg.data import features

CLASS_NAMES = ("membrane", "cell")
NUM_CLASSES = len(CLASS_NAMES)
LABEL_VALUES = {0: 0, 255: 1}  # label PNG value -> class


@dataclasses.dataclass(eq=False)
class IsbiConfig(tfds.core.BuilderConfig):
  num_validation: int = 5
  image_size: tuple[int, int] | None = None


def make_config(num_validation: int = 5, image_size=None) -> IsbiConfig:
  if int(num_validation) < 0:
    raise ValueError(f"num_validation must be >= 0, got {num_validation}")
  image_size, size = features.image_size_name(image_size)
  name = f"val{int(num_validation)}_{size}"
  return IsbiConfig(name=name, num_validation=int(num_validation), image_size=image_size,
                    description=f"last {num_validation} slices held out, {size} resolution")


LAYOUT = """\
ISBI 2012 EM segmentation challenge training data (https://imagej.net/events/isbi-2012-
segmentation-challenge: train-volume.tif and train-labels.tif), one PNG or TIFF per slice with
equal names in two folders:
  $JAXSEG_SHARED_DATA/isbi2012/      or pass --config.builder_kwargs.manual_dir=<folder>
    image/0.png, image/1.png ...     label/0.png, label/1.png ...  (255 cell, 0 membrane)"""


def slice_files(manual_dir) -> list[tuple[str, str]]:
  """(image, label) paths ordered by slice number; raises `MissingDataError` naming what lacks."""
  features.require_dir(manual_dir, "isbi2012", LAYOUT)
  image_dir, label_dir = os.path.join(manual_dir, "image"), os.path.join(manual_dir, "label")
  features.require_dir(image_dir, "isbi2012", LAYOUT)
  features.require_dir(label_dir, "isbi2012", LAYOUT)
  names = [n for n in os.listdir(image_dir) if n.lower().endswith((".png", ".tif", ".tiff"))]
  if not names:
    raise features.MissingDataError(f"isbi2012: no images in {image_dir}\n{LAYOUT}")

  def number(name):
    digits = re.findall(r"\d+", name)
    return (int(digits[-1]) if digits else -1, name)

  pairs = []
  for name in sorted(names, key=number):
    label = os.path.join(label_dir, name)
    if not os.path.isfile(label):
      raise features.MissingDataError(f"isbi2012: label file not found: {label}")
    pairs.append((os.path.join(image_dir, name), label))
  return pairs


def read_example(image_path: str, label_path: str, image_size=None) -> dict[str, np.ndarray]:
  """One slice as an RGB image and a membrane(0)/cell(1) mask, with synthesised weak labels."""
  gray = features.read_png(image_path, "L")
  label = features.read_png(label_path, "L")
  if label.shape != gray.shape:
    raise ValueError(f"{label_path}: label size {label.shape} differs from image {gray.shape}")
  values = set(np.unique(label).tolist())
  if not values <= set(LABEL_VALUES):
    raise ValueError(f"{label_path}: expected label values {sorted(LABEL_VALUES)}, found {sorted(values)}")
  gray = features.resize(gray, image_size, nearest=False)
  label = features.resize(label, image_size, nearest=True)
  mask = (label == 255).astype(np.uint8)
  image = np.repeat(gray[..., None], 3, axis=-1)
  return features.with_weak_labels(image, mask, image_path, num_classes=NUM_CLASSES,
                                   background=(0,))


class JaxsegIsbi2012(tfds.core.GeneratorBasedBuilder):
  """ISBI 2012 EM membranes: 2 classes (membrane, cell), from a manual folder."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [make_config()]
  DEFAULT_CONFIG_NAME = "val5_native"
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
  CLASS_NAMES = CLASS_NAMES
  url_infos = None  # Nothing is downloaded (see JaxsegShapes.url_infos).

  def _info(self) -> tfds.core.DatasetInfo:
    return features.dataset_info(self, __doc__, CLASS_NAMES, self.builder_config.image_size)

  def _split_generators(self, dl_manager):
    pairs = slice_files(os.fspath(dl_manager.manual_dir))
    k = self.builder_config.num_validation
    if k >= len(pairs):
      raise ValueError(f"isbi2012: num_validation={k} leaves no training slices out of {len(pairs)}")
    splits = {"train": self._generate_examples("train", pairs[:len(pairs) - k])}
    if k:
      splits["validation"] = self._generate_examples("validation", pairs[len(pairs) - k:])
    return splits

  def _generate_examples(self, split: str, pairs):
    size = self.builder_config.image_size
    examples = ((i, read_example(image, label, size)) for i, (image, label) in enumerate(pairs))
    yield from features.encode_all(examples, f"isbi2012/{self.builder_config.name} {split}")


def make_builder(data_dir: str, manual_dir=None, num_validation: int = 5,
                 image_size=None) -> tuple[JaxsegIsbi2012, object]:
  """The builder for `jaxseg.data.load`; the manual folder is checked unless already prepared."""
  config = make_config(num_validation, image_size)
  config = config.name if config.name in {c.name for c in JaxsegIsbi2012.BUILDER_CONFIGS} else config
  builder = JaxsegIsbi2012(data_dir=data_dir, config=config, file_format="array_record")
  if not builder.is_prepared():
    slice_files(None if manual_dir is None else os.fspath(manual_dir))
  download_config = tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else os.fspath(manual_dir))
  return builder, download_config
