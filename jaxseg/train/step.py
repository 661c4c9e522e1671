"""The train and eval steps: one pure function, run under jit over a mesh or under pmap.

``make_train_step(loss_fn)`` returns ``train_step(state, batch, rng) -> (state, metrics)``.
The default path jit-compiles the step with the state donated, the batch sharded over the
``data`` axis of a mesh of all devices and the state replicated. Because the jitted program
sees the global batch, BatchNorm statistics and the loss are global without any collective
in the model code.

``parallel="pmap"`` runs the same pure step under ``jax.pmap``: gradients, loss and
BatchNorm statistics are averaged across devices (BatchNorm layers are switched to
cross-device statistics by intercepting ``nn.BatchNorm``). The loss is traced inside
``jaxseg.losses._common.batch_sharded_over``, so losses normalised by a count (labelled
pixels, ...) divide by the count of the global batch (``_common.global_mean``): the pmap loss
and gradients equal the jit path's however unevenly the devices hold labelled pixels.

A loss that declares a keyword ``step`` (warm-ups, ramps) is called with
``step=state.step``; other losses are called as ``loss_fn(logits, batch)``.

A model whose class sets ``takes_targets = True`` (Mask R-CNN: anchor and RoI matching and
sampling happen inside the model) is called as ``model(images, train=True, targets=batch)``,
and its output dict goes to the loss like logits do. Models draw sampling randomness from the
``sampling`` RNG stream, which the step provides next to ``dropout``.

Mixed precision (``jaxseg.models.build(..., dtype="bfloat16")``, ``config.dtype``): params,
gradients and optimizer state stay float32 (the model casts weights where it uses them);
:func:`float32_outputs` casts every half-precision floating leaf of the model's output (logits,
sown ``aux_logits``, Mask R-CNN's output dict) to float32 once, before any loss sees it, so
every loss and metric is computed in float32. The eval and predict steps do the same.

Label batches are checked before the step runs, NumPy and device (``jax.Array``) batches
alike, against ``num_classes`` or, when it is not given, the class count of the model's
logits (learnt when the step is first traced).
"""
import functools
import inspect
import warnings
from typing import Callable, Dict, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxseg.constants import IGNORE_INDEX
from jaxseg.losses import _common
from jaxseg.train import sharding as shd
from jaxseg.train.state import TrainState, check_images

PMAP_AXIS = "batch"
_LABEL_KEYS = ("mask", "scribble", "box_seg")


def collect_aux_logits(intermediates) -> list:
  """Every array sown as ``aux_logits`` anywhere in an ``intermediates`` collection."""
  found = []
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates)).items():
    if path and path[-1] == "aux_logits":
      found.extend(value if isinstance(value, (tuple, list)) else [value])
  return found


def float32_outputs(tree):
  """``tree`` with every bfloat16/float16 leaf cast to float32; other leaves unchanged.

  Applied to model outputs so that losses never run in half precision, whatever dtype the
  model computes in (float64 and integer/bool leaves such as Mask R-CNN's labels stay).
  """
  def cast(x):
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
      return x.astype(jnp.float32)
    return x
  return jax.tree.map(cast, tree)


def loss_takes_step(loss_fn: Callable) -> bool:
  """Whether ``loss_fn`` declares a keyword ``step`` that is still free.

  ``functools.partial`` layers that already bind ``step`` make it not free (the caller chose
  the step). A ``**kwargs`` catch-all does not count as declaring ``step``: such a loss is
  called without it. Callables whose signature cannot be read are called without it.
  """
  fn = loss_fn
  while isinstance(fn, functools.partial):
    if "step" in fn.keywords:
      return False
    fn = fn.func
  try:
    sig = inspect.signature(loss_fn)
  except (TypeError, ValueError):
    return False
  param = sig.parameters.get("step")
  return param is not None and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                              inspect.Parameter.KEYWORD_ONLY)


def model_takes_targets(apply_fn: Callable) -> bool:
  """Whether the module behind ``apply_fn`` (``model.apply``) wants ``targets=batch``."""
  return bool(getattr(getattr(apply_fn, "__self__", None), "takes_targets", False))


def _label_spec(key: str) -> Dict:
  """``low``/``ignore_index`` of ``batch[key]`` for ``_common.bad_labels``/``label_error``:
  label maps in [0, C) or 255, ``box_classes`` in [-1, C) (-1 = padding)."""
  if key == "box_classes":
    return {"low": -1, "ignore_index": None}
  return {"low": 0, "ignore_index": IGNORE_INDEX}


def _raise_out_of_range(key: str, labels: np.ndarray, num_classes: int, count=None) -> None:
  """The ValueError naming ``key`` and (up to 8 of) its bad values; nothing if all are fine.

  ``count`` is the number of bad entries found over the whole global batch when ``labels``
  are only this process's rows (multi-host): the bad ones may live on another process.
  """
  spec = _label_spec(key)
  if _common.bad_labels(labels, num_classes, **spec).any():
    raise ValueError(_common.label_error(f"batch['{key}']", "train step", labels, num_classes,
                                         **spec))
  if count:
    raise ValueError(f"batch['{key}'] has {count} labels outside "
                     f"{_common.valid_label_text(num_classes, **spec)} (in another process's "
                     "rows of the global batch)")


_RANGE_KEYS = _LABEL_KEYS + ("box_classes",)


@functools.partial(jax.jit, static_argnames="num_classes")
def _count_out_of_range(labels: Dict[str, jax.Array], num_classes: int) -> Dict[str, jax.Array]:
  """Per key, the number of bad entries of a device batch (int32 scalars, replicated)."""
  return {k: jnp.sum(_common.bad_labels(v, num_classes, **_label_spec(k)), dtype=jnp.int32)
          for k, v in labels.items()}


def validate_batch(batch: Dict, num_classes: Optional[int] = None, *,
                   instance: bool = False) -> None:
  """Checks that give a clear error instead of a silently wrong (NaN) step.

  Checks image rank/channels/dtype, label shapes and dtypes and, when ``num_classes`` is
  known, that ``mask``, ``scribble`` and ``box_seg`` lie in [0, C) or are 255 and
  ``box_classes`` in [-1, C). NumPy labels are checked on the host. Device labels (``jax.Array``) are counted
  on device by a small jitted reduction whose scalar result is fetched: that waits for the
  batch and for the work queued before it on its devices (under async dispatch, the previous
  step), but not for the step it feeds; only when something is wrong are the labels copied
  to the host to name the bad values.
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
  if "box_classes" in batch:
    cls = batch["box_classes"]
    if cls.ndim != 2 or cls.shape[0] != n:
      raise ValueError(f"batch['box_classes'] must have shape [N,M] with N = {n}; "
                       f"got {tuple(cls.shape)}")
    if not jnp.issubdtype(cls.dtype, jnp.integer):
      raise TypeError(f"batch['box_classes'] must hold integer class ids; got dtype {cls.dtype}")
  if "boxes" in batch:
    boxes = batch["boxes"]
    m = batch["box_classes"].shape[1] if "box_classes" in batch else None
    if boxes.ndim != 3 or boxes.shape[0] != n or boxes.shape[2] != 4 or (
        m is not None and boxes.shape[1] != m):
      want = (n, "M" if m is None else m, 4)
      raise ValueError(f"batch['boxes'] must have shape [N,M,4] = {want} (y0, x0, y1, x1); "
                       f"got {tuple(boxes.shape)}")
  if "instance_masks" in batch:
    inst = batch["instance_masks"]
    m = batch["box_classes"].shape[1] if "box_classes" in batch else inst.shape[1]
    if inst.ndim != 4 or tuple(inst.shape) != (n, m, h, w):
      raise ValueError(f"batch['instance_masks'] must have shape [N,M,H,W] = {(n, m, h, w)}; "
                       f"got {tuple(inst.shape)}")
  if "valid" in batch and tuple(batch["valid"].shape) != (n, h, w):
    raise ValueError(f"batch['valid'] must have shape {(n, h, w)}; got {tuple(batch['valid'].shape)}")
  _check_values(batch, num_classes, instance)


def _check_values(batch: Dict, num_classes: Optional[int], instance: bool) -> None:
  """The value part of :func:`validate_batch` (shapes and dtypes already checked): label
  ranges and, for instance models, gt boxes; nothing when the class count is unknown."""
  if num_classes is None:
    return
  _check_label_ranges(batch, num_classes)
  if instance and "boxes" in batch and "box_classes" in batch:
    _check_instance_targets(batch, num_classes)


def _check_instance_targets(batch: Dict, num_classes: int) -> None:
  from jaxseg.models.maskrcnn import check_target_values
  targets = {k: shd.to_local_numpy(batch[k]) for k in ("boxes", "box_classes")}
  check_target_values(targets, tuple(batch["image"].shape[1:3]), num_classes,
                      where="train step")


def _check_label_ranges(batch: Dict, num_classes: int) -> None:
  """The range part of :func:`validate_batch` (shapes and dtypes already checked)."""
  on_device = {}
  for key in _RANGE_KEYS:
    lab = batch.get(key)
    if lab is None or not lab.size:
      continue
    if isinstance(lab, jax.Array):
      on_device[key] = lab
    else:
      _raise_out_of_range(key, np.asarray(lab), num_classes)
  if on_device:
    counts = _count_out_of_range(on_device, num_classes)
    for key, count in counts.items():
      count = int(np.asarray(count.addressable_data(0)))
      if count:
        _raise_out_of_range(key, shd.to_local_numpy(on_device[key]), num_classes, count)


def _loss_and_grads(state: TrainState, batch, rng, loss_fn, aux_weight, pass_step: bool):

  # Passed only to losses that declare it (DESIGN.md "Losses"): the batch carries data only.
  kwargs = {"step": jnp.asarray(state.step, jnp.int32)} if pass_step else {}
  model_kwargs = {"targets": batch} if model_takes_targets(state.apply_fn) else {}
  # ``sampling`` feeds models that sample training targets (Mask R-CNN's anchors and RoIs);
  # ``dropout`` keeps the key it always had, so existing runs reproduce.
  rngs = {"dropout": rng, "sampling": jax.random.fold_in(rng, 1)}

  def compute(params):
    out, mutated = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        rngs=rngs, mutable=["batch_stats", "intermediates"], **model_kwargs)
    out = float32_outputs(out)
    main = loss_fn(out, batch, **kwargs)
    aux_list = float32_outputs(collect_aux_logits(mutated.get("intermediates", {})))
    aux = sum((loss_fn(a, batch, **kwargs) for a in aux_list), jnp.zeros((), jnp.float32))
    total = main + aux_weight * aux if aux_list else main
    return total, (mutated.get("batch_stats", {}), main, aux, bool(aux_list))

  (loss, (batch_stats, main, aux, has_aux)), grads = jax.value_and_grad(
      compute, has_aux=True)(state.params)
  metrics = {"loss": loss}
  if has_aux:
    metrics.update(main_loss=main, aux_loss=aux)
  return grads, batch_stats, metrics


def _traced_with_labels_checked(fn: Callable) -> Callable:
  """``fn`` traced inside ``_common.labels_checked()``: the steps validate every batch on the
  host before dispatch (:func:`validate_batch`), so the losses add no range check of their own
  (a reduction and a host callback per step)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with _common.labels_checked():
      return fn(*args, **kwargs)
  return traced


def train_step_fn(state: TrainState, batch, rng, *, loss_fn: Callable, aux_weight: float,
                  pass_step: Optional[bool] = None):
  """The pure train step (no parallelism): forward, loss, backward, optimizer update.

  ``pass_step``: call ``loss_fn(..., step=state.step)``; None = when it declares ``step``
  (:func:`loss_takes_step`).
  """
  pass_step = loss_takes_step(loss_fn) if pass_step is None else pass_step
  grads, batch_stats, metrics = _loss_and_grads(state, batch, rng, loss_fn, aux_weight, pass_step)
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


def _pmap_step_fn(state, batch, rng, *, loss_fn, aux_weight, pass_step: bool):
  # The loss is traced inside batch_sharded_over, so count-normalised losses divide by the
  # global count and the pmean below gives the jit path's loss and gradients.
  with nn.intercept_methods(_sync_batch_norm(PMAP_AXIS)), \
       _common.batch_sharded_over(PMAP_AXIS):
    grads, batch_stats, metrics = _loss_and_grads(state, batch, rng, loss_fn, aux_weight,
                                                  pass_step)
  grads = jax.lax.pmean(grads, PMAP_AXIS)
  metrics = jax.lax.pmean(metrics, PMAP_AXIS)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def _host_or_sharded(batch, sharding):
  """Leaves already carrying ``sharding`` stay on device; every other leaf as NumPy.

  Only such leaves escape a copy to the host in :func:`shd.shard_batch`, so converting the
  others first costs nothing and lets :func:`validate_batch` check them on the host.
  """
  def get(x):
    if isinstance(x, jax.Array) and (sharding is not None and x.sharding == sharding):
      return x
    return np.asarray(x)
  return jax.tree.map(get, batch)


def make_train_step(loss_fn: Callable, *, mesh: Optional[Mesh] = None, parallel: str = "jit",
                    aux_weight: float = 0.4, num_classes: Optional[int] = None,
                    donate: bool = True, check_batches: bool = True) -> Callable:
  """Build ``train_step(state, batch, rng) -> (state, metrics)``.

  Args:
    loss_fn: ``loss_fn(logits, batch) -> scalar``; any function of this signature, e.g. a
      ``jaxseg.losses`` entry with hyperparameters bound by ``functools.partial``. If it
      declares a keyword ``step`` (not already bound by a partial; ``**kwargs`` does not
      count) it is called with ``step=state.step``, an int32 scalar array.
    mesh: the data-parallel mesh (``jit`` path); None means all devices of all processes.
    parallel: ``"jit"`` (sharded jit over ``mesh``) or ``"pmap"``. Both steps take the state
      of ``create_train_state`` (or a restored one) as it is, so switching is this argument
      alone. The jit step returns a state of the same shapes (replicated on the mesh); the
      pmap step returns one with a leading local-device axis (:func:`pmap_replicate`), which
      either step accepts back; :func:`pmap_unreplicate` gives the plain state of either. The
      pmap batch size must be divisible by the local device count.
    aux_weight: weight of ``loss_fn`` on every ``aux_logits`` sown by the model.
    num_classes: C for the label range check (``mask``/``scribble`` in [0, C) or 255,
      ``box_classes`` in [-1, C)) of every batch, NumPy or device. None: C is the last
      dimension of the model's logits, read when the step is first traced (the first batch
      is traced before it is checked; the trace is reused by the call).
    donate: donate the input state's buffers (do not reuse a state passed in).
    check_batches: run :func:`validate_batch` on every batch. ``False`` is for callers that
      checked the host batch already (the trainer does, in ``shd.prefetch_to_device``): a
      device batch's range check waits for the step before it, which would stall a pipeline
      of prefetched batches.

  Returns:
    The step. ``metrics`` holds scalars: ``loss``, ``grad_norm`` and, for models with
    auxiliary heads, ``main_loss`` and ``aux_loss``. A batch that fails the checks raises
    before the step is dispatched, so the (donated) state passed in is still intact.
  """
  if parallel not in ("jit", "pmap"):
    raise ValueError(f"parallel must be 'jit' or 'pmap'; got {parallel!r}")
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable loss_fn(logits, batch); got {loss_fn!r}")
  pass_step = loss_takes_step(loss_fn)
  traced = {}

  def loss_seen(out, batch, **kwargs):
    # Runs at trace time: records the model's class count for the label check.
    if getattr(out, "ndim", None) == 4:
      traced.setdefault("num_classes", int(out.shape[-1]))
    elif isinstance(out, dict) and getattr(out.get("class_logits"), "ndim", 0) >= 2:
      traced.setdefault("num_classes", int(out["class_logits"].shape[-1]))  # detection heads
    return loss_fn(out, batch, **kwargs)

  def classes(trace):
    """``num_classes`` or the traced one, tracing first (``trace()``) if not yet known."""
    if num_classes is not None:
      return num_classes
    if "num_classes" not in traced:
      trace()
      traced.setdefault("num_classes", None)  # a model without [N,H,W,C] logits: no check
    return traced["num_classes"]

  def needs_range_check(batch):
    return isinstance(batch, dict) and any(k in batch for k in _RANGE_KEYS)

  if parallel == "pmap":
    step = _traced_with_labels_checked(functools.partial(
        _pmap_step_fn, loss_fn=loss_seen, aux_weight=aux_weight, pass_step=pass_step))
    pmapped = jax.pmap(step, axis_name=PMAP_AXIS, donate_argnums=(0,) if donate else ())
    n_dev = jax.local_device_count()

    def pmap_train_step(state, batch, rng):
      state = pmap_replicate(state)  # a no-op for the state this step returned
      # pmap feeds host arrays: device batches come to the host here and are checked there.
      batch = _host_or_sharded(batch, None)
      validate_batch(batch)
      split = jax.tree.map(lambda x: x.reshape((n_dev, -1) + x.shape[1:]), batch)
      # One key per device so dropout masks differ across shards of the batch.
      rngs = jax.random.split(rng, n_dev)
      if needs_range_check(batch):
        _check_values(batch, classes(lambda: pmapped.lower(state, split, rngs)),
                      model_takes_targets(state.apply_fn))
      state, metrics = pmapped(state, split, rngs)
      return state, jax.tree.map(lambda m: m[0], metrics)

    return pmap_train_step

  mesh = shd.make_mesh() if mesh is None else mesh
  step = _traced_with_labels_checked(functools.partial(
      train_step_fn, loss_fn=loss_seen, aux_weight=aux_weight, pass_step=pass_step))
  repl = shd.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(repl, shd.data_sharding(mesh), repl),
                   out_shardings=(repl, repl), donate_argnums=(0,) if donate else ())

  def train_step(state, batch, rng):
    # A host state (``create_train_state``'s, whose step is a Python int) is placed on the
    # mesh here, so the first and later calls share one executable; a replicated state
    # passes through untouched, and a pmap step's state loses its device axis.
    state = shd.replicate_on_mesh(pmap_unreplicate(state), mesh)
    batch = _host_or_sharded(batch, shd.data_sharding(mesh))
    if check_batches:
      validate_batch(batch)  # shapes and dtypes first: a clear error instead of a trace error
    sharded = shd.shard_batch(batch, mesh)
    if check_batches and needs_range_check(batch):
      _check_values(batch, classes(lambda: jitted.trace(state, sharded, rng)),
                    model_takes_targets(state.apply_fn))
    return jitted(state, sharded, rng)

  train_step.jitted = jitted
  train_step.mesh = mesh
  return train_step


def _has_device_axis(state) -> bool:
  """Whether ``state`` carries pmap's leading device axis (its ``step`` is then [D])."""
  return np.ndim(getattr(state, "step", 0)) == 1


def pmap_replicate(state):
  """Add the leading local-device axis the pmap step works on (a no-op if it is there).

  Unlike :func:`jaxseg.train.replicate_on_mesh` (same shapes, for jit) every leaf gets a
  leading axis of ``jax.local_device_count()``. The copies carry the sharding of the pmap
  step's outputs, so the second step reuses the first one's executable (the arrays of
  ``flax.jax_utils.replicate`` name their axis differently and cost a second compile).
  """
  if _has_device_axis(state):
    return state
  devices = jax.local_devices()
  sharding = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), PartitionSpec(PMAP_AXIS))

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return flax.jax_utils.replicate(x)  # no NumPy form; rare in a train state
    x = np.asarray(x)
    return jax.make_array_from_callback((len(devices),) + x.shape, sharding, lambda _: x[None])

  return jax.tree.map(put, state)


def pmap_unreplicate(state):
  """Device 0's copy of a state with pmap's device axis; any other state as it is."""
  if not _has_device_axis(state):
    return state
  return flax.jax_utils.unreplicate(state)


def replicate_state(state):
  """Deprecated name of :func:`pmap_replicate`."""
  warnings.warn("jaxseg.train.replicate_state is now pmap_replicate (and the pmap step "
                "replicates a plain state itself)", DeprecationWarning, stacklevel=2)
  return pmap_replicate(state)


def unreplicate_state(state):
  """Deprecated name of :func:`pmap_unreplicate`."""
  warnings.warn("jaxseg.train.unreplicate_state is now pmap_unreplicate", DeprecationWarning,
                stacklevel=2)
  return pmap_unreplicate(state)


def eval_logits(state: TrainState, images):
  """Eval-mode logits ``[N,H,W,C]`` float32 (running BatchNorm statistics, no dropout)."""
  return float32_outputs(state.apply_fn(state.variables(), images, train=False))


def make_predict_step(*, mesh: Optional[Mesh] = None) -> Callable:
  """Build ``predict_step(state, images [N,H,W,3]) -> model outputs`` in eval mode.

  For models whose eval output is not a logits map (Mask R-CNN's detections dict): jitted
  over the mesh with the images sharded on ``data`` and every output sharded the same way
  (each leaf has the batch as its leading axis).
  """
  mesh = shd.make_mesh() if mesh is None else mesh
  repl, data = shd.replicated(mesh), shd.data_sharding(mesh)

  def predict(state, images):
    return float32_outputs(state.apply_fn(state.variables(), images, train=False))

  jitted = jax.jit(predict, in_shardings=(repl, data), out_shardings=data)

  def predict_step(state, images):
    check_images(images)
    return jitted(state, shd.shard_batch({"image": images}, mesh)["image"])

  predict_step.jitted = jitted
  return predict_step


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
    return infer(lambda x: float32_outputs(state.apply_fn(variables, x, train=False)), images,
                 num_classes)

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
    validate_batch(batch, num_classes)
    return jitted(state, shd.shard_batch(batch, mesh))

  return eval_step
