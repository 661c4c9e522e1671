"""Subprocess worker for the sharding and multi-host tests (needs its own device count).

Usage: python parallel_worker.py MODE OUT.npz [process_id num_processes port]
  MODE = single | jit | pmap : one process, every strategy on the same 3 global batches.
  MODE = multihost          : one of two jax.distributed processes (2 CPU devices each).
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


def run(mode, out, process_id=0, num_processes=1, port=0):
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
  if mode == "pmap":
    step = jaxseg.train.make_train_step(loss_fn, parallel="pmap")
    state = jaxseg.train.replicate_state(state)
  else:
    devices = jax.devices()[:1] if mode == "single" else jax.devices()
    mesh = jaxseg.train.make_mesh(devices)
    step = jaxseg.train.make_train_step(loss_fn, mesh=mesh)
    state = jaxseg.train.replicate(state, mesh)
  per_process = GLOBAL_BATCH // num_processes
  losses = []
  for i, batch in enumerate(global_batches()):
    local = {k: v[process_id * per_process:(process_id + 1) * per_process] for k, v in batch.items()}
    state, metrics = step(state, local, jax.random.key(i))
    losses.append(float(jax.device_get(metrics["loss"])))
  if mode == "pmap":
    state = jaxseg.train.unreplicate_state(state)
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
