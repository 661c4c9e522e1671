"""Segment your own images: arrays (:func:`predict`) or files on disk (:func:`predict_files`).

``predict(variables, model, images)`` takes uint8 RGB ``[H,W,3]`` or ``[N,H,W,3]`` (or float in
[0, 1]) of any size and returns int32 class ids ``[H,W]`` (``[N,H,W]``). With
``window=(h, w)`` (typically the training crop) an image larger than the window along either
axis is segmented with :func:`jaxseg.evaluation.sliding_window`, and a smaller one is padded
with zeros (black) up to the window and the labels cropped back, so a model only ever sees
inputs at least as large as the window and every small image shares one compiled shape.

The forward pass is jit-compiled once per (model, window options) and cached; ``jax.jit``
then compiles once per input shape and dtype. Repeated calls on images of one size therefore
never recompile; each new size above the window compiles once.

``predict_files(inputs, out_dir, ...)`` reads JPEG/PNG files (a folder, a glob, or a list of
paths), writes ``<stem>.png`` (a paletted PNG: its pixels are the class ids, its palette
shows them in colour) and ``<stem>_overlay.png`` (image | image blended with the coloured
labels) into ``out_dir``, and reports the throughput. ``python eval.py --workdir RUN --images
DIR --out OUT`` runs it on a trained run.
"""
import collections
import concurrent.futures
import glob
import os
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from jaxseg import fileio
from jaxseg.evaluation import visualize
from jaxseg.evaluation.inference import _check_slide, _positive_pair, sliding_window

IntPair = Union[int, Sequence[int]]
PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Compiled forward passes kept alive (each holds its XLA executables, one per input shape).
_CACHE_SIZE = 16
_CACHE: "collections.OrderedDict[Tuple, Tuple[Any, Any]]" = collections.OrderedDict()


# ----------------------------------------------------------------------------- validation

def _check_images(images: Any) -> Tuple[np.ndarray, bool]:
  """``images`` as a NumPy ``[N,H,W,3]`` uint8 or float32 array, and whether it was batched.

  Raises:
    TypeError: a dtype that is not uint8 or floating point (bool, other integers, objects).
    ValueError: a wrong rank or channel layout (the message says how to convert), an empty
      image, or float values outside [0, 1] or not finite.
  """
  if isinstance(images, Image.Image):
    raise TypeError(f"predict: images must be an array; got a PIL image (mode {images.mode}): "
                    "pass np.asarray(image.convert('RGB'))")
  x = np.asarray(images)
  shape = x.shape
  if x.dtype == bool:
    raise TypeError(f"predict: images have dtype bool (a mask?) and shape {shape}; pass RGB "
                    "images: uint8 in 0-255 or float in [0, 1]")
  if x.dtype.kind not in "uf" or (x.dtype.kind == "u" and x.dtype != np.uint8):
    hint = (" (16-bit images: convert to 8 bits with (x >> 8).astype(np.uint8))"
            if x.dtype == np.uint16 else
            " (if the values are 0-255, x.astype(np.uint8))" if x.dtype.kind in "iu" else "")
    raise TypeError(f"predict: images must be uint8 (0-255) or float in [0, 1]; got dtype "
                    f"{x.dtype}{hint}")
  if x.ndim == 2:
    raise ValueError(f"predict: images of shape {shape} have no channel axis (grayscale?): "
                     "repeat to RGB with np.repeat(x[..., None], 3, axis=-1)")
  if x.ndim not in (3, 4):
    raise ValueError(f"predict: images must be [H,W,3] or [N,H,W,3] (rank 3 or 4); got shape "
                     f"{shape}")
  if shape[-1] != 3:
    channels_first = shape[-3] in (1, 3, 4) and shape[-1] not in (1, 3, 4)
    if channels_first:
      axes = "(1, 2, 0)" if x.ndim == 3 else "(0, 2, 3, 1)"
      hint = (f"this looks channels-first; predict takes channels-last [..,H,W,3]: transpose "
              f"with x.transpose{axes}")
    elif shape[-1] == 1:
      hint = "1 channel looks grayscale: repeat it with np.repeat(x, 3, axis=-1)"
    elif shape[-1] == 4:
      hint = "4 channels look RGBA: drop alpha with x[..., :3]"
    else:
      hint = f"{shape[-1]} channels"
    raise ValueError(f"predict: images must have 3 (RGB) channels last; got shape {shape}: "
                     f"{hint}")
  batched = x.ndim == 4
  if not batched:
    x = x[None]
  if 0 in x.shape:
    raise ValueError(f"predict: images must not be empty; got shape {shape}")
  if x.dtype != np.uint8:
    x = x.astype(np.float32)
    lo, hi = x.min(), x.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
      raise ValueError(f"predict: images hold {int(np.isnan(x).sum())} NaN and "
                       f"{int(np.isinf(x).sum())} inf values")
    if hi > 1:
      raise ValueError(f"predict: float images must be in [0, 1] but reach {float(hi):.4g}: "
                       "pass uint8 0-255 images as they are, or divide by 255")
    if lo < 0:
      raise ValueError(f"predict: float images must be in [0, 1] but go down to {float(lo):.4g} "
                       "(mean/std-normalised?): pass raw RGB (uint8 0-255 or float in [0, 1]); "
                       "the models normalise themselves")
  return x, batched


def _check_model(variables: Any, model: Any) -> None:
  if getattr(model, "takes_targets", False):
    raise ValueError(f"predict: {type(model).__name__} is an instance segmentation model: its "
                     "output is detections, not a label map, and predict does not support it; "
                     "call model.apply(variables, images, train=False) and draw the result with "
                     "jaxseg.evaluation.visualize.draw_instances")
  if not callable(getattr(model, "apply", None)):
    raise TypeError(f"predict: model must be a flax module; got {type(model).__name__}")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TypeError("predict: variables must be the dict model.init returns ({'params': ..., "
                    f"'batch_stats': ...}}); got {type(variables).__name__} (for a restored run "
                    "pass run.variables)")


def _window_options(window, stride, blend, batch_windows) -> Optional[Dict[str, Any]]:
  """Validated sliding-window options, or None for whole-image inference."""
  if window is None:
    if stride is not None:
      raise ValueError(f"predict: stride={stride!r} needs a window=(h, w)")
    return None
  window = _positive_pair(window, "window")
  if stride is None:  # ~1/3 overlap between neighbouring windows, as MMSeg's 512/341
    stride = tuple(max(1, round(2 * side / 3)) for side in window)
  opts = _check_slide(window, stride, blend, 1 / 8, batch_windows, "constant")
  return {k: opts[k] for k in ("window", "stride", "blend", "batch_windows")}


# ----------------------------------------------------------------------------- compiled pass

def _compiled(model, opts: Optional[Dict[str, Any]], logits: bool):
  """The jitted ``fn(variables, images [N,H,W,3] uint8|float32) -> labels or logits``.

  Cached on the model (flax modules compare and hash by their fields, so an equal module
  built again reuses the entry) and the window options.
  """
  opts_key = None if opts is None else tuple(sorted(opts.items()))
  try:
    key = (model, opts_key, logits)
    hash(key)
    by_identity = False
  except TypeError:  # a module with unhashable fields: cache on its identity
    key = ("id", id(model), opts_key, logits)
    by_identity = True
  entry = _CACHE.get(key)
  # An identity key is only valid while that very module is alive (the entry holds it).
  if entry is not None and (not by_identity or entry[0] is model):
    _CACHE.move_to_end(key)
    return entry[1]

  def apply(variables, x):
    out = model.apply(variables, x, train=False)
    if not hasattr(out, "shape") or out.ndim != 4 or tuple(out.shape[:3]) != tuple(x.shape[:3]):
      got = list(out.shape) if hasattr(out, "shape") else type(out).__name__
      raise ValueError(f"predict: {type(model).__name__} must return logits [N,H,W,C] at the "
                       f"input resolution; for input {list(x.shape)} it returned {got} (models "
                       "whose output is smaller, such as the unpadded 'valid' UNet, are not "
                       "supported)")
    return out.astype(jnp.float32)

  def run(variables, x):
    if x.dtype == jnp.uint8:
      x = x.astype(jnp.float32) / 255
    if opts is None or tuple(x.shape[1:3]) == opts["window"]:
      out = apply(variables, x)
    else:
      one_window = jax.ShapeDtypeStruct((1, *opts["window"], 3), jnp.float32)
      num_classes = jax.eval_shape(lambda w: apply(variables, w), one_window).shape[-1]
      out = sliding_window(lambda w: apply(variables, w), x, num_classes=num_classes, **opts)
    return out if logits else jnp.argmax(out, axis=-1).astype(jnp.int32)

  fn = jax.jit(run)
  _CACHE[key] = (model, fn)
  while len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return fn


def _run(variables, model, images, window, stride, blend, batch_windows, logits: bool):
  x, batched = _check_images(images)
  _check_model(variables, model)
  opts = _window_options(window, stride, blend, batch_windows)
  n, h, w, _ = x.shape
  if opts is not None:
    # Pad on the host, with the zeros sliding_window would pad with, so every image smaller
    # than the window runs at the window's shape (one compilation for all of them).
    wh, ww = opts["window"]
    if h < wh or w < ww:
      x = np.pad(x, ((0, 0), (0, max(wh - h, 0)), (0, max(ww - w, 0)), (0, 0)))
  out = np.asarray(jax.device_get(_compiled(model, opts, logits)(variables, x)))[:, :h, :w]
  return out if batched else out[0]


def predict(variables: Mapping[str, Any], model, images, *, window: Optional[IntPair] = None,
            stride: Optional[IntPair] = None, blend: str = "gaussian",
            batch_windows: int = 4) -> np.ndarray:
  """Class ids of every pixel of ``images``, from a semantic segmentation model in eval mode.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` (``model.init``'s dict, or a restored
      run's ``.variables``). For many calls, ``jax.device_put`` it once: host arrays are copied
      to the device on every call.
    model: a flax module returning logits ``[N,H,W,C]`` at the input resolution.
    images: uint8 ``[H,W,3]`` or ``[N,H,W,3]`` RGB in 0-255, or float in [0, 1]; any H, W.
    window: None (default): one forward pass over the whole image. ``(h, w)`` (or an int): an
      image larger than it along either axis is segmented by :func:`sliding_window`, a smaller
      one is zero-padded (black) up to it and cropped back.
    stride: distance between window starts, ``<= window`` (default: ``round(2/3 * window)``).
    blend: how overlapping windows are merged: ``"gaussian"`` or ``"flat"``.
    batch_windows: window positions per forward pass (memory vs speed).

  Returns:
    int32 ``[H,W]`` (or ``[N,H,W]``) class ids.

  Raises:
    TypeError: images that are not uint8 or float (bool, int64, ...), a Mask R-CNN-like model,
      or variables that are not a dict of collections.
    ValueError: wrong shapes (NCHW, grayscale, RGBA: the message says how to convert), float
      values outside [0, 1] (divide 0-255 images by 255 or pass uint8), bad window options.
  """
  return _run(variables, model, images, window, stride, blend, batch_windows, logits=False)


def predict_logits(variables: Mapping[str, Any], model, images, *,
                   window: Optional[IntPair] = None, stride: Optional[IntPair] = None,
                   blend: str = "gaussian", batch_windows: int = 4) -> np.ndarray:
  """Float32 logits ``[H,W,C]`` (or ``[N,H,W,C]``) of ``images``; arguments as :func:`predict`.

  With a window, pixels covered by several windows get the blended logits of
  :func:`sliding_window`; ``predict`` is their argmax.
  """
  return _run(variables, model, images, window, stride, blend, batch_windows, logits=True)


# ----------------------------------------------------------------------------- files

def _is_image_name(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def list_images(inputs: Union[PathLike, Sequence[PathLike]]) -> List[str]:
  """The image files named by ``inputs``, in order.

  Args:
    inputs: a folder (its ``*.jpg``, ``*.jpeg``, ``*.png`` files, any case, not recursive,
      sorted by name), a glob pattern (``**`` recurses; every matching file, sorted), one file,
      or a list of files (kept in order). Globs and explicit files may name other formats PIL
      reads; files that turn out not to be images are skipped by :func:`predict_files`.

  Raises:
    FileNotFoundError: a path that does not exist, a glob that matches no file.
    ValueError: a folder with no JPEG/PNG file, an empty list, a list naming a folder.
  """
  if isinstance(inputs, (str, os.PathLike)):
    spec = os.fspath(inputs)
    if os.path.isdir(spec):
      names = sorted(n for n in os.listdir(spec)
                     if _is_image_name(n) and os.path.isfile(os.path.join(spec, n)))
      if not names:
        raise ValueError(f"no JPEG/PNG image in the folder {spec} (looked for *.jpg, *.jpeg, "
                         "*.png; subfolders are not searched: pass a glob such as "
                         f"'{os.path.join(spec, '**', '*.png')}')")
      return [os.path.join(spec, n) for n in names]
    if os.path.isfile(spec):
      return [spec]
    if not glob.has_magic(spec):
      raise FileNotFoundError(f"no such file or folder: {spec}")
    paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if not paths:
      raise FileNotFoundError(f"the glob {spec!r} matched no file")
    return paths
  paths = [os.fspath(p) for p in inputs]
  if not paths:
    raise ValueError("no input images: the list of paths is empty")
  for p in paths:
    if os.path.isdir(p):
      raise ValueError(f"{p} is a folder: pass it alone (not in a list) to segment its images")
    if not os.path.isfile(p):
      raise FileNotFoundError(f"no such file: {p}")
  return paths


def output_paths(path: str, out_dir: PathLike) -> Tuple[str, str]:
  """``(<out_dir>/<stem>.png, <out_dir>/<stem>_overlay.png)`` for an input ``path``."""
  stem = os.path.splitext(os.path.basename(path))[0]
  out_dir = os.fspath(out_dir)
  return os.path.join(out_dir, f"{stem}.png"), os.path.join(out_dir, f"{stem}_overlay.png")


def check_outputs(paths: Sequence[str], out_dir: PathLike) -> None:
  """Raises unless segmenting ``paths`` into ``out_dir`` leaves every input untouched.

  Raises:
    ValueError: ``out_dir`` is the folder of an input (outputs would be written, and a later
      run would read them, among the inputs), two inputs would write the same output (``a.jpg``
      and ``a.png``), or ``out_dir`` is an existing file.
  """
  out_real = os.path.realpath(os.fspath(out_dir))
  if os.path.exists(out_real) and not os.path.isdir(out_real):
    raise ValueError(f"--out {out_dir} is an existing file, not a folder")
  for p in paths:
    if os.path.dirname(os.path.realpath(p)) == out_real:
      raise ValueError(f"the output folder {out_dir} holds the input {p}: refusing to write the "
                       "label PNGs among the images (and perhaps over them); choose another "
                       "output folder")
  owners: Dict[str, str] = {}
  for p in paths:
    for out in output_paths(p, out_real):
      if out in owners:
        raise ValueError(f"the inputs {owners[out]} and {p} would both write {out}: rename one "
                         "or segment them into separate output folders")
      owners[out] = p


def read_image(path: PathLike) -> np.ndarray:
  """A JPEG/PNG (or any PIL-readable image) as uint8 RGB ``[H,W,3]``, upright.

  The EXIF orientation tag (phone photos) is applied, so the labels line up with the image as
  viewers show it. Grayscale is repeated to RGB, alpha is dropped, 16-bit images are scaled to
  8 bits, palette images are expanded.

  Raises:
    OSError: not an image PIL can read (``PIL.UnidentifiedImageError``), or truncated.
  """
  with Image.open(path) as img:
    img = ImageOps.exif_transpose(img)
    if img.mode == "I" or img.mode.startswith("I;16"):
      # 16-bit grayscale PNG: PIL's convert("RGB") would clip at 255 instead of rescaling.
      gray = np.clip(np.asarray(img, np.float64) / 257, 0, 255).round().astype(np.uint8)
      return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"))


def label_image(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
  """Class ids ``[H,W]`` as a paletted (mode ``P``) PIL image: pixel values are the ids,
  ``palette`` (uint8 ``[C,3]``, ``C <= 256``) gives their colours."""
  img = Image.fromarray(np.asarray(labels).astype(np.uint8))  # mode L ...
  flat = np.zeros((256, 3), np.uint8)
  flat[:len(palette)] = palette
  img.putpalette(flat.ravel().tolist())  # ... becomes P: same bytes, now shown in colour
  return img


def overlay_image(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, *,
                  alpha: float = 0.5) -> np.ndarray:
  """Side by side: ``image`` | ``image`` blended with the coloured labels. uint8 ``[H,2W,3]``.

  Args:
    image: uint8 ``[H,W,3]``.
    labels: int ``[H,W]`` class ids below ``len(palette)``.
    palette: uint8 ``[C,3]``.
    alpha: opacity of the label colours.
  """
  colour = np.asarray(palette, np.float32)[labels]
  blend = (alpha * colour + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)
  return np.concatenate([image, blend], axis=1)


def _save_png_atomic(img: Image.Image, path: str) -> None:
  """Write ``img`` as a PNG that is either complete or absent (:func:`fileio.atomic_write`)."""
  with fileio.atomic_write(path) as f:
    img.save(f, format="PNG")


def _check_palette(palette, num_classes: int) -> np.ndarray:
  if num_classes > 256:
    raise ValueError(f"{num_classes} classes do not fit a paletted 8-bit PNG (at most 256)")
  if palette is None:
    return visualize.palette(num_classes)
  pal = np.asarray(palette)
  if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] < num_classes:
    raise ValueError(f"palette must be [C,3] RGB with at least {num_classes} rows (one per "
                     f"class); got shape {pal.shape}")
  if pal.dtype.kind not in "iu" or pal.min() < 0 or pal.max() > 255:
    raise ValueError("palette must hold integers in 0-255")
  return pal[:num_classes].astype(np.uint8)


def _read_or_error(path: str):
  try:
    return read_image(path)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    return e


def predict_files(inputs: Union[PathLike, Sequence[PathLike]], out_dir: PathLike, *,
                  variables: Mapping[str, Any], model, class_names: Sequence[str],
                  window: Optional[IntPair] = None, stride: Optional[IntPair] = None,
                  blend: str = "gaussian", batch_windows: int = 4, palette=None,
                  alpha: float = 0.5, progress: bool = True) -> Dict[str, Any]:
  """Segment image files and write label PNGs and overlays into ``out_dir``.

  For every input ``<stem>.<ext>``, writes ``<stem>.png`` (mode ``P``: the pixel values are the
  class ids, the palette shows them in colour; read the ids back with
  ``np.asarray(PIL.Image.open(path))``) and ``<stem>_overlay.png`` (``[H,2W]``: the image |
  the image blended with the coloured labels). Each file is written to a temporary name and
  renamed, so an interruption leaves no partial PNG. Existing outputs are overwritten; inputs
  never are (``out_dir`` may not be an input's folder). Shows a tqdm progress bar (stderr) and
  prints ``N images, X images/s (Y Mpx/s)`` at the end (the time includes reading, writing and
  compiling; each image size above the window compiles once).

  A file that turns out not to be a readable image (e.g. a ``*`` glob matching a text file, a
  truncated JPEG) is skipped with a warning and listed in the result; if no file at all can be
  read, ValueError.

  Args:
    inputs: a folder, a glob, a file or a list of files (see :func:`list_images`).
    out_dir: output folder, created if needed.
    variables, model: as for :func:`predict`.
    class_names: the model's classes (their number sizes the palette).
    window, stride, blend, batch_windows: as for :func:`predict` (``window`` is usually the
      training crop size).
    palette: uint8 ``[C,3]`` colours (default: ``visualize.palette``, the PASCAL VOC map).
    alpha: opacity of the labels in the overlay.
    progress: show the progress bar.

  Returns:
    ``{"images": n, "skipped": [paths], "seconds": s, "images_per_second": x,
    "megapixels_per_second": y, "outputs": [(label_png, overlay_png), ...]}``.
  """
  from tqdm.auto import tqdm
  paths = list_images(inputs)
  check_outputs(paths, out_dir)
  class_names = list(class_names)
  pal = _check_palette(palette, len(class_names))
  _check_model(variables, model)
  _window_options(window, stride, blend, batch_windows)  # fail before reading anything
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  variables = jax.device_put(variables)  # once, not with every image

  outputs, skipped = [], []
  bar = tqdm(total=len(paths), unit="img", desc="segment", dynamic_ncols=True,
             disable=not progress)
  start = time.perf_counter()
  try:
    _segment_all(paths, out_dir, variables, model, class_names, pal, alpha, bar, outputs, skipped,
                 dict(window=window, stride=stride, blend=blend, batch_windows=batch_windows))
  finally:
    bar.close()
  seconds = time.perf_counter() - start
  if not outputs:
    raise ValueError(f"none of the {len(paths)} input files could be read as an image")
  n = len(outputs)
  pixels = sum(int(np.prod(shape)) for _, _, shape in outputs)
  outputs = [(label_png, overlay_png) for label_png, overlay_png, _ in outputs]
  summary = dict(images=n, skipped=skipped, seconds=seconds, images_per_second=n / seconds,
                 megapixels_per_second=pixels / 1e6 / seconds, outputs=outputs)
  skipped_note = f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""
  print(f"{n} images, {summary['images_per_second']:.2f} images/s "
        f"({summary['megapixels_per_second']:.2f} Mpx/s) in {seconds:.1f} s, compilation "
        f"included{skipped_note}; outputs in {out_dir}", flush=True)
  return summary


def _segment_all(paths, out_dir, variables, model, class_names, pal, alpha, bar, outputs,
                 skipped, window_kwargs) -> None:
  """The loop of :func:`predict_files`: appends ``(label_png, overlay_png, (H, W))`` to
  ``outputs`` and unreadable paths to ``skipped``."""
  # Two threads decode the next images and encode finished PNGs (PIL releases the GIL for
  # both) while the device segments the current one; at most two of each are in flight.
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    pending_paths = iter(paths)
    reads: collections.deque = collections.deque()
    writes: collections.deque = collections.deque()

    def read_ahead():
      path = next(pending_paths, None)
      if path is not None:
        reads.append((path, pool.submit(_read_or_error, path)))

    read_ahead()
    read_ahead()
    while reads:
      path, future = reads.popleft()
      read_ahead()
      image = future.result()
      if isinstance(image, Exception):
        warnings.warn(f"skipping {path}: not a readable image ({image})", stacklevel=3)
        skipped.append(path)
        bar.update(1)
        continue
      labels = predict(variables, model, image, **window_kwargs)
      if labels.max() >= len(class_names):
        raise ValueError(f"the model predicted class {int(labels.max())} but class_names has "
                         f"{len(class_names)} entries")
      label_png, overlay_png = output_paths(path, out_dir)
      writes.append(pool.submit(_write_outputs, image, labels, pal, alpha, label_png,
                                overlay_png))
      while len(writes) > 2:
        writes.popleft().result()
      outputs.append((label_png, overlay_png, labels.shape))
      bar.update(1)
    for future in writes:
      future.result()


def _write_outputs(image, labels, palette, alpha, label_png, overlay_png) -> None:
  _save_png_atomic(label_image(labels, palette), label_png)
  _save_png_atomic(Image.fromarray(overlay_image(image, labels, palette, alpha=alpha)),
                   overlay_png)
