"""``jaxseg_shapes``: the embedded, procedurally generated default dataset.

RGB scenes of 1-4 flat-coloured objects on a textured background. The class of an object is its
shape (1 disk, 2 square, 3 triangle, 4 cross; 0 is background), never its colour: every object
and background colour is random. Later objects occlude earlier ones; instance masks hold the
visible part, and a placement that would hide more than 30% of an earlier object is redrawn so
shapes stay recognisable.

Every example carries every label kind (see `jaxseg.data.features`), and each example is a pure
function of ``(seed, split, index)``, so any slice of the dataset can be regenerated on its own.
The default config (2000 train / 300 validation, 64x64) prepares in seconds without network or
TensorFlow::

  builder = JaxsegShapes(data_dir=..., config=make_config(num_train=64, num_validation=16))
  builder.download_and_prepare()
  source = builder.as_data_source("train")
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from jaxseg.data import features, weak_labels

CLASS_NAMES = ("background", "disk", "square", "triangle", "cross")
NUM_CLASSES = len(CLASS_NAMES)
MAX_INSTANCES = features.MAX_INSTANCES
SPLITS = ("train", "validation")
_SPLIT_IDS = {"train": 0, "validation": 1}

_MIN_SIZE, _MAX_SIZE = 12.0, 26.0
_MAX_OBJECTS = 4
_MIN_VISIBLE_FRACTION = 0.7
_MIN_CONTRAST = 0.4


# ----------------------------------------------------------------------------------------------
# Drawing.


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """Random smooth colour field: gradient + low-frequency noise + stripes or soft blobs."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
  c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
  angle = rng.uniform(0, 2 * np.pi)
  t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) / np.sqrt(0.5) + 0.5
  image = c0 + (c1 - c0) * t[..., None]
  coarse = rng.normal(0, 0.12, (4, 4, 3))
  # Bilinear upsampling of the 4x4 grid as two interpolation matrices.
  grid = np.linspace(0, 3, size)
  interp = np.maximum(0, 1 - np.abs(grid[:, None] - np.arange(4)[None, :]))
  image = image + (interp @ coarse.transpose(2, 0, 1) @ interp.T).transpose(1, 2, 0)
  if rng.uniform() < 0.5:
    direction = rng.uniform(0, 2 * np.pi)
    period = rng.uniform(6, 16)
    u = (np.cos(direction) * xx + np.sin(direction) * yy) * (size - 1)
    wave = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    image = image + rng.uniform(0.03, 0.08) * wave[..., None] * rng.choice([-1.0, 1.0], 3)
  else:
    for _ in range(int(rng.integers(2, 5))):
      cy, cx = rng.uniform(0, 1, 2)
      sigma = rng.uniform(0.08, 0.2)
      blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
      image = image + blob[..., None] * rng.uniform(-0.12, 0.12, 3)
  return image


def _shape_mask(cls: int, cy: float, cx: float, extent: float, angle: float, size: int) -> np.ndarray:
  """Boolean [size, size] raster of one shape (pixel centres at integer coordinates)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  dy, dx = yy - cy, xx - cx
  # Coordinates in the shape's rotated frame.
  u = np.cos(angle) * dx + np.sin(angle) * dy
  v = -np.sin(angle) * dx + np.cos(angle) * dy
  r = extent / 2
  if cls == 1:  # disk
    return dx * dx + dy * dy <= r * r
  if cls == 2:  # square
    half = 0.8 * r
    return (np.abs(u) <= half) & (np.abs(v) <= half)
  if cls == 3:  # equilateral triangle: inside the three edges at the inradius
    circumradius = 1.2 * r
    inside = np.ones_like(u, bool)
    for k in range(3):
      phi = np.pi / 2 + 2 * np.pi * k / 3
      inside &= np.cos(phi) * u + np.sin(phi) * v <= circumradius / 2
    return inside
  if cls == 4:  # plus-shaped cross
    arm = max(2.0, 0.34 * r)
    return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
  raise ValueError(f"unknown shape class {cls}")


def _object_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
  """A random colour at least `_MIN_CONTRAST` (RGB distance) from the mean colour under it."""
  colour = rng.uniform(0, 1, 3)
  for _ in range(20):
    if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
      break
    colour = rng.uniform(0, 1, 3)
  return colour


def generate_example(seed: int, split: str, index: int, image_size: int = 64) -> dict[str, np.ndarray]:
  """One example, a pure function of ``(seed, split, index, image_size)``.

  Returns:
    dict with ``image`` uint8 [S,S,3], ``mask`` uint8 [S,S], ``scribble`` uint8 [S,S] (255 off
    the scribbles), ``boxes`` float32 [8,4], ``box_classes`` int32 [8], ``tags`` float32 [5],
    ``tags_large`` float32 [5] (CCNN's size tags; not stored: the reader derives them from the
    mask), ``instance_masks`` uint8 [8,S,S].
  """
  if split not in _SPLIT_IDS:
    raise ValueError(f"unknown split {split!r}; valid: {list(_SPLIT_IDS)}")
  size = int(image_size)
  scale = size / 64.0
  shape_rng, scribble_rng = (
      np.random.default_rng(s) for s in np.random.SeedSequence([seed, _SPLIT_IDS[split], index]).spawn(2))
  rng = shape_rng
  canvas = _background(rng, size)
  mask = np.zeros((size, size), np.uint8)
  owner = np.full((size, size), -1, np.int32)  # which object is visible at each pixel
  full_areas, classes = [], []
  for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
    for _attempt in range(20):
      cls = int(rng.integers(1, NUM_CLASSES))
      extent = rng.uniform(_MIN_SIZE, _MAX_SIZE) * scale
      margin = extent / 2
      cy, cx = rng.uniform(margin, size - 1 - margin, 2)
      angle = rng.uniform(0, 2 * np.pi) if cls != 1 else 0.0
      shape = _shape_mask(cls, cy, cx, extent, angle, size)
      area = int(shape.sum())
      if area == 0:
        continue
      new_owner = np.where(shape, len(classes), owner)
      visible = np.bincount(new_owner[new_owner >= 0], minlength=len(classes) + 1)[:len(classes)]
      if all(visible[k] >= _MIN_VISIBLE_FRACTION * full_areas[k] for k in range(len(classes))):
        break
    else:
      continue
    colour = _object_colour(rng, canvas[shape].mean(axis=0))
    canvas[shape] = colour
    owner = new_owner
    mask[shape] = cls
    full_areas.append(area)
    classes.append(cls)
  canvas = canvas + rng.normal(0, 0.02, canvas.shape)
  image = np.clip(np.round(canvas * 255), 0, 255).astype(np.uint8)

  instance_masks = np.stack([owner == k for k in range(len(classes))]) if classes else np.zeros(
      (0, size, size), bool)
  keep = instance_masks.reshape(len(classes), -1).any(axis=1)
  instance_masks = instance_masks[keep]
  inst_classes = np.asarray(classes, np.int32)[keep]
  instance_masks, inst_classes = weak_labels.pad_instances(instance_masks, inst_classes, MAX_INSTANCES)
  boxes, box_classes = weak_labels.boxes_from_instances(instance_masks, inst_classes)
  scribble = weak_labels.scribbles_from_mask(mask, scribble_rng, width=1)
  return {
      "image": image,
      "mask": mask,
      "scribble": scribble.astype(np.uint8),
      "boxes": boxes,
      "box_classes": box_classes,
      "tags": weak_labels.tags_from_mask(mask, NUM_CLASSES),
      "tags_large": weak_labels.large_tags_from_mask(mask, NUM_CLASSES),
      "instance_masks": instance_masks,
  }


# ----------------------------------------------------------------------------------------------
# TFDS builder.


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Size and seed of a `jaxseg_shapes` variant; each variant prepares into its own folder."""
  num_train: int = 2000
  num_validation: int = 300
  seed: int = 0
  image_size: int = 64


def make_config(num_train: int = 2000, num_validation: int = 300, seed: int = 0,
                image_size: int = 64) -> ShapesConfig:
  """The config for these settings, named after them (``default`` for the defaults)."""
  for key, value in (("num_train", num_train), ("num_validation", num_validation)):
    if int(value) < 1:
      raise ValueError(f"{key} must be >= 1, got {value}")
  if int(image_size) < 16:
    raise ValueError(f"image_size must be >= 16, got {image_size}")
  settings = (int(num_train), int(num_validation), int(seed), int(image_size))
  name = "default" if settings == (2000, 300, 0, 64) else "train{}_val{}_seed{}_px{}".format(*settings)
  return ShapesConfig(name=name, num_train=settings[0], num_validation=settings[1],
                      seed=settings[2], image_size=settings[3],
                      description=f"{settings[0]} train / {settings[1]} validation, "
                                  f"{settings[3]}x{settings[3]}, seed {settings[2]}")


class JaxsegShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural shapes: 4 shape classes + background, every weak label kind."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "1.1.0": "Easier scenes: sizes 12-26 px, at most 30% occlusion, more contrast, less clutter.",
  }
  BUILDER_CONFIGS = [make_config()]
  DEFAULT_CONFIG_NAME = "default"
  CLASS_NAMES = CLASS_NAMES
  # Nothing is downloaded. Without this, TFDS looks for a checksums file next to the module
  # through `importlib_resources`, a package it does not declare as a dependency.
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return features.dataset_info(self, __doc__, CLASS_NAMES, (size, size))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {
        "train": self._generate_examples("train", cfg.num_train),
        "validation": self._generate_examples("validation", cfg.num_validation),
    }

  def _generate_examples(self, split: str, count: int):
    cfg = self.builder_config
    examples = ((i, generate_example(cfg.seed, split, i, cfg.image_size)) for i in range(count))
    yield from features.encode_all(examples, f"jaxseg_shapes/{cfg.name} {split}")


def make_builder(data_dir: str, **kwargs) -> tuple[JaxsegShapes, None]:
  """The builder for `jaxseg.data.load` (settings as in `make_config`)."""
  valid = ("num_train", "num_validation", "seed", "image_size")
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(f"unknown jaxseg_shapes settings {unknown}; valid: {list(valid)}")
  config = make_config(**kwargs)
  # TFDS refuses a new config object named like a registered one: pass registered ones by name.
  registered = {c.name for c in JaxsegShapes.BUILDER_CONFIGS}
  config = config.name if config.name in registered else config
  return JaxsegShapes(data_dir=data_dir, config=config, file_format="array_record"), None
