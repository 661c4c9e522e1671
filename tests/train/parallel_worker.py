"""Subprocess worker for the sharding and multi-host tests (needs its own device count).

Usage: python parallel_worker.py MODE OUT.npz [process_id num_processes port]
  MODE = single | jit | pmap : one process, every strategy on the same 3 global batches.
  MODE = multihost          : one of two jax.distributed processes (2 CPU devices each).
  MODE = weak               : 2 CPU devices; weak losses, jit and pmap, on scribble/box
                              batches whose shards hold very different numbers of labels.
  MODE = maskrcnn           : 2 CPU devices; a tiny Mask R-CNN on the embedded shapes: one
                              device, a 2-device jit mesh and pmap, with a deterministic
                              sampler (pmap draws per-device keys, so random sampling differs).
Writes the flattened parameters (and batch statistics) after 3 steps to OUT.npz.
"""
import sys

import numpy as np

GLOBAL_BATCH, SIZE, CLASSES, STEPS = 8, 16, 3, 3


def global_batches():
  rng = np.random.default_rng(123)
  for _ in range(STEPS):
    image = rng.random((GLOBAL_BATCH, SIZE, SIZE, 3), dtype=np.float32)
    mask = (image[..., 0] * CLASSES).astype(np.int32).clip(0, CLASSES - 1)
    yield {"image": image, "mask": mask}


def weak_batches():
  """Scribble + box batches of 4: on 2 devices shard 0 holds ~60% labelled pixels per image,
  shard 1 three pixels per image and one small box."""
  rng = np.random.default_rng(7)
  for _ in range(STEPS):
    image = rng.random((4, SIZE, SIZE, 3), dtype=np.float32)
    mask = (image[..., 0] * CLASSES).astype(np.int32).clip(0, CLASSES - 1)
    scribble = np.where(rng.random(mask.shape) < 0.6, mask, 255).astype(np.int32)
    scribble[2:] = 255
    scribble[2:, 5, 4:7] = mask[2:, 5, 4:7]
    boxes = np.array([[[0, 0, 11, 13], [4, 6, 15, 15]], [[2, 1, 14, 9], [0, 8, 9, 15]],
                      [[3, 3, 6, 5], [0, 0, 0, 0]], [[9, 9, 12, 11], [0, 0, 0, 0]]], np.float32)
    box_classes = np.array([[1, 2], [2, 1], [1, -1], [2, -1]], np.int32)
    yield {"image": image, "scribble": scribble, "boxes": boxes, "box_classes": box_classes}


def _flat(state):
  import flax
  tree = {"params": state.params, "batch_stats": state.batch_stats}
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  return {k: np.asarray(v.addressable_data(0)) for k, v in flat.items()}


def run_weak(out):
  """For each loss: jit over a 2-device mesh and pmap; for pCE also pmap without the global
  count (one loss suffices to show the step's wiring matters; each compile costs seconds)."""
  import contextlib
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  import optax
  import jaxseg
  from jaxseg.losses import _common

  model = jaxseg.models.build("unet", num_classes=CLASSES, features=4, depth=2)
  init = jaxseg.train.create_train_state(jax.random.key(0), model, optax.sgd(0.1, momentum=0.9),
                                         np.zeros((1, SIZE, SIZE, 3), np.float32))
  losses = {
      "pce": jaxseg.losses.partial_cross_entropy,
      "scribble": jaxseg.losses.get("scribble_loss", kernel="local", radius=2,
                                    pairwise_weight=0.1),
      "boxinst": jaxseg.losses.get("box_loss", mode="boxinst"),
  }
  arrays = {}
  real = _common.batch_sharded_over
  for name, loss_fn in losses.items():
    for mode in ("jit", "pmap") + (("pmap_local_count",) if name == "pce" else ()):
      # pmap_local_count: what the pmap step did before, each shard normalised by its own count.
      _common.batch_sharded_over = (lambda axis: contextlib.nullcontext()) \
          if mode == "pmap_local_count" else real
      try:
        if mode == "jit":
          step = jaxseg.train.make_train_step(loss_fn, mesh=jaxseg.train.make_mesh())
          state = jaxseg.train.replicate_on_mesh(init, step.mesh)
        else:
          step = jaxseg.train.make_train_step(loss_fn, parallel="pmap")
          state = jaxseg.train.pmap_replicate(init)
        values = []
        for i, batch in enumerate(weak_batches()):
          state, metrics = step(state, batch, jax.random.key(i))
          values.append(float(jax.device_get(metrics["loss"])))
      finally:
        _common.batch_sharded_over = real
      if mode != "jit":
        state = jaxseg.train.pmap_unreplicate(state)
      arrays.update({f"{name}|{mode}|{k}": v for k, v in _flat(state).items()})
      arrays[f"{name}|{mode}|__losses__"] = np.asarray(values)
  np.savez(out, **arrays)


def first_k_sampler(labels, key, num_samples, positive_fraction):
  """The first positives and negatives in index order, torchvision's counts (no randomness)."""
  import jax.numpy as jnp
  del key
  pos, neg = labels >= 1, labels == 0
  num_pos = jnp.minimum(pos.sum(), int(num_samples * positive_fraction))
  num_neg = jnp.minimum(neg.sum(), num_samples - num_pos)
  return pos & (jnp.cumsum(pos) <= num_pos), neg & (jnp.cumsum(neg) <= num_neg)


def run_maskrcnn(out):
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  import optax
  import jaxseg
  from jaxseg.data import shapes
  from jaxseg.models import maskrcnn

  examples = [shapes.generate_example(0, "train", i) for i in range(4 * STEPS)]
  batches = [{"image": np.stack([e["image"] for e in chunk]).astype(np.float32) / 255,
              **{k: np.stack([e[k] for e in chunk])
                 for k in ("boxes", "box_classes", "instance_masks")}}
             for chunk in (examples[i:i + 4] for i in range(0, len(examples), 4))]
  fields = dict(maskrcnn.TINY, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50,
                box_batch_size_per_image=32)
  arrays = {}
  for mode in ("single", "jit", "pmap"):
    model = jaxseg.models.build("maskrcnn", num_classes=5, sampler=first_k_sampler, **fields)
    state = jaxseg.train.create_train_state(jax.random.key(0), model, optax.sgd(0.02, 0.9),
                                            batches[0]["image"])
    if mode.startswith("pmap"):
      step = jaxseg.train.make_train_step(jaxseg.losses.maskrcnn_loss, parallel="pmap")
      state = jaxseg.train.pmap_replicate(state)
    else:
      devices = jax.devices()[:1] if mode == "single" else jax.devices()
      step = jaxseg.train.make_train_step(jaxseg.losses.maskrcnn_loss,
                                          mesh=jaxseg.train.make_mesh(devices))
    values = []
    for i, batch in enumerate(batches):
      state, metrics = step(state, batch, jax.random.key(i))
      values.append(float(jax.device_get(metrics["loss"])))
    if mode.startswith("pmap"):
      state = jaxseg.train.pmap_unreplicate(state)
    arrays.update({f"{mode}|{k}": v for k, v in _flat(state).items()})
    arrays[f"{mode}|__losses__"] = np.asarray(values)
  np.savez(out, **arrays)


def run(mode, out, process_id=0, num_processes=1, port=0):
  if mode == "weak":
    return run_weak(out)
  if mode == "maskrcnn":
    return run_maskrcnn(out)
  import jax
  if mode == "multihost":
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.config.update("jax_num_cpu_devices", 8)
  import flax
  import optax
  import jaxseg

  model = jaxseg.models.build("unet", num_classes=CLASSES, features=4, depth=2)
  state = jaxseg.train.create_train_state(jax.random.key(0), model, optax.sgd(0.1, momentum=0.9),
                                          np.zeros((1, SIZE, SIZE, 3), np.float32))
  loss_fn = jaxseg.losses.cross_entropy
  # Both steps take create_train_state's state as it is: switching is the `parallel` argument.
  if mode == "pmap":
    step = jaxseg.train.make_train_step(loss_fn, parallel="pmap")
  else:
    devices = jax.devices()[:1] if mode == "single" else jax.devices()
    step = jaxseg.train.make_train_step(loss_fn, mesh=jaxseg.train.make_mesh(devices))
  per_process = GLOBAL_BATCH // num_processes
  losses = []
  for i, batch in enumerate(global_batches()):
    local = {k: v[process_id * per_process:(process_id + 1) * per_process] for k, v in batch.items()}
    state, metrics = step(state, local, jax.random.key(i))
    losses.append(float(jax.device_get(metrics["loss"])))
  state = jaxseg.train.pmap_unreplicate(state)  # a no-op for the jit steps' states
  tree = {"params": state.params, "batch_stats": state.batch_stats}
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  arrays = {k: np.asarray(v.addressable_data(0)) for k, v in flat.items()}
  arrays["__losses__"] = np.asarray(losses)
  np.savez(out, **arrays)
  if mode == "multihost":
    jax.distributed.shutdown()


if __name__ == "__main__":
  mode, out = sys.argv[1], sys.argv[2]
  extra = [int(a) for a in sys.argv[3:]]
  run(mode, out, *extra)
