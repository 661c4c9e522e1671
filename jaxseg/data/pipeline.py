"""Loading prepared datasets and turning them into deterministic, sharded batches with Grain.

::

  source = load("jaxseg_shapes", "train")                  # prepares on first use
  batches = train_batches(source, batch_size=16, crop_size=(64, 64), seed=0)
  batch = next(batches)       # image [16,64,64,3] float32, mask, scribble, ..., valid

Determinism: the training batch at global step ``s`` is a pure function of
``(seed, s, process_index, process_count)``. Each epoch is a permutation of the dataset seeded
by ``(seed, epoch)``, cut into global batches of ``process_count * batch_size`` examples (the
remainder of an epoch is dropped); process ``p`` takes the ``p``-th slice of ``batch_size``
examples of every global batch. Augmentation draws from a generator seeded by
``(seed, step, position in the global batch)``. So ``train_batches(..., start_step=k)`` yields
exactly what an uninterrupted run yields from step ``k`` on, and the shards of all processes are
disjoint and together form the global batch.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from jaxseg.constants import IGNORE_INDEX
from jaxseg.data import augment, features, weak_labels
from jaxseg import names as names_lib

LABEL_KINDS = features.LABEL_KINDS
# Kinds computed from other keys when a source lacks them, and what each needs.
_DERIVED_FROM = {"tags_large": ("mask",), "box_seg": ("image", "boxes", "box_classes")}
# Label maps resampled here rather than by `augment` (which knows mask and scribble only).
_EXTRA_LABEL_MAPS = ("box_seg",)

# Loader name -> module with a `make_builder(data_dir, **kwargs)`; imported on first use.
_DATASETS = {
    "jaxseg_shapes": "jaxseg.data.shapes",
    "camvid": "jaxseg.data.camvid",
    "isbi2012": "jaxseg.data.isbi2012",
    "voc2012": "jaxseg.data.voc2012",
    "cityscapes": "jaxseg.data.cityscapes",
    "coco": "jaxseg.data.coco",
}
_ALIASES = {"shapes": "jaxseg_shapes"}


def names() -> list[str]:
  """Dataset names `load` accepts (aliases included)."""
  return sorted(list(_DATASETS) + list(_ALIASES))


class Source:
  """Random access to one split of a prepared dataset, returning the DESIGN.md dtypes.

  ``source[i]`` is a dict of NumPy arrays for one example: ``image`` uint8 [H,W,3], ``mask``
  int32 [H,W], ``scribble`` int32 [H,W], ``boxes`` float32 [M,4], ``box_classes`` int32 [M],
  ``tags`` float32 [C], ``tags_large`` float32 [C] (CCNN's size tags, from the mask),
  ``instance_masks`` uint8 [M,H,W].

  With ``cache=True`` each example is decoded once and kept in memory in a compact form (label
  maps uint8, instance masks bit-packed: about 24 KB per 64x64 example), which makes reading
  ~50x cheaper than decoding PNGs again.

  ``source.box_seg(i)`` is WSSL's Bbox-Seg labelling of example ``i`` (a dense CRF on its
  boxes, `weak_labels.box_seg_from_boxes`), computed on first use and kept in memory (uint8,
  whatever ``cache`` says: it costs tens of ms to compute and H*W bytes to keep), so it is
  computed once per example and settings, like WSSL's precomputed segmentations.

  Attributes:
    name: dataset name; split: split name; num_classes, class_names: label space;
    builder: the TFDS builder (for ``info``).
  """

  def __init__(self, data_source: Any, *, name: str, split: str, class_names: Sequence[str],
               builder: Any = None, cache: bool = True):
    self._data_source = data_source
    self._cache = {} if cache else None
    self._box_seg = {}
    self.name = name
    self.split = split
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)
    self.builder = builder

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {self.name}/{self.split} of {n} examples")
    index %= n
    compact = self._cache.get(index) if self._cache is not None else None
    if compact is None:
      compact = features.compact_example(self._data_source[index])
      if self._cache is not None:
        self._cache[index] = compact  # Racing threads store equal values; dict writes are atomic.
    return features.expand_example(compact)

  def box_seg(self, index: int, **settings) -> np.ndarray:
    """WSSL Bbox-Seg labels int32 [H,W] of example ``index``, computed once and cached.

    Args:
      index: example index.
      **settings: keyword arguments of `weak_labels.box_seg_from_boxes` (``background_class``,
        ``max_pixels``, CRF settings); each distinct setting is cached separately.
    """
    n = len(self)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {self.name}/{self.split} of {n} examples")
    key = (index % n, tuple(sorted(settings.items())))
    labels = self._box_seg.get(key)
    if labels is None:
      ex = self[index]
      labels = weak_labels.box_seg_from_boxes(ex["image"], ex["boxes"], ex["box_classes"],
                                              **settings).astype(np.uint8)
      self._box_seg[key] = labels  # Racing threads store equal values; dict writes are atomic.
    return labels.astype(np.int32)

  def scribble_coverage(self, max_examples: int | None = 200) -> float:
    """Fraction of scribbled pixels over the first ``max_examples`` examples (None: all)."""
    n = len(self) if max_examples is None else min(len(self), max_examples)
    return weak_labels.scribble_coverage([self[i]["scribble"] for i in range(n)])

  def __repr__(self) -> str:
    return (f"Source(name={self.name!r}, split={self.split!r}, len={len(self)}, "
            f"num_classes={self.num_classes})")


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def palette(name: str) -> "np.ndarray | None":
  """The dataset's own class colours, uint8 [C,3], or None where it has none (then the
  PASCAL VOC colours of ``jaxseg.evaluation.visualize.palette`` are used)."""
  key = _ALIASES.get(name, name)
  if key not in _DATASETS:
    raise names_lib.unknown("dataset", name, names())
  colours = getattr(importlib.import_module(_DATASETS[key]), "PALETTE", None)
  return None if colours is None else np.asarray(colours, np.uint8)


def load(name: str, split: str, *, data_dir: str | os.PathLike | None = None, cache: bool = True,
         **builder_kwargs) -> Source:
  """Prepares (if needed, offline) and opens one split of a dataset.

  Args:
    name: ``jaxseg_shapes`` (alias ``shapes``), ``camvid`` or ``isbi2012``.
    split: e.g. ``train``, ``validation``.
    data_dir: TFDS data folder; None means ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
    cache: keep decoded examples in memory (see `Source`).
    **builder_kwargs: the dataset's settings, passed to its module's ``make_builder``: for shapes
      ``num_train``, ``num_validation``, ``seed``, ``image_size``; for camvid ``manual_dir``,
      ``image_size``; for isbi2012 ``manual_dir``, ``num_validation``; for coco
      ``manual_dir``, ``image_size``, ``max_instances``, ``contiguous_ids``. Each distinct
      setting prepares into its own TFDS config folder.

  Returns:
    a `Source`.

  Raises:
    ValueError: unknown dataset or split, bad settings; FileNotFoundError: missing manual data.
  """
  key = _ALIASES.get(name, name)
  if key not in _DATASETS:
    raise names_lib.unknown("dataset", name, names())
  module = importlib.import_module(_DATASETS[key])
  data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
  builder, download_config = module.make_builder(data_dir=data_dir, **builder_kwargs)
  builder.download_and_prepare(download_config=download_config)
  splits = list(builder.info.splits.keys())
  if split not in splits:
    raise ValueError(f"dataset {key!r} has no split {split!r}; valid splits: {sorted(splits)}")
  class_names = builder.info.metadata["class_names"]
  return Source(builder.as_data_source(split), name=key, split=split, class_names=class_names,
                builder=builder, cache=cache)


# ----------------------------------------------------------------------------------------------
# Batching.


def _check_kinds(label_kinds: Sequence[str] | None, available: Sequence[str]) -> tuple[str, ...]:
  """Resolves which label keys to emit.

  ``box_classes`` rides along with boxes/instances and ``tags_large`` with tags. The derived
  kinds (``tags_large`` from the mask, ``box_seg`` from the image and boxes) can be requested
  from a source that lacks them; ``box_seg`` costs a dense CRF per example, so it is emitted
  only on request.
  """
  available = set(available)
  derivable = {k for k, needs in _DERIVED_FROM.items() if all(n in available for n in needs)}
  if label_kinds is None:
    kinds = [k for k in LABEL_KINDS if k in available]
  else:
    if isinstance(label_kinds, str):
      raise TypeError(f"label_kinds must be a sequence of names, got the string {label_kinds!r}")
    unknown = sorted(set(label_kinds) - set(LABEL_KINDS))
    if unknown:
      raise ValueError(f"unknown label kinds {unknown}; valid: {list(LABEL_KINDS)}")
    missing = sorted(set(label_kinds) - available - derivable)
    if missing:
      derived = "; ".join(f"{k!r} is computed from {', '.join(needs)}"
                          for k, needs in _DERIVED_FROM.items())
      raise ValueError(f"label kinds {missing} are not in this dataset (it has "
                       f"{sorted(available)}; {derived})")
    kinds = list(label_kinds)
    if ("boxes" in kinds or "instance_masks" in kinds) and "box_classes" not in kinds:
      kinds.append("box_classes")
  if "tags" in kinds and "tags_large" not in kinds and "tags_large" in available | derivable:
    kinds.append("tags_large")
  return tuple(k for k in LABEL_KINDS if k in kinds)


def _select(example: dict[str, np.ndarray], kinds: Sequence[str]) -> dict[str, np.ndarray]:
  out = {"image": example["image"]}
  for k in kinds:
    if k in example:
      out[k] = example[k]
  # Boxes of examples with instance masks are recomputed from them after resampling, so keep
  # the masks for the geometry even when they are not emitted.
  if "boxes" in kinds and "instance_masks" in example:
    out["instance_masks"] = example["instance_masks"]
  return out


def _num_classes(source: Any, example: Mapping[str, np.ndarray]) -> int:
  if getattr(source, "num_classes", None):
    return int(source.num_classes)
  if "tags" in example:
    return len(example["tags"])
  raise ValueError("label kind 'tags_large' needs the class count: the source has no "
                   "num_classes and its examples no tags")


def _read(source: Any, index: int, kinds: Sequence[str], box_seg_settings: Mapping,
          box_seg_cache: dict) -> dict[str, np.ndarray]:
  """Example ``index`` with ``kinds``, derived kinds computed where the source lacks them.

  ``box_seg`` comes from ``source.box_seg`` (a `Source` caches it for its lifetime) or, for a
  plain sequence of examples, is computed here and kept in ``box_seg_cache``.
  """
  example = source[index]
  out = _select(example, kinds)
  if "tags_large" in kinds and "tags_large" not in out:
    out["tags_large"] = weak_labels.large_tags_from_mask(example["mask"],
                                                         _num_classes(source, example))
  if "box_seg" in kinds and "box_seg" not in out:
    if callable(getattr(source, "box_seg", None)):
      out["box_seg"] = source.box_seg(index, **box_seg_settings)
    else:
      labels = box_seg_cache.get(index)
      if labels is None:
        labels = weak_labels.box_seg_from_boxes(example["image"], example["boxes"],
                                                example["box_classes"], **box_seg_settings)
        box_seg_cache[index] = labels
      out["box_seg"] = labels
  return out


def _as_pair(size: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
  if size is None:
    return None
  if isinstance(size, (int, np.integer)):
    size = (int(size), int(size))
  size = tuple(int(s) for s in size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"{name} must be a positive int or (height, width), got {size}")
  return size


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, 0, epoch]).permutation(n)


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def train_batches(
    source: Any, *, batch_size: int, crop_size: int | Sequence[int] | None = None, seed: int = 0,
    start_step: int = 0, process_index: int = 0, process_count: int = 1,
    scale_range: tuple[float, float] = (0.75, 1.5), hflip: bool = True,
    label_kinds: Sequence[str] | None = None, num_threads: int = 2, prefetch: int = 4,
    box_seg_settings: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of augmented training batches for this process.

  Args:
    source: a `Source` (or any random-access sequence of example dicts).
    batch_size: examples per batch on THIS process (global batch = process_count * batch_size).
    crop_size: output (height, width) or int; None keeps each image's own size (the images must
      then all have one size).
    seed: data seed (shuffling and augmentation).
    start_step: first global step to produce (resume).
    process_index, process_count: this process and the number of processes.
    scale_range: uniform random scale factor range; (1, 1) disables scaling.
    hflip: random horizontal flips.
    label_kinds: label keys to emit (default: all the source has, ``box_seg`` excepted);
      ``box_classes`` is added to ``boxes``/``instance_masks`` and ``tags_large`` to ``tags``.
      ``box_seg`` (WSSL Bbox-Seg labels, for ``box_loss(mode="bbox_seg")``) is computed from
      the image and boxes the first time an example is read (a dense CRF, tens of ms; a
      `Source` keeps it for its lifetime) and then cropped/flipped like the mask.
      ``image`` and ``valid`` are always emitted.
    num_threads, prefetch: Grain reader threads and batches prefetched.
    box_seg_settings: keyword arguments of `weak_labels.box_seg_from_boxes` (e.g.
      ``background_class``, ``max_pixels``, ``bilateral_sigma_rgb``).

  Yields:
    dicts with ``image`` float32 [B,h,w,3] in [0,1], ``valid`` bool [B,h,w] (False on padding),
    ``mask``/``scribble``/``box_seg`` int32 [B,h,w] (255 on padding), ``boxes`` float32
    [B,M,4], ``box_classes`` int32 [B,M], ``tags``/``tags_large`` float32 [B,C],
    ``instance_masks`` uint8 [B,M,h,w].
  """
  n = len(source)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  global_batch = batch_size * process_count
  if n < global_batch:
    raise ValueError(f"dataset of {n} examples is smaller than the global batch {global_batch} "
                     f"({process_count} processes x {batch_size})")
  crop = _as_pair(crop_size, "crop_size")
  kinds = _check_kinds(label_kinds, list(source[0].keys()))
  settings = dict(box_seg_settings or {})
  box_seg_cache = {}
  steps_per_epoch = n // global_batch

  def batch_at(step: int) -> dict[str, np.ndarray]:
    epoch, position = divmod(int(step), steps_per_epoch)
    order = _epoch_permutation(seed, epoch, n)
    start = position * global_batch + process_index * batch_size
    examples, geometries = [], []
    for slot in range(batch_size):
      example = _read(source, int(order[start + slot]), kinds, settings, box_seg_cache)
      rng = np.random.default_rng([seed, 1, int(step), process_index * batch_size + slot])
      geometries.append(augment.random_geometry(
          example["image"].shape[:2], rng, crop_size=crop, scale_range=scale_range, hflip=hflip))
      examples.append(example)
    return _augment_batch(examples, geometries, ("image", "valid") + kinds)

  dataset = grain.MapDataset.range(start_step, 2**62).map(batch_at)
  return iter(dataset.to_iter_dataset(_read_options(num_threads, prefetch)))


def _resample(examples, geometries) -> dict[str, np.ndarray]:
  """`augment.apply_geometries` over examples, one vectorised pass when they share a size."""
  if len({e["image"].shape for e in examples}) == 1:
    stacked = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    return augment.apply_geometries(stacked, geometries)
  outs = [augment.apply_geometry(e, g) for e, g in zip(examples, geometries)]
  return {k: np.stack([o[k] for o in outs]) for k in outs[0]}


def _augment_batch(examples, geometries, keys) -> dict[str, np.ndarray]:
  """Resamples examples through their geometries and stacks them."""
  extra = [k for k in _EXTRA_LABEL_MAPS if k in examples[0]]
  out = _resample([{k: v for k, v in e.items() if k not in extra} for e in examples], geometries)
  for key in extra:
    # `augment` resamples the label maps it knows (mask, scribble) with the nearest source
    # pixel; pass this one through it as a mask beside a blank image, so it follows exactly
    # the same pixels (the blank image costs a bilinear pass, small next to the rest).
    blank = np.zeros((1, 1, 3), np.uint8)
    passes = [{"image": np.broadcast_to(blank, e["image"].shape[:2] + (3,)), "mask": e[key],
               **({"valid": e["valid"]} if "valid" in e else {})} for e in examples]
    out[key] = _resample(passes, geometries)["mask"]
  return {k: out[k] for k in keys}


def _padding_like(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An all-padding example with the shapes and dtypes of ``example``."""
  out = {}
  for key, value in example.items():
    if key in ("mask", "scribble") + _EXTRA_LABEL_MAPS:
      out[key] = np.full_like(value, IGNORE_INDEX)
    elif key == "box_classes":
      out[key] = np.full_like(value, -1)
    elif key == "index":
      out[key] = np.int32(-1)
    else:
      out[key] = np.zeros_like(value)
  return out


def eval_batches(
    source: Any, *, batch_size: int, process_index: int = 0, process_count: int = 1,
    label_kinds: Sequence[str] | None = None, image_size: int | Sequence[int] | None = None,
    num_threads: int = 2, prefetch: int = 4, box_seg_settings: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over this process's shard (examples p, p+P, p+2P, ...), no augmentation.

  The last batch is padded to ``batch_size`` with padding examples whose ``valid`` is all False,
  mask/scribble 255, box classes -1 and ``index`` -1, so every batch has one static shape and
  metrics can ignore padding through ``valid``.

  Args:
    source: a `Source`.
    batch_size: examples per batch on this process.
    process_index, process_count: this process and the number of processes.
    label_kinds: as in `train_batches`.
    image_size: (height, width) or int. When given, every image is shrunk by one factor to fit
      inside it if it is larger (image bilinear, labels nearest; never enlarged) and then padded
      bottom/right (``valid`` False, labels 255). Needed when the split has images of different
      sizes; metrics then see the resized labels. None keeps images as they are (they must then
      share one size).
    num_threads, prefetch: Grain reader threads and batches prefetched.
    box_seg_settings: as in `train_batches`.

  Yields:
    dicts like `train_batches` plus ``index`` int32 [B] (example index in the split; -1 on padding).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
  n = len(source)
  size = _as_pair(image_size, "image_size")
  kinds = _check_kinds(label_kinds, list(source[0].keys()) if n else [])
  indices = np.arange(process_index, n, process_count)
  num_batches = -(-len(indices) // batch_size)
  if num_batches == 0:
    return iter(())

  keys = ("image", "valid") + kinds
  settings = dict(box_seg_settings or {})
  box_seg_cache = {}

  def batch_at(k: int) -> dict[str, np.ndarray]:
    chunk = indices[k * batch_size:(k + 1) * batch_size]
    examples = [_read(source, int(i), kinds, settings, box_seg_cache) for i in chunk]
    shapes = [e["image"].shape[:2] for e in examples]
    geometries = [augment.fit_geometry(shape, size) if size is not None
                  else augment.Geometry(shape, (0, 0), shape, False) for shape in shapes]
    out = _augment_batch(examples, geometries, keys)
    out["index"] = chunk.astype(np.int32)
    pad = batch_size - len(chunk)
    if pad:
      filler = _padding_like({k: v[0] for k, v in out.items()})
      out = {k: np.concatenate([v, np.stack([filler[k]] * pad)]) for k, v in out.items()}
    return out

  dataset = grain.MapDataset.range(num_batches).map(batch_at)
  return iter(dataset.to_iter_dataset(_read_options(num_threads, prefetch)))
