"""Input checks and small pieces shared by the weak-supervision losses."""
import contextlib
import contextvars
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.constants import IGNORE_INDEX

# The mapped axis over which a batch is split while a loss is traced (set by the pmap train
# step); None under jit, where the loss sees the global batch.
_SHARD_AXIS: contextvars.ContextVar = contextvars.ContextVar("jaxseg_shard_axis", default=None)


@contextlib.contextmanager
def batch_sharded_over(axis_name: Optional[str]):
  """Within this block, losses normalise counts over ``axis_name`` (see :func:`global_mean`).

  The pmap train step traces the loss inside it, so a loss normalised by a count (labelled
  pixels, box edges) gives the loss of the whole global batch, as under jit.
  """
  token = _SHARD_AXIS.set(axis_name)
  try:
    yield
  finally:
    _SHARD_AXIS.reset(token)


# True while the caller vouches that the labels a loss reads are in range (see labels_checked).
_LABELS_CHECKED: contextvars.ContextVar = contextvars.ContextVar("jaxseg_labels_checked",
                                                                 default=False)


@contextlib.contextmanager
def labels_checked():
  """Within this block, losses skip their label-range check (:func:`check_label_values`).

  For callers that have checked the labels already: the trainer validates every batch on the
  host before its step and traces the step inside this block, so the step's program holds no
  range reduction and no host callback; losses that build labels themselves (E-steps,
  pseudo-labels, all in range by construction) call ``cross_entropy`` inside it. Shapes and
  dtypes are still checked.

  The flag is read while a function is traced, and ``jax.jit`` caches traces by function: a
  function first jitted inside the block keeps its unchecked trace outside it (and the other
  way round), so trace a step function that should skip the check inside it, always.
  """
  token = _LABELS_CHECKED.set(True)
  try:
    yield
  finally:
    _LABELS_CHECKED.reset(token)


def global_mean(total: jax.Array, count: jax.Array, *, min_count: float = 1e-12) -> jax.Array:
  """``total / count`` where ``count`` is the count of the whole global batch.

  Under jit the loss already sees the global batch. Under pmap each device holds a shard:
  dividing the local ``total`` by the mean over devices of ``count`` makes the pmean of the
  per-device losses (what the pmap step reports and differentiates) equal to
  ``sum(total) / sum(count)`` -- the jit value -- however unevenly the shards hold labelled
  pixels. ``count`` carries no gradient.

  Args:
    total: float32 scalar, the sum over this shard.
    count: float32 scalar, the normalising count over this shard.
    min_count: floor of the (global) count, so an empty batch gives 0, not NaN.
  """
  count = jax.lax.stop_gradient(jnp.asarray(count, jnp.float32))
  axis = _SHARD_AXIS.get()
  if axis is not None:
    count = jax.lax.pmean(count, axis)
  return total / jnp.maximum(count, min_count)


def global_sum(x: jax.Array) -> jax.Array:
  """``x`` summed over the shards of the batch (itself under jit, a psum under pmap)."""
  axis = _SHARD_AXIS.get()
  return x if axis is None else jax.lax.psum(x, axis)


def check_logits(logits, where: str) -> jax.Array:
  """float32 logits [N,H,W,C] or a ValueError/TypeError naming ``where``."""
  if not hasattr(logits, "ndim") or logits.ndim != 4:
    shape = getattr(logits, "shape", type(logits).__name__)
    raise ValueError(f"{where}: logits must be [N,H,W,C], got shape {shape}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"{where}: logits must be floating point, got dtype {logits.dtype}")
  if logits.shape[-1] < 2:
    raise ValueError(f"{where}: logits need at least 2 classes, got C={logits.shape[-1]}")
  return logits.astype(jnp.float32)


def require(batch, key: str, where: str):
  if not isinstance(batch, dict):
    raise TypeError(f"{where}: batch must be a dict of arrays, got {type(batch).__name__}")
  if key not in batch:
    raise ValueError(f"{where} needs batch[{key!r}]; the batch has keys {sorted(batch)}")
  return batch[key]


def get_image(batch, logits, where: str) -> jax.Array:
  """``batch["image"]`` as float32 [N,H,W,3] in 0-255 units (the reference sigmas' units)."""
  image = require(batch, "image", where)
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"{where}: batch['image'] must be [N,H,W,3], got shape {image.shape}")
  if tuple(image.shape[:3]) != tuple(logits.shape[:3]):
    raise ValueError(f"{where}: batch['image'] {tuple(image.shape[:3])} and logits "
                     f"{tuple(logits.shape[:3])} must share N,H,W (logits at input resolution)")
  return jax.lax.stop_gradient(jnp.asarray(image, jnp.float32) * 255.0)


def get_valid(batch, shape, where: str) -> jax.Array:
  """``batch["valid"]`` as float32 [N,H,W] (ones when absent)."""
  if "valid" not in batch:
    return jnp.ones(shape, jnp.float32)
  valid = batch["valid"]
  if tuple(valid.shape) != tuple(shape):
    raise ValueError(f"{where}: batch['valid'] must have shape {tuple(shape)}, "
                     f"got {tuple(valid.shape)}")
  return jnp.asarray(valid).astype(jnp.float32)


def bad_labels(labels, num_classes: int, *, low: int = 0,
               ignore_index: Optional[int] = IGNORE_INDEX):
  """Bool mask of ``labels`` (NumPy or jnp, any integer dtype) outside the valid set.

  The valid set is ``[low, num_classes)`` plus ``ignore_index`` (None: no ignore value).
  """
  if getattr(labels.dtype, "kind", "i") == "u":  # -1 does not compare with unsigned arrays
    labels = labels.astype(np.int64) if isinstance(labels, np.ndarray) else labels.astype(
        jnp.int32)
  bad = (labels < low) | (labels >= num_classes)
  return bad if ignore_index is None else bad & (labels != ignore_index)


def valid_label_text(num_classes: int, *, low: int = 0,
                     ignore_index: Optional[int] = IGNORE_INDEX) -> str:
  """The valid set of :func:`bad_labels` in words: ``[0, 3) (255 is the only ignore value)``."""
  text = f"[{low}, {num_classes})"
  if ignore_index is not None:
    return f"{text} ({ignore_index} is the only ignore value)"
  return f"{text} ({low} = padding)" if low < 0 else text


def label_error(name: str, where: str, labels: np.ndarray, num_classes: int, *, low: int = 0,
                ignore_index: Optional[int] = IGNORE_INDEX, hint: Optional[str] = None) -> str:
  """The message naming ``name``, up to 8 of its bad values, how many and the valid set."""
  bad = bad_labels(labels, num_classes, low=low, ignore_index=ignore_index)
  values = np.unique(labels[bad])[:8].tolist()
  if hint is None:
    hint = (f"the logits have {num_classes} classes: give unlabelled or void pixels "
            f"{ignore_index} and make num_classes cover every class id")
  return (f"{where}: {name} has labels {values} outside "
          f"{valid_label_text(num_classes, low=low, ignore_index=ignore_index)} "
          f"(in {int(np.count_nonzero(bad))} of {labels.size} entries); {hint}")


@functools.partial(jax.jit, static_argnames=("num_classes", "low", "ignore_index"))
def _count_bad(labels, num_classes, low, ignore_index):
  return jnp.sum(bad_labels(labels, num_classes, low=low, ignore_index=ignore_index),
                 dtype=jnp.int32)


def _host_values(labels) -> np.ndarray:
  """This process's entries of a NumPy array or ``jax.Array`` (all of them on one host)."""
  if isinstance(labels, jax.Array) and not labels.is_fully_addressable:
    return np.concatenate([np.asarray(s.data).ravel() for s in labels.addressable_shards])
  return np.asarray(labels)


def check_label_values(labels, num_classes: int, name: str, where: str, *, low: int = 0,
                       ignore_index: Optional[int] = IGNORE_INDEX,
                       hint: Optional[str] = None) -> None:
  """Raises ValueError unless every entry of ``labels`` is in ``[low, num_classes)`` or is
  ``ignore_index``; the message is :func:`label_error`'s.

  Concrete labels (NumPy, ``jax.Array``) are checked now: NumPy on the host, a ``jax.Array``
  by a jitted count whose scalar is fetched (the values are copied to the host only when some
  are bad). Traced labels (a loss inside the caller's ``jax.jit``) get an in-graph count and,
  only when it is non-zero, a ``jax.debug.callback`` that raises the same ValueError on the
  host; the jitted call then fails with a ``JaxRuntimeError`` whose text holds the message.
  Skipped inside :func:`labels_checked`.

  Args:
    labels: integer array of any shape.
    num_classes: C; valid ids are below it.
    name: how the message names the array, e.g. ``"batch['mask']"``.
    where: the function being called (message prefix).
    low: the smallest valid id (-1 where -1 pads, as ``box_classes``).
    ignore_index: the one value outside the range that is allowed; None for none.
    hint: the fix the message suggests (default: about ignore values and num_classes).
  """
  if _LABELS_CHECKED.get() or not labels.size:
    return
  spec = dict(low=low, ignore_index=ignore_index, hint=hint)

  def fail(host_labels):
    # Under vmap the cond becomes a select and this runs on every call: raise only when bad.
    host_labels = np.asarray(host_labels)
    if bad_labels(host_labels, num_classes, low=low, ignore_index=ignore_index).any():
      raise ValueError(label_error(name, where, host_labels, num_classes, **spec))

  if isinstance(labels, jax.core.Tracer):
    count = jnp.sum(bad_labels(labels, num_classes, low=low, ignore_index=ignore_index),
                    dtype=jnp.int32)
    jax.lax.cond(count > 0, lambda x: jax.debug.callback(fail, x), lambda x: None, labels)
    return
  if isinstance(labels, jax.Array):
    count = _count_bad(labels, num_classes, low, ignore_index)
    if not int(np.asarray(count.addressable_data(0))):
      return
  fail(_host_values(labels))


def check_labels(labels, shape, key: str, where: str, *, num_classes: Optional[int] = None,
                 ignore_index: Optional[int] = IGNORE_INDEX,
                 name: Optional[str] = None) -> jax.Array:
  """``batch[key]`` checked and as int32: shape ``shape``, an integer dtype and, when
  ``num_classes`` is given, values in ``[0, num_classes)`` or ``ignore_index``
  (:func:`check_label_values`). ``name`` replaces ``batch[key]`` in the messages.

  Raises:
    ValueError: wrong shape or out-of-range values.
    TypeError: not an array, or a non-integer dtype (float or bool masks).
  """
  name = f"batch[{key!r}]" if name is None else name
  if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
    raise TypeError(f"{where}: {name} must be an integer array, got "
                    f"{type(labels).__name__}")
  if tuple(labels.shape) != tuple(shape):
    raise ValueError(f"{where}: {name} must have shape {tuple(shape)}, "
                     f"got {tuple(labels.shape)} (does not match the logits' [N,H,W])")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{where}: {name} must hold integer class ids, got dtype "
                    f"{labels.dtype}; convert with .astype(np.int32) (resize label maps with "
                    "nearest-neighbour interpolation, never bilinear)")
  if num_classes is not None:
    check_label_values(labels, num_classes, name, where, ignore_index=ignore_index)
  return jnp.asarray(labels, jnp.int32)


def check_positive(where: str, **values):
  for name, value in values.items():
    if not value > 0:
      raise ValueError(f"{where}: {name} must be > 0, got {value}")


def warmup_factor(batch, step, warmup_steps: int, where: str) -> jax.Array:
  """Linear ramp ``min(step / warmup_steps, 1)`` as a float32 scalar.

  ``step`` is a Python number or an array (a scalar; of a larger array the first entry is
  used). ``jaxseg.train.make_train_step`` passes ``step=state.step`` to every loss that
  declares ``step``; being an array, a changing step never triggers recompilation. ``batch``
  is not read (the batch carries data only, DESIGN.md "Losses"); the argument stays so
  callers keep one signature.
  """
  del batch
  if warmup_steps < 0:
    raise ValueError(f"{where}: warmup_steps must be >= 0, got {warmup_steps}")
  if warmup_steps == 0:
    return jnp.ones((), jnp.float32)
  if step is None:
    raise ValueError(
        f"{where}: warmup_steps={warmup_steps} needs the training step. "
        "jaxseg.train.make_train_step passes it automatically (step=state.step); research "
        f"code calling the loss directly must pass step=, e.g. {where}(logits, batch, ..., "
        "step=state.step)")
  step = jnp.asarray(step, jnp.float32).reshape(-1)[0]
  return jnp.clip(step / float(warmup_steps), 0.0, 1.0)


def masked_mean_per_image(values: jax.Array, weight: jax.Array) -> jax.Array:
  """Per-image weighted means [N] of ``values`` [N,...]; 0 for an image with no weight."""
  axes = tuple(range(1, values.ndim))
  return jnp.sum(values * weight, axes) / jnp.maximum(jnp.sum(weight, axes), 1e-12)

