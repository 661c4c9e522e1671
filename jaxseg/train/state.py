"""Train state: params, BatchNorm statistics and optimizer state in one pytree."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jaxseg.models import layers


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` that also carries ``batch_stats``.

  ``batch_stats`` is an empty dict for models without BatchNorm.
  """
  batch_stats: Any = flax.struct.field(default_factory=dict)

  def variables(self):
    """The variables dict that ``apply_fn`` expects."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def check_images(images, where: str = "jaxseg.train") -> None:
  """Raise a clear error unless ``images`` is float [N,H,W,3] RGB in [0, 1].

  The models' own check (:func:`jaxseg.models.layers.check_images`): shape and dtype always,
  values (NaN/inf, 0-255, mean/std-normalised) when ``images`` is concrete. Inside the jitted
  train step the model sees tracers and cannot check values, so ``create_train_state`` and the
  trainer's ``validate_batch`` call this on the host batch before the step runs. A
  ``jax.Array`` batch costs one small reduction whose result is fetched.

  Args:
    images: [N,H,W,3] NumPy array or ``jax.Array``.
    where: prefix of the error messages.
  """
  layers.check_images(images, where)


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
