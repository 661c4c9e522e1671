"""Train state: params, BatchNorm statistics and optimizer state in one pytree."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` that also carries ``batch_stats``.

  ``batch_stats`` is an empty dict for models without BatchNorm.
  """
  batch_stats: Any = flax.struct.field(default_factory=dict)

  def variables(self):
    """The variables dict that ``apply_fn`` expects."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def check_images(images) -> None:
  """Raise a clear error unless ``images`` is float [N,H,W,3] (values expected in [0, 1])."""
  shape = getattr(images, "shape", None)
  dtype = getattr(images, "dtype", None)
  if shape is None or len(shape) != 4:
    raise ValueError(f"images must be a float array [N,H,W,3]; got shape {shape}")
  if shape[-1] != 3:
    raise ValueError(f"images must have 3 (RGB) channels in the last axis; got shape {shape}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"images must be float32 in [0, 1]; got dtype {dtype} "
                    "(convert uint8 images with images / 255.0)")


def create_train_state(rng: jax.Array, model, tx: optax.GradientTransformation,
                       images) -> TrainState:
  """Initialise ``model`` on ``images`` and wrap it with optimizer ``tx``.

  ``model.init`` runs eagerly (not jitted): jitting it for a UNet costs ~20 s of compile on
  a CPU while the eager path is quick.

  Args:
    rng: PRNG key for parameter initialisation.
    model: a flax.linen segmentation module, ``__call__(images, *, train)``.
    tx: the optax optimizer.
    images: float32 [N,H,W,3]; only its shape and dtype matter (a batch of 1 suffices).

  Returns:
    A :class:`TrainState` at step 0.
  """
  check_images(images)
  images = jnp.asarray(images[:1], jnp.float32)
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({"params": params_rng, "dropout": dropout_rng}, images, train=False)
  return TrainState.create(
      apply_fn=model.apply,
      params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      tx=tx,
  )
