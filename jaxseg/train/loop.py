"""The training and evaluation loops behind ``train.py`` and ``eval.py``.

``train_and_evaluate(config, workdir)`` builds data, model, optimizer and the sharded step
from a config, resumes from the latest checkpoint in ``workdir`` if there is one, trains
with a progress bar, logs JSON lines + TensorBoard, checkpoints, evaluates and writes PNG
overlays. ``evaluate_workdir(workdir, split)`` restores a run and scores any split.

``config.dtype`` ("float32" by default, "bfloat16" for mixed precision) is the model's
computation dtype (:func:`build_model`); parameters, optimizer state, BatchNorm statistics,
checkpoints and losses stay float32 either way, so a run can be resumed or evaluated in the
other dtype. ``config.model_kwargs.remat`` (ResNet/MobileNetV2/VGG backbones, UNet, Mask
R-CNN) recomputes each block in the backward pass to save activation memory.
"""
import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxseg import data as data_lib
from jaxseg import fileio
from jaxseg import losses as losses_lib
from jaxseg import models as models_lib
from jaxseg.evaluation import metrics as metrics_lib
from jaxseg.evaluation import visualize
from jaxseg.train import checkpoint as ckpt_lib
from jaxseg.train import optim, sharding, state as state_lib, step as step_lib

CONFIG_FILE = "config.json"


class MetricWriter:
  """JSON lines + TensorBoard events, written by process 0 only."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard events are optional; JSON lines always exist.
        self._tb = None

  def write(self, step: int, scalars: Dict[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        if np.isfinite(v):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Write ``workdir/config.json`` atomically (a crash never leaves half a file)."""
  os.makedirs(workdir, exist_ok=True)
  with fileio.atomic_write(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


# What makes two configs train the same arrays: remat and dtype change neither the parameters
# nor the checkpoint, so a run may be resumed with them changed.
_LAYOUT_FREE_KWARGS = ("remat", "dtype")


def model_identity(config) -> Dict[str, Any]:
  """The part of a config that fixes the checkpoint's arrays: model, its kwargs, dataset."""
  kwargs = dict(config.get("model_kwargs", None) or {})
  kwargs = {k: v for k, v in sorted(kwargs.items()) if k not in _LAYOUT_FREE_KWARGS}
  return {"model": config.get("model", None), "model_kwargs": json.loads(json.dumps(
      kwargs, default=str)), "dataset": config.get("dataset", None),
          "builder_kwargs": json.loads(json.dumps(dict(config.get("builder_kwargs", None) or {}),
                                                  default=str))}


_POSITIVE_KEYS = ("batch_size", "eval_batch_size", "num_steps", "log_every", "eval_every",
                  "checkpoint_every", "keep_checkpoints")


def check_config_numbers(config) -> None:
  """A ValueError naming the entry unless every count/interval of the config is an int >= 1."""
  for key in _POSITIVE_KEYS:
    value = config.get(key, None)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{key} must be an integer >= 1, got {value!r} "
                       f"(set --config.{key}=N)")


def has_checkpoints(workdir: str) -> bool:
  """Whether ``workdir/checkpoints`` holds at least one step folder (intact or not)."""
  ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
  return os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))


def check_workdir(config, workdir: str) -> None:
  """Refuse a workdir whose checkpoints were written by another model or dataset.

  Raises:
    ValueError: naming both configurations; nothing in the workdir is changed.
  """
  ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
  if not has_checkpoints(workdir) or not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    return
  try:
    saved = load_config(workdir)
  except (ValueError, OSError):  # unreadable config.json: the restore's array check decides
    return
  ours, theirs = model_identity(config), model_identity(saved)
  if ours != theirs:
    diff = ", ".join(f"{k}: {theirs[k]!r} there vs {ours[k]!r} here"
                     for k in ours if ours[k] != theirs[k])
    raise ValueError(
        f"workdir {workdir} holds checkpoints of another configuration ({diff}); saved "
        f"configuration {theirs}, this one {ours}. Use a new --workdir (or remove "
        f"{ckpt_dir} to start over); nothing was changed")


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist (train first: python train.py "
                            f"--workdir {workdir})")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a jaxseg training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def apply_override(config: ml_collections.ConfigDict, key: str, value: str) -> None:
  """Set ``config.<dotted key>`` from a command-line string (Python literal or plain string)."""
  import ast
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    if p not in node:
      from jaxseg import names
      raise KeyError(f"config has no entry {key!r}{names.did_you_mean(p, list(node.keys()))}")
    node = node[p]
  with config.unlocked():
    node[leaf] = parsed


def build_loss(config, train_source=None) -> Callable:
  """The configured loss with its keyword hyperparameters bound.

  ``loss_kwargs.class_weights = "median_frequency"`` is computed from the train masks.
  """
  kwargs = dict(config.get("loss_kwargs", None) or {})
  if kwargs.get("class_weights") == "median_frequency":
    if train_source is None:
      raise ValueError("class_weights='median_frequency' needs the training data")
    kwargs["class_weights"] = tuple(float(w) for w in losses_lib.supervised.median_frequency_weights(
        (train_source[i]["mask"] for i in range(len(train_source))), train_source.num_classes))
    if jax.process_index() == 0:
      print("median-frequency class weights: "
            + ", ".join(f"{n} {w:.3f}" for n, w in zip(train_source.class_names,
                                                       kwargs["class_weights"])), flush=True)
  return losses_lib.get(config.loss, **kwargs)


def build_model(config, num_classes: int):
  """``jaxseg.models.build(config.model, **config.model_kwargs)`` in ``config.dtype``.

  ``config.dtype`` ("float32" when absent, or "bfloat16": mixed precision, see
  ``jaxseg.models.registry``) is passed as the builder's ``dtype`` unless it is float32, so
  models registered without a ``dtype`` option keep working in float32. A ``dtype`` in
  ``model_kwargs`` must agree with it.

  Raises:
    ValueError: an invalid ``config.dtype`` or one that contradicts ``model_kwargs.dtype``.
  """
  kwargs = dict(config.get("model_kwargs", None) or {})
  name = config.get("dtype", None) or "float32"
  try:
    dtype = models_lib.registry.resolve_dtype(name)
  except ValueError as e:
    raise ValueError(f"config.dtype: {e}") from None
  if "dtype" in kwargs and models_lib.registry.resolve_dtype(kwargs["dtype"]) != dtype:
    raise ValueError(f"config.model_kwargs.dtype={kwargs['dtype']!r} contradicts "
                     f"config.dtype={name!r}; set only config.dtype")
  if dtype != jnp.float32:
    kwargs["dtype"] = dtype
  return models_lib.build(config.model, num_classes=num_classes, **kwargs)


def load_split(config, split: str):
  return data_lib.load(config.dataset, split, data_dir=config.get("data_dir", None),
                       **dict(config.get("builder_kwargs", None) or {}))


def _image_size(config, source) -> Tuple[int, int]:
  if config.get("crop_size", None):
    return tuple(config.crop_size)
  return tuple(source[0]["image"].shape[:2])


def initial_state(config, model, num_steps: int, image_hw, rng) -> state_lib.TrainState:
  tx = optim.make_optimizer(config.optimizer, num_steps)
  dummy = jnp.zeros((1, *image_hw, 3), jnp.float32)
  return state_lib.create_train_state(rng, model, tx, dummy)


def load_pretrained(state: state_lib.TrainState, model, pretrained: str) -> state_lib.TrainState:
  """The state with ``model.backbone`` loaded from ``pretrained`` (a known name or a .pth
  path, see ``jaxseg.convert.pretrained``) and a fresh optimizer state."""
  from jaxseg.convert import pretrained as pretrained_lib
  variables = pretrained_lib.load_backbone(model, state.variables(), pretrained)
  params = variables["params"]
  return state.replace(params=params, batch_stats=variables.get("batch_stats", {}),
                       opt_state=state.tx.init(params))


def make_postprocess(config) -> Optional[Callable]:
  """Optional dense-CRF post-processing of eval logits (``config.crf``, DeepLab style)."""
  crf = config.get("crf", None)
  if not crf or not crf.get("enabled", False):
    return None
  from jaxseg.losses import dense_crf
  kwargs = {k: v for k, v in dict(crf).items() if k != "enabled"}

  def postprocess(logits, batch):
    probs = dense_crf(logits, batch["image"], valid=batch.get("valid"), **kwargs)
    return jnp.log(jnp.maximum(probs, 1e-8))

  return postprocess


def evaluate(eval_step, state, batches: Iterator[Dict], num_classes: int, *,
             keep_examples: int = 0) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
  """Sum the confusion matrix over ``batches``; keep the first ``keep_examples`` for plots."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  kept = {"image": [], "mask": [], "prediction": []}
  n_kept = 0
  for batch in batches:
    batch = {k: v for k, v in batch.items() if k in ("image", "mask", "valid")}
    out = eval_step(state, batch)
    cm += np.asarray(jax.device_get(out["confusion"]), np.int64)
    if n_kept < keep_examples:
      preds = sharding.to_local_numpy(out["predictions"])
      real = batch["valid"].reshape(len(preds), -1).any(1) if "valid" in batch else slice(None)
      take = slice(0, keep_examples - n_kept)
      kept["image"].append(np.asarray(batch["image"])[real][take])
      kept["mask"].append(np.asarray(batch["mask"])[real][take])
      kept["prediction"].append(preds[real][take])
      n_kept += len(kept["image"][-1])
  kept = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in kept.items()}
  return cm, kept


def is_instance_model(model) -> bool:
  """Instance models (Mask R-CNN) train on targets and are scored by COCO AP, not IoU."""
  return bool(getattr(model, "takes_targets", False))


INSTANCE_EVAL_KINDS = ("mask", "boxes", "instance_masks")


def eval_image_size(config, instance: bool = False) -> Optional[Tuple[int, int]]:
  """The canvas eval images are fitted into (shrunk to fit, padded; ``valid`` marks padding).

  ``config.eval_image_size`` when set. Otherwise instance models, which need one canvas (a
  multiple of 32), use ``crop_size``; semantic models see every image as it is.
  """
  size = config.get("eval_image_size", None)
  if size is None and instance:
    size = config.get("crop_size", None)
  return None if size is None else tuple(size)


def _eval_batches(config, source, instance: bool = False):
  return data_lib.eval_batches(
      source, batch_size=config.eval_batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count(),
      label_kinds=INSTANCE_EVAL_KINDS if instance else ("mask",),
      image_size=eval_image_size(config, instance))


def evaluate_instances(predict_step, state, batches: Iterator[Dict], class_names, *,
                       keep_examples: int = 0) -> Tuple[Dict[str, float], Dict[str, list]]:
  """COCO box and mask AP of an instance model over ``batches`` (every process's share).

  Returns ``(summary, kept)``: the evaluator's figures (``box_AP``, ``mask_AP``, ``box_AP50``...)
  and the first ``keep_examples`` images with their ground truth and detections for overlays.
  Padding examples that complete the last batch (``valid`` all false) are skipped.
  """
  from jaxseg.evaluation import coco as coco_lib
  evaluator = coco_lib.InstanceEvaluator(class_names)
  kept = {"image": [], "gt": [], "pred": []}
  for batch in batches:
    out = jax.tree.map(sharding.to_local_numpy, predict_step(state, batch["image"]))
    real = (np.asarray(batch["valid"]).reshape(len(batch["image"]), -1).any(1)
            if "valid" in batch else np.ones(len(batch["image"]), bool))
    out = {k: v[real] for k, v in out.items()}
    batch = {k: np.asarray(v)[real] for k, v in batch.items()}
    evaluator.add(out, batch)
    for i in range(min(len(batch["image"]), keep_examples - len(kept["image"]))):
      kept["image"].append(batch["image"][i])
      kept["gt"].append({k: batch[k][i] for k in ("boxes", "box_classes", "instance_masks")})
      kept["pred"].append({k: v[i] for k, v in out.items()})
  summary = {k: float(v) for k, v in evaluator.result()}
  return summary, kept


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")


def _check_finite(metrics, step: int, ckpt) -> None:
  """Stop training with a clear error once the loss is NaN or infinite."""
  loss = float(np.asarray(jax.device_get(metrics["loss"])).mean())
  if not np.isfinite(loss):
    last = ckpt.latest_step()
    raise FloatingPointError(
        f"training loss is {loss} at step {step}: the run diverged (learning rate, loss "
        f"hyperparameters or input data); "
        + (f"the last checkpoint (step {last}) in {ckpt.directory} is kept" if last is not None
           else "no checkpoint was written"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: Optional[int] = None) -> Dict[str, float]:
  """Train ``config`` in ``workdir`` (resuming if checkpoints exist) and evaluate.

  Args:
    config: the recipe (see ``jaxseg/configs``).
    workdir: checkpoints, metrics, TensorBoard events and overlays go here.
    stop_at_step: leave after this many steps with a checkpoint, as a preempted job would;
      a later call resumes and ends exactly like an uninterrupted run.

  Returns the final validation summary (mIoU, pixel accuracy, per-class IoU); an empty dict
  when stopped early.
  """
  is_main = jax.process_index() == 0
  # Everything that can fail on the user's input runs before the first write to the workdir.
  check_config_numbers(config)
  if config.batch_size % jax.device_count():
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                     f"{jax.device_count()} devices (set --config.batch_size to a multiple)")
  rng = jax.random.key(config.seed)
  train_src = load_split(config, config.train_split)
  eval_src = load_split(config, config.eval_split)
  num_classes = train_src.num_classes
  class_names = list(train_src.class_names)
  model = build_model(config, num_classes)
  num_steps = int(config.num_steps)
  image_hw = _image_size(config, train_src)

  init_rng, rng = jax.random.split(rng)
  state = initial_state(config, model, num_steps, image_hw, init_rng)
  mesh = sharding.make_mesh()
  loss_fn = build_loss(config, train_src)
  pmap = config.get("parallel", "jit") == "pmap"
  train_step = step_lib.make_train_step(
      loss_fn, mesh=mesh, parallel=config.get("parallel", "jit"),
      aux_weight=config.get("aux_weight", 0.4), num_classes=num_classes,
      check_batches=pmap)  # the jit path checks host batches in prefetch_to_device below
  check_workdir(config, workdir)
  ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
  resuming = has_checkpoints(workdir)
  if not resuming and config.get("pretrained", None):
    state = load_pretrained(state, model, config.pretrained)
    if is_main:
      print(f"backbone initialised from {config.pretrained}", flush=True)
  start_step = 0
  ckpt = None
  if resuming:
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints)
    try:
      state, rng, meta = ckpt.restore(state)
    except ckpt_lib.CheckpointError:
      ckpt.manager.close()
      raise
    start_step = int(meta["data_step"])
    if is_main:
      print(f"Resumed from {ckpt.directory}/{meta['step']} (step {start_step}).", flush=True)
  if is_main:
    save_config(config, workdir)
  if ckpt is None:
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints)
  run_info = {"model": config.model, "num_classes": num_classes, "class_names": class_names}

  state = step_lib.pmap_replicate(state) if pmap else sharding.replicate_on_mesh(state, mesh)
  instance = is_instance_model(model)
  if instance:
    eval_step = step_lib.make_predict_step(mesh=mesh)
  else:
    eval_step = step_lib.make_eval_step(num_classes, mesh=mesh,
                                        postprocess=make_postprocess(config),
                                        inference=config.get("inference", None))

  def run_eval(keep_examples=0):
    """(summary, confusion matrix or None, kept examples) on the eval split."""
    batches = _eval_batches(config, eval_src, instance)
    if instance:
      summary, kept = evaluate_instances(eval_step, host_state(), batches, class_names,
                                         keep_examples=keep_examples)
      return summary, None, kept
    cm, kept = evaluate(eval_step, host_state(), batches, num_classes,
                        keep_examples=keep_examples)
    return metrics_lib.summarize(cm, class_names), cm, kept

  def host_state():
    return step_lib.pmap_unreplicate(state)

  batches = data_lib.train_batches(
      train_src, batch_size=config.batch_size // jax.process_count(),
      crop_size=config.get("crop_size", None), seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      label_kinds=config.get("label_kinds", None), **dict(config.get("augment", None) or {}))
  if not pmap:  # batches travel to the devices while the previous step runs
    batches = sharding.prefetch_to_device(
        batches, mesh, check=lambda b: step_lib.validate_batch(b, num_classes, instance=instance))

  writer = MetricWriter(workdir, enabled=is_main)
  pbar = _progress(num_steps, start_step, is_main)
  last_t, last_step = time.perf_counter(), start_step
  step = start_step
  try:
    for step in range(start_step, num_steps):
      batch = next(batches)
      # Losses with a warm-up (scribble_loss, box_loss) get step=state.step from the step.
      state, metrics = train_step(state, batch, jax.random.fold_in(rng, step))
      done = step + 1
      if done % config.log_every == 0 or done == num_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(metrics, done, ckpt)
        now = time.perf_counter()
        metrics["images_per_sec"] = (done - last_step) * config.batch_size / (now - last_t)
        last_t, last_step = now, done
        writer.write(done, metrics, prefix="train/")
        if pbar is not None:
          pbar.set_postfix(loss=f"{metrics['loss']:.4f}",
                           img_s=f"{metrics['images_per_sec']:.1f}", refresh=False)
      if pbar is not None:
        pbar.update(1)
      if done % config.checkpoint_every == 0 or done in (num_steps, stop_at_step):
        _check_finite(metrics, done, ckpt)  # never replace a good checkpoint with NaNs
        ckpt.save(host_state(), rng=rng, data_step=done, extra=run_info)
      if done == stop_at_step:
        break
      if done % config.eval_every == 0 and done < num_steps:
        summary, _, _ = run_eval()
        writer.write(done, summary, prefix="val/")
        if pbar is not None:
          pbar.write(f"step {done}: val {_headline(summary)}")
  except (FloatingPointError, ckpt_lib.CheckpointError):
    try:
      ckpt.close()  # finish pending saves of the finite states
    except ckpt_lib.CheckpointError:
      pass  # the error being raised already names the failed save
    raise
  except KeyboardInterrupt:
    # Keep the work done so far: the next run resumes exactly from here. The data position
    # is the number of completed steps (the interrupted step may not have finished).
    try:
      done = int(jax.device_get(host_state().step))
      if done > start_step and done != ckpt.latest_step():
        ckpt.save(host_state(), rng=rng, data_step=done, extra=run_info, force=True)
    except RuntimeError as e:  # buffers donated to the interrupted step are gone
      print(f"Could not save on interrupt ({e}); resume uses the last checkpoint.", flush=True)
    ckpt.close()
    raise
  finally:
    if pbar is not None:
      pbar.close()
    writer.close()
  ckpt.close()
  if stop_at_step is not None and step + 1 == stop_at_step < num_steps:
    return {}

  summary, cm, kept = run_eval(keep_examples=config.get("num_overlays", 8))
  if is_main:
    writer = MetricWriter(workdir)
    writer.write(num_steps, summary, prefix="val/")
    writer.close()
    if instance:
      _write_instance_outputs(workdir, config.eval_split, summary, class_names, kept)
    else:
      _write_eval_outputs(workdir, config.eval_split, cm, class_names, kept, num_classes)
  return summary


def _headline(summary: Dict[str, float]) -> str:
  """The progress-bar line of an evaluation summary (semantic or instance)."""
  if "miou" in summary:
    return (f"mIoU {100 * summary['miou']:.2f}  pixel acc. "
            f"{100 * summary['pixel_accuracy']:.2f}")
  return "  ".join(f"{k} {100 * summary[k]:.2f}" for k in INSTANCE_HEADLINE if k in summary)


INSTANCE_HEADLINE = ("box_AP", "box_AP50", "mask_AP", "mask_AP50", "mask_AP75")


def _write_instance_outputs(workdir, split, summary, class_names, kept, prefix="") -> None:
  os.makedirs(workdir, exist_ok=True)
  # COCOeval reports -1 where a figure is undefined (no object in that size range).
  rows = [f"{k:>10s} " + (f"{100 * v:6.2f}" if v >= 0 else "   n/a")
          for k, v in summary.items() if k.startswith(("box_", "mask_"))]
  print(f"\n{prefix}{split} split (COCO AP, %):\n" + "\n".join(rows), flush=True)
  with open(os.path.join(workdir, f"{prefix}{split}_metrics.json"), "w") as f:
    json.dump({**summary, "class_names": list(class_names)}, f, indent=2)
  if kept["image"]:
    path = os.path.join(workdir, f"{prefix}{split}_overlays.png")
    visualize.save_instance_grid(path, np.stack(kept["image"]), kept["gt"], kept["pred"],
                                 class_names)
    print(f"Overlays (image | ground truth | detections): {path}", flush=True)


def _write_eval_outputs(workdir, split, cm, class_names, kept, num_classes, prefix="") -> None:
  os.makedirs(workdir, exist_ok=True)
  summary = metrics_lib.summarize(cm, class_names)
  table = metrics_lib.format_iou_table(cm, class_names)
  print(f"\n{prefix}{split} split:\n{table}", flush=True)
  with open(os.path.join(workdir, f"{prefix}{split}_metrics.json"), "w") as f:
    json.dump({**summary, "confusion_matrix": np.asarray(cm).tolist(),
               "class_names": list(class_names)}, f, indent=2)
  if len(kept["image"]):
    path = os.path.join(workdir, f"{prefix}{split}_overlays.png")
    visualize.save_overlay_grid(path, kept["image"], kept["mask"], kept["prediction"], num_classes)
    print(f"Overlays (image | ground truth | prediction): {path}", flush=True)


@dataclasses.dataclass
class RestoredRun:
  """A trained run loaded from its workdir (:func:`restore_run`).

  Attributes:
    config: the run's config (with any overrides applied by the caller).
    model: the flax module, built as the run built it.
    state: the host :class:`TrainState` of the restored step.
    step: the checkpoint step restored (the newest intact one unless asked for another).
    num_classes, class_names: the dataset's classes.
    meta: the checkpoint's metadata dict.
    source: the dataset split asked for with ``split=`` (None otherwise).
  """
  config: ml_collections.ConfigDict
  model: Any
  state: state_lib.TrainState
  step: int
  num_classes: int
  class_names: List[str]
  meta: Dict[str, Any]
  source: Any = None

  @property
  def variables(self) -> Dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` for ``model.apply``."""
    return self.state.variables()


def _run_classes(config, ckpt: ckpt_lib.Checkpointer, step: Optional[int], split=None):
  """(num_classes, class_names, source or None): from the checkpoint's metadata when it has
  them (runs since the metadata held them), else from the dataset."""
  for s in ([step] if step is not None else sorted(ckpt.all_steps(), reverse=True)):
    try:
      meta = ckpt.read_meta(s)
    except ckpt_lib.CheckpointError:  # a corrupt step: the restore below names it
      continue
    if "num_classes" in meta and split is None:
      return int(meta["num_classes"]), list(meta["class_names"]), None
    break
  src = load_split(config, split or config.eval_split)
  return src.num_classes, list(src.class_names), src


def restore_run(workdir: str, *, config: Optional[ml_collections.ConfigDict] = None,
                step: Optional[int] = None, split: Optional[str] = None) -> RestoredRun:
  """Load a training run's model and the newest intact (or the given) checkpoint.

  Read-only: a corrupt newest checkpoint is skipped with a ``CheckpointWarning`` naming it,
  but not moved.
  ``split``: also load that split of the dataset (``RestoredRun.source``); without it, runs
  whose checkpoints record their classes need no dataset files.

  Raises:
    FileNotFoundError: ``workdir`` or its config.json is missing.
    CheckpointError: no (intact) checkpoint, or one of another model.
  """
  config = load_config(workdir) if config is None else config
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise ckpt_lib.CheckpointError(f"no checkpoint in {ckpt.directory}: nothing to restore "
                                     f"(train first: python train.py --workdir {workdir})")
    num_classes, class_names, src = _run_classes(config, ckpt, step, split)
    model = build_model(config, num_classes)
    size = config.get("crop_size", None) or eval_image_size(config) or (
        _image_size(config, src) if src is not None else (64, 64))
    state = initial_state(config, model, int(config.num_steps), tuple(size), jax.random.key(0))
    state, _, meta = ckpt.restore(state, step=step)
  finally:
    ckpt.close()
  return RestoredRun(config=config, model=model, state=state, step=int(meta["step"]),
                     num_classes=num_classes, class_names=class_names, meta=meta, source=src)


def evaluate_workdir(workdir: str, split: Optional[str] = None, *,
                     config: Optional[ml_collections.ConfigDict] = None,
                     step: Optional[int] = None) -> Dict[str, float]:
  """Restore the newest intact (or given) checkpoint of ``workdir`` and score ``split``.

  Prints which checkpoint step was evaluated and the per-class IoU table, and writes
  ``eval_<split>_metrics.json`` and ``eval_<split>_overlays.png`` into the workdir. Nothing
  else on disk is touched (a corrupt newest checkpoint is skipped with a warning, not moved).
  """
  config = load_config(workdir) if config is None else config
  split = split or config.eval_split
  run = restore_run(workdir, config=config, step=step, split=split)
  src = run.source
  num_classes, model = run.num_classes, run.model
  mesh = sharding.make_mesh()
  state = sharding.replicate_on_mesh(run.state, mesh)
  where = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(run.step))
  if is_instance_model(model):
    summary, kept = evaluate_instances(
        step_lib.make_predict_step(mesh=mesh), state, _eval_batches(config, src, True),
        list(src.class_names), keep_examples=config.get("num_overlays", 8))
    if jax.process_index() == 0:
      print(f"Evaluated checkpoint step {run.step} ({where})")
      _write_instance_outputs(workdir, split, summary, list(src.class_names), kept,
                              prefix="eval_")
    return summary
  eval_step = step_lib.make_eval_step(num_classes, mesh=mesh, postprocess=make_postprocess(config),
                                      inference=config.get("inference", None))
  cm, kept = evaluate(eval_step, state, _eval_batches(config, src), num_classes,
                      keep_examples=config.get("num_overlays", 8))
  if jax.process_index() == 0:
    print(f"Evaluated checkpoint step {run.step} ({where})")
    _write_eval_outputs(workdir, split, cm, list(src.class_names), kept, num_classes,
                        prefix="eval_")
  return metrics_lib.summarize(cm, list(src.class_names))
