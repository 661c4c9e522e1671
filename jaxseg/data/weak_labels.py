"""Weak labels synthesised from full masks: scribbles, boxes and image-level tags.

Every function here is deterministic given its inputs (and ``seed`` where it takes one), so a
dataset built from full masks carries reproducible weak labels. NumPy and SciPy only, except
`box_seg_from_boxes` (WSSL's Bbox-Seg labels from the boxes), which runs the dense CRF of
`jaxseg.losses.box` in JAX, imported on first use.

Conventions (see DESIGN.md): masks are integer [H, W] with 255 = ignore; scribbles are int32
[H, W] with the class on scribbled pixels and 255 elsewhere; boxes are float32 (y0, x0, y1, x1)
inclusive pixel coordinates; box classes are int32 with -1 on padding; tags are float32
multi-hot [C]; ``tags_large`` float32 [C] marks the classes covering more than 10% of the image
(CCNN's size tags); ``box_seg`` is int32 [H, W] like a mask.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import scipy.ndimage as ndi

from jaxseg.constants import IGNORE_INDEX
from jaxseg.data import scribblesup

# What `synthesize` adds by default ("tags" brings "tags_large" along).
WEAK_KINDS = ("scribble", "boxes", "tags", "tags_large", "instance_masks")
# Also accepted by `synthesize`, on request only: a dense CRF per example (needs the image).
DERIVED_KINDS = ("box_seg",)
# CCNN's size tags: a class is "large" when it covers more than this fraction of the image.
LARGE_FRACTION = 0.10
# `box_seg_from_boxes` runs its CRF on at most this many pixels. The exact O(P^2) filter of
# `jaxseg.losses.crf` computes its kernel once for all iterations while it fits in one block
# (P <= ~1800 for one image), some 20 ms; beyond, it recomputes it every iteration (~30x more).
BOX_SEG_MAX_PIXELS = 1600

_EIGHT = np.ones((3, 3), bool)


def _check_mask(mask: Any, name: str = "mask") -> np.ndarray:
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"{name} must have rank 2 [H, W], got shape {mask.shape}")
  if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
    raise TypeError(f"{name} must have an integer dtype, got {mask.dtype}")
  return mask


def _as_seed(seed: Any) -> np.random.Generator:
  if isinstance(seed, np.random.Generator):
    return seed
  return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# Skeletonisation.


def _zhang_suen_tables() -> tuple[np.ndarray, np.ndarray]:
  """Removal tables of the two sub-iterations, indexed by the 8-neighbour code.

  Bit i of the code is neighbour P(i+2) of Zhang & Suen's numbering (P2 = north, clockwise).
  """
  code = np.arange(256)
  p = [(code >> i) & 1 for i in range(8)]  # p[0] = P2, ..., p[7] = P9
  count = sum(p)
  transitions = sum((p[i] == 0) & (p[(i + 1) % 8] == 1) for i in range(8))
  base = (count >= 2) & (count <= 6) & (transitions == 1)
  p2, p4, p6, p8 = p[0], p[2], p[4], p[6]
  first = base & ((p2 & p4 & p6) == 0) & ((p4 & p6 & p8) == 0)
  second = base & ((p2 & p4 & p8) == 0) & ((p2 & p6 & p8) == 0)
  return first, second


_ZS_FIRST, _ZS_SECOND = _zhang_suen_tables()


def skeletonize(region: np.ndarray) -> np.ndarray:
  """Thins a binary region to a one-pixel-wide 8-connected skeleton.

  Zhang & Suen's parallel thinning (CACM 1984): two alternating sub-iterations remove, all at
  once, the border pixels whose removal keeps connectivity, until nothing changes. A component
  the rules would erase whole (a 2x2 square) keeps one pixel. scikit-image's `skeletonize` cites
  the same paper but uses its own removal table, so branches can differ; both keep the number
  of 8-connected components (see tests).

  Only border pixels can be removed (a pixel with 8 set neighbours never is), so each
  sub-iteration looks at the current border alone: the cost grows with the area, not with
  area x thickness.

  Args:
    region: [H, W] bool (or 0/1) array.

  Returns:
    bool [H, W], a subset of ``region``.
  """
  region = np.asarray(region)
  if region.ndim != 2:
    raise ValueError(f"region must have rank 2 [H, W], got shape {region.shape}")
  img = np.pad(region != 0, 1).astype(np.uint8)
  h, w = img.shape
  flat = img.ravel()
  # Flat offsets of P2..P9 (north, then clockwise), matching the bits of the tables.
  offsets = np.array([-w, -w + 1, 1, w + 1, w, w - 1, -1, -w - 1])
  weights = (1 << np.arange(8)).astype(np.int32)
  labels, _ = ndi.label(img, structure=_EIGHT)
  labels = labels.ravel()
  alive = np.bincount(labels)  # pixels left per component (thinning never splits one)
  nonzero = np.flatnonzero(flat)
  # Pixels that are or were on the border; the current border is the marked pixels still set.
  marked = np.zeros(flat.size, bool)
  marked[nonzero[(flat[nonzero[:, None] + offsets] == 0).any(axis=1)]] = True
  changed = True
  while changed:
    changed = False
    for table in (_ZS_FIRST, _ZS_SECOND):
      border = np.flatnonzero(marked & (flat == 1))
      if border.size == 0:
        break
      code = flat[border[:, None] + offsets].astype(np.int32) @ weights
      remove = border[table[code]]
      if remove.size == 0:
        continue
      lost = np.bincount(labels[remove], minlength=len(alive))
      vanishing = np.flatnonzero((lost == alive) & (alive > 0))
      if vanishing.size:
        keep = np.zeros(len(remove), bool)
        for k in vanishing:
          keep[np.argmax(labels[remove] == k)] = True
        lost -= np.bincount(labels[remove[keep]], minlength=len(alive))
        remove = remove[~keep]
      alive -= lost
      flat[remove] = 0
      changed = True
      marked[(remove[:, None] + offsets).ravel()] = True
  return img[1:-1, 1:-1].astype(bool)


def longest_path(skeleton: np.ndarray) -> np.ndarray:
  """Longest geodesic path in the 8-connected graph of a skeleton, by two BFS passes.

  The first BFS from an arbitrary pixel finds the farthest pixel ``u``; the second from ``u``
  finds the farthest ``v`` and the path back to ``u``. Exact on trees (the usual skeleton),
  a good approximation on graphs with loops. Only the connected component of the first pixel
  (in raster order) is searched; callers pass one component.

  Args:
    skeleton: [H, W] bool.

  Returns:
    int [L, 2] array of (y, x), ordered from one end to the other; [0, 2] if empty.
  """
  ys, xs = np.nonzero(skeleton)
  n = len(ys)
  if n == 0:
    return np.zeros((0, 2), np.int64)
  h, w = skeleton.shape
  index = np.full((h + 2, w + 2), -1, np.int64)
  index[ys + 1, xs + 1] = np.arange(n)
  offsets = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
  table = np.stack([index[ys + 1 + dy, xs + 1 + dx] for dy, dx in offsets], axis=1)
  neighbours = table.tolist()

  def bfs(source):
    # Plain BFS: skeleton graphs are small (hundreds of nodes), where a Python loop beats
    # building a sparse matrix. Neighbour order is fixed, so ties break deterministically.
    parent = [-2] * n
    parent[source] = -1
    queue = [source]
    head = 0
    while head < len(queue):
      node = queue[head]
      head += 1
      for nb in neighbours[node]:
        if nb >= 0 and parent[nb] == -2:
          parent[nb] = node
          queue.append(nb)
    return queue[-1], parent  # BFS visits by non-decreasing distance: the last is farthest.

  u, _ = bfs(0)
  v, parent = bfs(u)
  path = [v]
  while path[-1] != u:
    path.append(parent[path[-1]])
  path = np.asarray(path[::-1])
  return np.stack([ys[path], xs[path]], axis=1)


# ----------------------------------------------------------------------------------------------
# Scribbles.


def _largest_piece(binary: np.ndarray) -> np.ndarray:
  pieces, num = ndi.label(binary, structure=_EIGHT)
  if num <= 1:
    return binary
  sizes = np.bincount(pieces.ravel())[1:]
  return pieces == (np.argmax(sizes) + 1)


def scribble_polylines_from_mask(
    mask: np.ndarray, seed: Any, *, erode_px: int = 3, erode_fraction: float = 0.5,
    min_length: float = 0.3, max_length: float = 1.0, drop_prob: float = 0.0,
    min_skeleton_px: int = 3, classes: Sequence[int] | None = None,
) -> list[tuple[int, list[tuple[int, int]]]]:
  """Synthetic scribbles as polylines, one per connected component of every class.

  For each 8-connected component of each class (background included), following
  reference §6: erode by ``min(erode_px, erode_fraction * max distance to the border)`` pixels so
  the stroke stays inside, skeletonise, take the longest geodesic path of the largest skeleton
  piece, and keep a random contiguous sub-path whose length is a fraction in
  ``[min_length, max_length]`` of the path. Where the skeleton path is shorter than half the
  core's extent (compact convex shapes thin to a point), the longest geodesic path through the
  eroded core is used instead. Components whose skeleton has fewer than
  ``min_skeleton_px`` pixels get a single click at their distance-transform maximum.

  Args:
    mask: integer [H, W]; 255 = ignore (never scribbled).
    seed: int, sequence of ints or `np.random.Generator`; same seed -> same scribbles.
    erode_px, erode_fraction: erosion before skeletonisation.
    min_length, max_length: range of the kept relative length ρ.
    drop_prob: probability of dropping each component's scribble.
    min_skeleton_px: below this skeleton size a component gets a click instead.
    classes: restrict to these classes (default: every class present).

  Returns:
    ``[(class_id, [(x, y), ...]), ...]``, points 8-connected, in (class, component) order.
  """
  mask = _check_mask(mask)
  if not 0.0 < min_length <= max_length <= 1.0:
    raise ValueError(f"need 0 < min_length <= max_length <= 1, got {min_length}, {max_length}")
  rng = _as_seed(seed)
  present = [int(c) for c in np.unique(mask) if c != IGNORE_INDEX]
  if classes is not None:
    present = [c for c in present if c in set(int(k) for k in classes)]
  scribbles = []
  for c in present:
    components, num = ndi.label(mask == c, structure=_EIGHT)
    for k, box in enumerate(ndi.find_objects(components)):
      # Random numbers are drawn in a fixed order whatever happens, so one component's outcome
      # never shifts another's.
      rho = rng.uniform(min_length, max_length)
      start_u = rng.uniform()
      dropped = rng.uniform() < drop_prob
      if dropped:
        continue
      # A one-pixel margin, plus padding where the crop meets the image border, so that all
      # outside pixels count as outside for the distance transform.
      y0, x0 = max(box[0].start - 1, 0), max(box[1].start - 1, 0)
      y1, x1 = box[0].stop + 1, box[1].stop + 1
      region = components[y0:y1, x0:x1] == (k + 1)
      dist = ndi.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
      depth = min(float(erode_px), erode_fraction * float(dist.max()))
      core = dist > depth
      path = np.zeros((0, 2), np.int64)
      if core.any():
        skeleton = skeletonize(core)
        if skeleton.sum() >= min_skeleton_px:
          path = longest_path(_largest_piece(skeleton))
        # Compact convex regions (disks, squares) thin to a point or a stub, where a person
        # would draw a stroke across; take the longest geodesic path of the core instead.
        rows, cols = np.nonzero(core)
        extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        if len(path) < max(min_skeleton_px, 0.5 * extent):
          path = longest_path(_largest_piece(core))
      if len(path) < min_skeleton_px:
        cy, cx = np.unravel_index(np.argmax(dist), dist.shape)
        path = np.array([[cy, cx]])
      else:
        keep = max(1, int(round(rho * len(path))))
        start = int(start_u * (len(path) - keep + 1))
        start = min(start, len(path) - keep)
        path = path[start:start + keep]
      scribbles.append((c, [(int(x) + x0, int(y) + y0) for y, x in path]))
  return scribbles


def scribbles_from_mask(
    mask: np.ndarray, seed: Any, *, width: int = 1, return_polylines: bool = False, **kwargs,
) -> np.ndarray | tuple[np.ndarray, list]:
  """Synthetic scribble map from a full mask (see `scribble_polylines_from_mask`).

  Args:
    mask: integer [H, W]; 255 = ignore.
    seed: int, sequence of ints or `np.random.Generator`.
    width: stroke width (odd): 1 as in Gated CRF, 3 as in rloss. Wide strokes are clipped to
      their class's pixels, so every scribbled pixel carries the mask's class.
    return_polylines: also return the polylines.
    **kwargs: forwarded to `scribble_polylines_from_mask`.

  Returns:
    int32 [H, W] scribble map (class on scribbled pixels, 255 elsewhere), and the polylines if
    asked for.
  """
  mask = _check_mask(mask)
  polylines = scribble_polylines_from_mask(mask, seed, **kwargs)
  out = scribblesup.rasterize_scribbles(mask.shape[0], mask.shape[1], polylines, width_px=width)
  out[out != mask.astype(np.int32)] = IGNORE_INDEX
  return (out, polylines) if return_polylines else out


def scribble_coverage(scribble: np.ndarray | Iterable[np.ndarray]) -> float:
  """Fraction of pixels that carry a scribble label (!= 255), over one map or many."""
  if isinstance(scribble, np.ndarray):
    maps = [scribble]
  else:
    maps = [np.asarray(s) for s in scribble]
  labelled = sum(int((m != IGNORE_INDEX).sum()) for m in maps)
  total = sum(m.size for m in maps)
  if total == 0:
    raise ValueError("scribble_coverage got no pixels")
  return labelled / total


# ----------------------------------------------------------------------------------------------
# Boxes and instances.


def instances_from_mask(
    mask: np.ndarray, *, background: Sequence[int] = (0,), max_instances: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Instances as 8-connected components of each non-background class.

  Touching instances of the same class merge into one component: class masks alone cannot
  separate them. With ``max_instances``, the largest components are kept (ties by class, then
  raster order).

  Returns:
    ``(instance_masks uint8 [K, H, W], classes int32 [K])``, ordered by class then raster order.
  """
  mask = _check_mask(mask)
  skip = set(int(b) for b in background) | {IGNORE_INDEX}
  masks, classes, areas = [], [], []
  for c in np.unique(mask):
    if int(c) in skip:
      continue
    components, num = ndi.label(mask == c, structure=_EIGHT)
    for k in range(1, num + 1):
      m = components == k
      masks.append(m)
      classes.append(int(c))
      areas.append(int(m.sum()))
  if max_instances is not None and len(masks) > max_instances:
    order = sorted(np.argsort(-np.asarray(areas), kind="stable")[:max_instances])
    masks = [masks[i] for i in order]
    classes = [classes[i] for i in order]
  if not masks:
    return np.zeros((0,) + mask.shape, np.uint8), np.zeros((0,), np.int32)
  return np.stack(masks).astype(np.uint8), np.asarray(classes, np.int32)


def boxes_from_instances(
    instance_masks: np.ndarray, classes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
  """Tight inclusive boxes around instance masks.

  Args:
    instance_masks: [M, H, W] (any dtype; nonzero = inside).
    classes: int [M]; -1 marks padding.

  Returns:
    ``(boxes float32 [M, 4] as (y0, x0, y1, x1), classes int32 [M])``; empty masks and padding
    get a zero box and class -1.
  """
  instance_masks = np.asarray(instance_masks)
  classes = np.asarray(classes)
  if instance_masks.ndim != 3:
    raise ValueError(f"instance_masks must have rank 3 [M, H, W], got {instance_masks.shape}")
  if classes.shape != instance_masks.shape[:1]:
    raise ValueError(f"classes shape {classes.shape} does not match {instance_masks.shape[0]} masks")
  m = instance_masks != 0
  rows = m.any(axis=2)
  cols = m.any(axis=1)
  nonempty = rows.any(axis=1) & (classes >= 0)
  h, w = m.shape[1:]
  y0 = np.argmax(rows, axis=1)
  y1 = h - 1 - np.argmax(rows[:, ::-1], axis=1)
  x0 = np.argmax(cols, axis=1)
  x1 = w - 1 - np.argmax(cols[:, ::-1], axis=1)
  boxes = np.stack([y0, x0, y1, x1], axis=1).astype(np.float32)
  boxes[~nonempty] = 0.0
  return boxes, np.where(nonempty, classes, -1).astype(np.int32)


def boxes_from_mask(
    mask: np.ndarray, *, background: Sequence[int] = (0,), max_instances: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Boxes of the connected components of each class (see `instances_from_mask`).

  Touching instances of one class merge and get one box.

  Returns:
    ``(boxes float32 [K, 4], classes int32 [K])``.
  """
  return boxes_from_instances(*instances_from_mask(
      mask, background=background, max_instances=max_instances))


def pad_instances(
    instance_masks: np.ndarray, classes: np.ndarray, max_instances: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Pads (or truncates) instances to a static count; padding has class -1 and empty masks."""
  k = min(len(classes), max_instances)
  h, w = instance_masks.shape[1:]
  out_masks = np.zeros((max_instances, h, w), np.uint8)
  out_classes = np.full((max_instances,), -1, np.int32)
  out_masks[:k] = instance_masks[:k] != 0
  out_classes[:k] = classes[:k]
  return out_masks, out_classes


# ----------------------------------------------------------------------------------------------
# Tags.


def _class_counts(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """Pixels of each class [num_classes], 255 skipped; a ValueError for labels out of range."""
  values = mask[mask != IGNORE_INDEX].astype(np.int64)
  if values.size and (values.min() < 0 or values.max() >= num_classes):
    raise ValueError(f"mask has labels outside [0, {num_classes}) other than {IGNORE_INDEX}: "
                     f"min {values.min()}, max {values.max()}")
  return np.bincount(values, minlength=num_classes)


def tags_from_mask(mask: np.ndarray, num_classes: int, min_pixels: int = 1) -> np.ndarray:
  """Image-level multi-hot labels: class ``c`` is on when at least ``min_pixels`` pixels have it.

  Ignored pixels (255) do not count.

  Returns:
    float32 [num_classes].
  """
  mask = _check_mask(mask)
  counts = _class_counts(mask, num_classes)
  return (counts >= min_pixels).astype(np.float32)


def large_tags_from_mask(mask: np.ndarray, num_classes: int,
                         fraction: float = LARGE_FRACTION) -> np.ndarray:
  """CCNN's size tags: class ``c`` is on when it covers more than ``fraction`` of the image.

  The fraction is over all pixels of the image, ignored ones (255) included, as the size
  constraint's mean is over all (valid) pixels.

  Returns:
    float32 [num_classes].
  """
  mask = _check_mask(mask)
  counts = _class_counts(mask, num_classes)
  return (counts > fraction * max(mask.size, 1)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Bbox-Seg labels (WSSL): the dense-CRF segmentation of the boxes.


_BOX_SEG_FNS = {}


def _box_seg_fn(num_classes: int, settings: tuple):
  """The jitted `bbox_seg_labels` for these static settings (jit caches per shape itself)."""
  key = (num_classes, settings)
  fn = _BOX_SEG_FNS.get(key)
  if fn is None:
    import functools  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from jaxseg.losses import box  # pylint: disable=g-import-not-at-top
    fn = jax.jit(functools.partial(box.bbox_seg_labels, num_classes=num_classes,
                                   **dict(settings)))
    _BOX_SEG_FNS[key] = fn  # Racing threads build equal functions; dict writes are atomic.
  return fn


def box_seg_from_boxes(image: np.ndarray, boxes: np.ndarray, box_classes: np.ndarray, *,
                       background_class: int = 0, max_pixels: int | None = BOX_SEG_MAX_PIXELS,
                       **crf_settings) -> np.ndarray:
  """WSSL's Bbox-Seg labels of one example: `jaxseg.losses.box.bbox_seg_labels` on its boxes.

  The dense CRF (bboxErode20 unary, DeepLab's densecrf settings) runs on the image shrunk to at
  most ``max_pixels`` pixels (see ``BOX_SEG_MAX_PIXELS``) and is upsampled guided by the full
  image. The classes are renumbered to background + the classes of the example's boxes before
  the CRF, with ``M + 1`` channels for M box slots (a Potts CRF does not care which numbers
  the classes have, and a channel without a box never wins), so the result does not depend on
  the dataset's class count and one compilation serves every example of a size. Costly (tens
  of ms, plus seconds to compile): compute it once per example and keep it, as
  `jaxseg.data.Source` does.

  Args:
    image: uint8 [H, W, 3] (or float in [0, 1]).
    boxes: float32 [M, 4] (y0, x0, y1, x1) inclusive; box_classes: int [M], -1 = padding.
    background_class: the label of pixels outside every box.
    max_pixels: CRF resolution budget (None: full resolution; O(P^2) time and memory).
    **crf_settings: other keyword arguments of `bbox_seg_labels` (``bilateral_sigma_rgb``, ...).

  Returns:
    int32 [H, W].
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  box_classes = np.asarray(box_classes, np.int64).reshape(-1)
  if len(boxes) != len(box_classes):
    raise ValueError(f"{len(boxes)} boxes but {len(box_classes)} box classes")
  h, w = image.shape[:2]
  real = (box_classes >= 0) & (box_classes != background_class)
  classes = np.unique(box_classes[real])
  if classes.size == 0:
    return np.full((h, w), background_class, np.int32)
  # Renumber: background 0, the box classes 1..K.
  local = np.zeros(len(box_classes), np.int32)
  local[real] = np.searchsorted(classes, box_classes[real]) + 1
  local[box_classes < 0] = -1
  image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
  settings = tuple(sorted(dict(crf_settings, max_pixels=max_pixels).items()))
  fn = _box_seg_fn(len(box_classes) + 1, settings)
  labels = np.asarray(fn(image[None], boxes[None], local[None]))[0]
  lookup = np.concatenate([[background_class], classes]).astype(np.int32)
  return lookup[labels]


# ----------------------------------------------------------------------------------------------
# All at once.


def synthesize(
    example: Mapping[str, np.ndarray], seed: Any, *, num_classes: int,
    kinds: Sequence[str] = WEAK_KINDS, max_instances: int = 8, background: Sequence[int] = (0,),
    scribble_width: int = 1, min_tag_pixels: int = 1, box_seg_settings: Mapping | None = None,
    **scribble_kwargs,
) -> dict[str, np.ndarray]:
  """Adds the missing weak label kinds to an example that has a full ``mask``.

  Existing keys are kept as they are. Instances (and so boxes) come from
  ``instance_masks`` when the example has them, otherwise from connected components of the mask
  (touching instances of a class merge), padded to ``max_instances`` (largest kept).

  Args:
    example: dict with ``mask`` (integer [H, W]) and possibly other keys (``image`` for
      ``box_seg``).
    seed: seed of the scribbles (int, ints or Generator).
    num_classes: number of classes (for tags).
    kinds: which of ``scribble``, ``boxes`` (with ``box_classes``), ``tags`` (with
      ``tags_large``), ``tags_large``, ``instance_masks`` and, on request only, ``box_seg``
      (`box_seg_from_boxes`; its background is ``background[0]``) to add.
    max_instances: static instance/box count.
    background: classes that get no instance or box.
    scribble_width, **scribble_kwargs: see `scribbles_from_mask`.
    min_tag_pixels: see `tags_from_mask`.
    box_seg_settings: keyword arguments of `box_seg_from_boxes`.

  Returns:
    a new dict.
  """
  if "mask" not in example:
    raise ValueError(f"synthesize needs a 'mask'; example has keys {sorted(example)}")
  unknown = set(kinds) - set(WEAK_KINDS) - set(DERIVED_KINDS)
  if unknown:
    raise ValueError(f"unknown weak label kinds {sorted(unknown)}; valid: "
                     f"{WEAK_KINDS + DERIVED_KINDS}")
  if "box_seg" in kinds and "box_seg" not in example and "image" not in example:
    raise ValueError(f"synthesize: 'box_seg' needs the 'image'; example has keys {sorted(example)}")
  mask = _check_mask(example["mask"])
  out = dict(example)
  if "scribble" in kinds and "scribble" not in out:
    out["scribble"] = scribbles_from_mask(mask, seed, width=scribble_width, **scribble_kwargs)
  if "tags" in kinds and "tags" not in out:
    out["tags"] = tags_from_mask(mask, num_classes, min_tag_pixels)
  if ("tags" in kinds or "tags_large" in kinds) and "tags_large" not in out:
    out["tags_large"] = large_tags_from_mask(mask, num_classes)
  need_boxes = ("boxes" in kinds or "box_seg" in kinds) and "boxes" not in out
  need_instances = ("instance_masks" in kinds and "instance_masks" not in out) or need_boxes
  boxes = None
  if need_instances:
    if "instance_masks" in out and "box_classes" in out:
      inst, classes = np.asarray(out["instance_masks"]), np.asarray(out["box_classes"])
    else:
      inst, classes = instances_from_mask(mask, background=background, max_instances=max_instances)
      inst, classes = pad_instances(inst, classes, max_instances)
    if "instance_masks" in kinds and "instance_masks" not in out:
      out["instance_masks"] = inst
    if need_boxes:
      boxes = boxes_from_instances(inst, classes)
      if "boxes" in kinds:
        out["boxes"], out["box_classes"] = boxes
  if "box_seg" in kinds and "box_seg" not in out:
    bx, cl = boxes if boxes is not None else (out["boxes"], out["box_classes"])
    settings = dict(box_seg_settings or {})
    settings.setdefault("background_class", int(background[0]) if len(background) else 0)
    out["box_seg"] = box_seg_from_boxes(out["image"], bx, cl, **settings)
  return out
