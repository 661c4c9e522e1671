"""Input checks and small pieces shared by the weak-supervision losses."""
import contextlib
import contextvars
from typing import Optional

import jax
import jax.numpy as jnp

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


def check_labels(labels, shape, key: str, where: str) -> jax.Array:
  if tuple(labels.shape) != tuple(shape):
    raise ValueError(f"{where}: batch[{key!r}] must have shape {tuple(shape)}, "
                     f"got {tuple(labels.shape)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{where}: batch[{key!r}] must hold integer class ids, "
                    f"got dtype {labels.dtype}")
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

