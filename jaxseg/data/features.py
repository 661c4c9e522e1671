"""The TFDS feature schema shared by jaxseg's builders, usable without TensorFlow.

TFDS encodes an `Image` feature itself only through TensorFlow, so builders hand it PNG bytes
already encoded with PIL; label maps are stored as single-channel PNGs (lossless, small) and
instance masks as a zlib-compressed tensor. Reading back with `builder.as_data_source(split)`
decodes with PIL and never imports TensorFlow.
"""
from __future__ import annotations

import io
import os
import zlib
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxseg.constants import IGNORE_INDEX
from jaxseg.data import weak_labels

MAX_INSTANCES = 8
# Label kinds a batch can carry. "tags_large" is derived from the stored mask on read (no
# stored feature, so prepared copies stay valid); "box_seg" (WSSL Bbox-Seg labels, a dense CRF
# per example) is computed on request by `jaxseg.data.pipeline` and cached in memory.
LABEL_KINDS = ("mask", "scribble", "boxes", "box_classes", "tags", "tags_large",
               "instance_masks", "box_seg")


def segmentation_features(
    height: int | None, width: int | None, num_classes: int, max_instances: int = MAX_INSTANCES,
) -> tfds.features.FeaturesDict:
  """Features of one example: image, mask, scribble, boxes, box_classes, tags, instance_masks."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(height, width, 3), encoding_format="png"),
      "mask": tfds.features.Image(shape=(height, width, 1), encoding_format="png"),
      "scribble": tfds.features.Image(shape=(height, width, 1), encoding_format="png"),
      "boxes": tfds.features.Tensor(shape=(max_instances, 4), dtype=np.float32),
      "box_classes": tfds.features.Tensor(shape=(max_instances,), dtype=np.int32),
      "tags": tfds.features.Tensor(shape=(num_classes,), dtype=np.float32),
      "instance_masks": tfds.features.Tensor(
          shape=(max_instances, height, width), dtype=np.uint8,
          encoding=tfds.features.Encoding.ZLIB),
  })


def dataset_info(builder: tfds.core.DatasetBuilder, description: str, class_names,
                 image_size: tuple[int, int] | None, **metadata) -> tfds.core.DatasetInfo:
  """The DatasetInfo every jaxseg builder shares: the schema, class names, ignore label."""
  height, width = image_size or (None, None)
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=segmentation_features(height, width, len(class_names), MAX_INSTANCES),
      metadata=tfds.core.MetadataDict(class_names=list(class_names), ignore_label=IGNORE_INDEX,
                                      **metadata),
      disable_shuffling=True,
  )


def with_weak_labels(image: np.ndarray, mask: np.ndarray, file_name: str, *, num_classes: int,
                     background) -> dict[str, np.ndarray]:
  """A stored example from a real dataset: image, mask and the weak labels synthesised from
  the mask, seeded by the file's base name so that preparing again gives the same labels."""
  seed = zlib.crc32(os.path.basename(file_name).encode())
  example = weak_labels.synthesize({"image": image, "mask": mask}, seed, num_classes=num_classes,
                                   background=background, max_instances=MAX_INSTANCES)
  example["scribble"] = example["scribble"].astype(np.uint8)
  return example


def png_bytes(array: np.ndarray) -> bytes:
  """Lossless PNG encoding of a uint8 [H, W] or [H, W, 3] array."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise TypeError(f"PNG encoding expects uint8, got {array.dtype}")
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def encode_example(example: Mapping[str, np.ndarray]) -> dict:
  """Turns a dict of NumPy label arrays into what `segmentation_features` accepts."""
  out = {
      "image": png_bytes(np.asarray(example["image"], np.uint8)),
      "mask": png_bytes(_label_u8(example["mask"], "mask")),
      "scribble": png_bytes(_label_u8(example["scribble"], "scribble")),
      "boxes": np.asarray(example["boxes"], np.float32),
      "box_classes": np.asarray(example["box_classes"], np.int32),
      "tags": np.asarray(example["tags"], np.float32),
      "instance_masks": np.asarray(example["instance_masks"], np.uint8),
  }
  return out


def encode_all(examples, description: str):
  """Encodes ``(key, example)`` pairs, then prints the scribble coverage of what it encoded."""
  labelled = total = count = 0
  for key, example in examples:
    scribble = np.asarray(example["scribble"])
    labelled += int((scribble != IGNORE_INDEX).sum())
    total += scribble.size
    count += 1
    yield key, encode_example(example)
  if total:
    print(f"{description}: {count} examples, scribble coverage {labelled / total:.2%}")


def _label_u8(label: np.ndarray, name: str) -> np.ndarray:
  label = np.asarray(label)
  if label.ndim != 2:
    raise ValueError(f"{name} must have rank 2 [H, W], got shape {label.shape}")
  if label.size and (label.min() < 0 or label.max() > IGNORE_INDEX):
    raise ValueError(f"{name} values must lie in [0, {IGNORE_INDEX}], got [{label.min()}, {label.max()}]")
  return label.astype(np.uint8)


def compact_example(raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """What a TFDS data source returns, in a compact form for in-memory caching.

  Label maps stay uint8 [H, W]; instance masks are bit-packed along the width.
  """
  out = {}
  for key, value in raw.items():
    value = np.asarray(value)
    if key in ("mask", "scribble") and value.ndim == 3:
      value = value[..., 0]
    if key == "instance_masks":
      out["instance_masks_width"] = np.int64(value.shape[-1])
      value = np.packbits(value != 0, axis=-1)
    out[key] = value
  return out


def expand_example(compact: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The DESIGN.md dtypes of one example (no batch axis) from `compact_example`'s output, plus
  ``tags_large`` float32 [C] (CCNN's size tags) derived from the mask where tags exist."""
  out = {"image": np.asarray(compact["image"], np.uint8)}
  for key in ("mask", "scribble"):
    if key in compact:
      out[key] = compact[key].astype(np.int32)
  if "boxes" in compact:
    out["boxes"] = np.asarray(compact["boxes"], np.float32)
  if "box_classes" in compact:
    out["box_classes"] = np.asarray(compact["box_classes"], np.int32)
  if "tags" in compact:
    out["tags"] = np.asarray(compact["tags"], np.float32)
    if "tags_large" in compact:
      out["tags_large"] = np.asarray(compact["tags_large"], np.float32)
    elif "mask" in compact:
      # CCNN's size tags, from the stored mask: a bincount, cheaper than storing them.
      out["tags_large"] = weak_labels.large_tags_from_mask(compact["mask"], len(out["tags"]))
  if "instance_masks" in compact:
    width = int(compact["instance_masks_width"])
    out["instance_masks"] = np.unpackbits(compact["instance_masks"], axis=-1, count=width)
  return out


class MissingDataError(FileNotFoundError, ValueError):
  """Manual data (a folder or file a builder reads) is missing. Both a FileNotFoundError and a
  ValueError, so either kind of handler catches it."""


def image_size_name(image_size) -> tuple[tuple[int, int] | None, str]:
  """A builder's ``image_size`` argument checked, and its config name ("native" or "HxW")."""
  if image_size is not None:
    if isinstance(image_size, (int, np.integer)):
      image_size = (int(image_size), int(image_size))
    image_size = tuple(int(s) for s in image_size)
    if len(image_size) != 2 or min(image_size) < 8:
      raise ValueError(f"image_size must be (height, width) with sides >= 8, got {image_size}")
  return image_size, ("native" if image_size is None else f"{image_size[0]}x{image_size[1]}")


def require_dir(path, what: str, layout: str = "") -> None:
  """Raises `MissingDataError` naming ``path`` (and, given, the ``layout`` that goes there)
  when it is not a folder."""
  where = f"\n{layout}" if layout else ""
  if path is None:
    raise MissingDataError(f"{what}: no manual_dir given; pass manual_dir=<folder> to load()"
                           f"{where}")
  if not os.path.isdir(path):
    raise MissingDataError(f"{what}: folder not found: {path}{where}")


def read_png(path: str, mode: str | None = None) -> np.ndarray:
  """A PNG (or any PIL-readable image) as a NumPy array, optionally converted to ``mode``."""
  if not os.path.isfile(path):
    raise MissingDataError(f"image file not found: {path}")
  with Image.open(path) as image:
    if mode is not None and image.mode != mode:
      image = image.convert(mode)
    return np.asarray(image)


def resize(array: np.ndarray, size: tuple[int, int] | None, *, nearest: bool) -> np.ndarray:
  """Resizes a uint8 image or label map to (height, width) with PIL (bilinear or nearest)."""
  if size is None or tuple(array.shape[:2]) == tuple(size):
    return array
  resample = Image.NEAREST if nearest else Image.BILINEAR
  return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample=resample))
