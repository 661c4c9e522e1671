"""The train and eval steps: one pure function, run under jit over a mesh or under pmap.

``make_train_step(loss_fn)`` returns ``train_step(state, batch, rng) -> (state, metrics)``.
The default path jit-compiles the step with the state donated, the batch sharded over the
``data`` axis of a mesh of all devices and the state replicated. Because the jitted program
sees the global batch, BatchNorm statistics and the loss are global without any collective
in the model code.

``parallel="pmap"`` runs the same pure step under ``jax.pmap``: gradients, loss and
BatchNorm statistics are averaged across devices (BatchNorm layers are switched to
cross-device statistics by intercepting ``nn.BatchNorm``). There the loss is the mean of the
per-device losses, which equals the jit path's global loss when every device holds the same
number of labelled pixels.
"""
import functools
from typing import Callable, Dict, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxseg.constants import IGNORE_INDEX
from jaxseg.train import sharding as shd
from jaxseg.train.state import TrainState, check_images

PMAP_AXIS = "batch"
_LABEL_KEYS = ("mask", "scribble")


def collect_aux_logits(intermediates) -> list:
  """Every array sown as ``aux_logits`` anywhere in an ``intermediates`` collection."""
  found = []
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates)).items():
    if path and path[-1] == "aux_logits":
      found.extend(value if isinstance(value, (tuple, list)) else [value])
  return found


def validate_batch(batch: Dict, num_classes: Optional[int] = None) -> None:
  """Host-side checks that give a clear error instead of a silently wrong step.

  Checks image rank/channels/dtype, label shapes, dtypes and (for NumPy labels, when
  ``num_classes`` is known) that every label lies in [0, C) or is 255.
  """
  if not isinstance(batch, dict) or "image" not in batch:
    raise ValueError("a batch must be a dict with an 'image' entry")
  image = batch["image"]
  check_images(image)
  n, h, w = image.shape[:3]
  for key in _LABEL_KEYS:
    if key not in batch:
      continue
    lab = batch[key]
    if tuple(lab.shape) != (n, h, w):
      raise ValueError(f"batch['{key}'] must have shape [N,H,W] = {(n, h, w)}; got {tuple(lab.shape)}")
    if not jnp.issubdtype(lab.dtype, jnp.integer):
      raise TypeError(f"batch['{key}'] must hold integer class ids; got dtype {lab.dtype}")
    if num_classes is not None and isinstance(lab, np.ndarray) and lab.size:
      bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= num_classes))
      if bad.any():
        vals = np.unique(lab[bad])[:8].tolist()
        raise ValueError(f"batch['{key}'] has labels {vals} outside [0, {num_classes}) "
                         "(255 is the only ignore value)")
  if "valid" in batch and tuple(batch["valid"].shape) != (n, h, w):
    raise ValueError(f"batch['valid'] must have shape {(n, h, w)}; got {tuple(batch['valid'].shape)}")


def _loss_and_grads(state: TrainState, batch, rng, loss_fn, aux_weight):

  def compute(params):
    out, mutated = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        rngs={"dropout": rng}, mutable=["batch_stats", "intermediates"])
    main = loss_fn(out, batch)
    aux_list = collect_aux_logits(mutated.get("intermediates", {}))
    aux = sum((loss_fn(a, batch) for a in aux_list), jnp.zeros((), jnp.float32))
    total = main + aux_weight * aux if aux_list else main
    return total, (mutated.get("batch_stats", {}), main, aux, bool(aux_list))

  (loss, (batch_stats, main, aux, has_aux)), grads = jax.value_and_grad(
      compute, has_aux=True)(state.params)
  metrics = {"loss": loss}
  if has_aux:
    metrics.update(main_loss=main, aux_loss=aux)
  return grads, batch_stats, metrics


def train_step_fn(state: TrainState, batch, rng, *, loss_fn: Callable, aux_weight: float):
  """The pure train step (no parallelism): forward, loss, backward, optimizer update."""
  grads, batch_stats, metrics = _loss_and_grads(state, batch, rng, loss_fn, aux_weight)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def _sync_batch_norm(axis_name: str):
  """Interceptor giving every ``nn.BatchNorm`` without an axis cross-device statistics."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
        and module.axis_name is None):
      # Bound modules are rebuilt on every apply, so this never leaks into the user's model.
      object.__setattr__(module, "axis_name", axis_name)
    return next_fun(*args, **kwargs)

  return interceptor


def _pmap_step_fn(state, batch, rng, *, loss_fn, aux_weight):
  with nn.intercept_methods(_sync_batch_norm(PMAP_AXIS)):
    grads, batch_stats, metrics = _loss_and_grads(state, batch, rng, loss_fn, aux_weight)
  grads = jax.lax.pmean(grads, PMAP_AXIS)
  metrics = jax.lax.pmean(metrics, PMAP_AXIS)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def _is_host(batch) -> bool:
  return all(isinstance(x, np.ndarray) for x in jax.tree.leaves(batch))


def make_train_step(loss_fn: Callable, *, mesh: Optional[Mesh] = None, parallel: str = "jit",
                    aux_weight: float = 0.4, num_classes: Optional[int] = None,
                    donate: bool = True) -> Callable:
  """Build ``train_step(state, batch, rng) -> (state, metrics)``.

  Args:
    loss_fn: ``loss_fn(logits, batch) -> scalar``; any function of this signature, e.g. a
      ``jaxseg.losses`` entry with hyperparameters bound by ``functools.partial``.
    mesh: the data-parallel mesh (``jit`` path); None means all devices of all processes.
    parallel: ``"jit"`` (sharded jit over ``mesh``) or ``"pmap"``. The pmap step takes and
      returns a *replicated* state (see :func:`replicate_state`) and a host batch whose
      size is divisible by the local device count.
    aux_weight: weight of ``loss_fn`` on every ``aux_logits`` sown by the model.
    num_classes: when given, NumPy label batches are checked to lie in [0, C) or be 255.
    donate: donate the input state's buffers (do not reuse a state passed in).

  Returns:
    The step. ``metrics`` holds scalars: ``loss``, ``grad_norm`` and, for models with
    auxiliary heads, ``main_loss`` and ``aux_loss``.
  """
  if parallel not in ("jit", "pmap"):
    raise ValueError(f"parallel must be 'jit' or 'pmap'; got {parallel!r}")
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable loss_fn(logits, batch); got {loss_fn!r}")

  if parallel == "pmap":
    step = functools.partial(_pmap_step_fn, loss_fn=loss_fn, aux_weight=aux_weight)
    pmapped = jax.pmap(step, axis_name=PMAP_AXIS, donate_argnums=(0,) if donate else ())
    n_dev = jax.local_device_count()

    def pmap_train_step(state, batch, rng):
      validate_batch(batch, num_classes if _is_host(batch) else None)
      split = jax.tree.map(
          lambda x: np.asarray(x).reshape((n_dev, -1) + np.shape(x)[1:]), batch)
      # One key per device so dropout masks differ across shards of the batch.
      rngs = jax.random.split(rng, n_dev)
      state, metrics = pmapped(state, split, rngs)
      return state, jax.tree.map(lambda m: m[0], metrics)

    return pmap_train_step

  mesh = shd.make_mesh() if mesh is None else mesh
  step = functools.partial(train_step_fn, loss_fn=loss_fn, aux_weight=aux_weight)
  repl = shd.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(repl, shd.data_sharding(mesh), repl),
                   out_shardings=(repl, repl), donate_argnums=(0,) if donate else ())

  def train_step(state, batch, rng):
    if _is_host(batch):
      validate_batch(batch, num_classes)
    else:
      validate_batch(batch)
    return jitted(state, shd.shard_batch(batch, mesh), rng)

  train_step.jitted = jitted
  train_step.mesh = mesh
  return train_step


def replicate_state(state):
  """Add the leading device axis the pmap step expects."""
  return flax.jax_utils.replicate(state)


def unreplicate_state(state):
  """Take device 0's copy of a pmap-replicated state."""
  return flax.jax_utils.unreplicate(state)


def eval_logits(state: TrainState, images):
  """Eval-mode logits ``[N,H,W,C]`` (running BatchNorm statistics, no dropout)."""
  return state.apply_fn(state.variables(), images, train=False)


def make_eval_step(num_classes: int, *, mesh: Optional[Mesh] = None,
                   postprocess: Optional[Callable] = None, inference=None) -> Callable:
  """Build ``eval_step(state, batch) -> {"confusion": [C,C] int32, "predictions": [N,H,W]}``.

  The confusion matrix is summed over the global batch (all devices and processes); pixels
  with label 255 or ``valid == False`` do not count. ``inference`` chooses how logits are
  computed: None is one eval-mode forward pass of the whole image (:func:`eval_logits`); a
  config such as ``dict(mode="slide", window=(h, w), stride=(h, w))`` or
  ``dict(mode="multiscale", ...)`` goes through
  ``jaxseg.evaluation.inference.make_inference_fn`` (validated here, so a bad config fails
  before anything is compiled). ``postprocess(logits, batch)`` (e.g. a dense CRF) maps
  logits to refined scores before the argmax.
  """
  from jaxseg.evaluation.inference import make_inference_fn
  from jaxseg.evaluation.metrics import confusion_matrix
  mesh = shd.make_mesh() if mesh is None else mesh
  infer = None if inference is None else make_inference_fn(inference)

  def logits_of(state, images):
    if infer is None:
      return eval_logits(state, images)
    variables = state.variables()
    return infer(lambda x: state.apply_fn(variables, x, train=False), images, num_classes)

  def step(state, batch):
    logits = logits_of(state, batch["image"])
    if postprocess is not None:
      logits = postprocess(logits, batch)
    preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    cm = confusion_matrix(preds, batch["mask"], num_classes, batch.get("valid"))
    return {"confusion": cm, "predictions": preds}

  repl, data = shd.replicated(mesh), shd.data_sharding(mesh)
  jitted = jax.jit(step, in_shardings=(repl, data),
                   out_shardings={"confusion": repl, "predictions": data})

  def eval_step(state, batch):
    validate_batch(batch, num_classes if _is_host(batch) else None)
    return jitted(state, shd.shard_batch(batch, mesh))

  return eval_step
