"""Memory and time of the train step with and without ``remat`` (``jax.checkpoint`` per block).

DeepLab v3+ on ResNet-50 (output stride 16) and the default-width UNet (features=64,
depth=4), batch 2 at 512x512, 21 classes, AdamW, cross-entropy, through the library's own
step (``jaxseg.train.make_train_step``: jitted, state donated). Each (model, remat) pair runs
in its own child process so that its peak resident set size is its own:

* XLA's compiled memory analysis of the step (``memory_analysis()``): temp (activations and
  other intermediates, as XLA planned them) and argument (state + batch) sizes, in MiB;
* peak RSS of the child (``ru_maxrss``) and its growth over the RSS once the state was built
  (what compiling and running the step cost on top of parameters and optimizer state);
* compile time and the mean of ``--steps`` timed steps after one warm-up step.

  python bench/remat.py [--size 512] [--batch 2] [--steps 2] [--dtype float32]
                        [--models deeplabv3plus_resnet50 unet]

``remat`` keeps only each block's input for the backward pass and recomputes the block, so
temp memory should drop by roughly the activations inside the blocks, for one extra forward
pass of the blocks (about a third more step time).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

MODELS = {
    "deeplabv3plus_resnet50": ("deeplabv3plus", dict(backbone="resnet50", output_stride=16)),
    "unet": ("unet", dict()),  # features=64, depth=4: the paper's width
}
NUM_CLASSES = 21


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args, name: str, remat: bool) -> dict:
  import jax
  import numpy as np
  import optax

  import jaxseg

  family, kwargs = MODELS[name]
  model = jaxseg.models.build(family, num_classes=NUM_CLASSES, remat=remat, dtype=args.dtype,
                              **kwargs)
  # Parameters do not depend on the image size: initialise on a small image.
  state = jaxseg.train.create_train_state(jax.random.key(0), model, optax.adamw(1e-4),
                                          np.zeros((1, 64, 64, 3), np.float32))
  rng = np.random.RandomState(0)
  batch = {"image": rng.uniform(size=(args.batch, args.size, args.size, 3)).astype(np.float32),
           "mask": rng.randint(0, NUM_CLASSES, (args.batch, args.size, args.size)).astype(np.int32)}
  train_step = jaxseg.train.make_train_step(jaxseg.losses.cross_entropy, num_classes=NUM_CLASSES)
  state = jaxseg.train.replicate_on_mesh(state, train_step.mesh)
  jax.block_until_ready(state)
  rss_before = _rss_mib()

  sharded = jaxseg.train.shard_batch(batch, train_step.mesh)
  t0 = time.perf_counter()
  compiled = train_step.jitted.lower(state, sharded, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  times = []
  for i in range(args.steps + 1):  # the first call is the warm-up
    t0 = time.perf_counter()
    state, metrics = train_step(state, batch, jax.random.key(i))
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  mib = 1 / 2**20
  return dict(name=name, remat=remat, compile_s=compile_s, first_s=times[0],
              step_s=float(np.mean(times[1:])), loss=float(metrics["loss"]),
              temp=mem.temp_size_in_bytes * mib, argument=mem.argument_size_in_bytes * mib,
              rss_before=rss_before, rss_peak=_rss_mib(),
              params=sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    name, remat = args.child.split(":")
    print(json.dumps(child(args, name, remat == "1")), flush=True)
    return

  import jax
  print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU "
        f"cores, JAX {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), load average {os.getloadavg()[0]:.1f}")
  print(f"train step (make_train_step, donated state), batch {args.batch} at "
        f"{args.size}x{args.size}, {NUM_CLASSES} classes, AdamW, {args.dtype}")
  print(f"{'model':<24}{'remat':>6}{'params':>8}{'compile s':>10}{'step s':>8}{'XLA temp':>10}"
        f"{'arg':>7}{'RSS peak':>10}{'RSS growth':>11}   (MiB)", flush=True)
  passthrough = [a for a in sys.argv[1:] if not a.startswith("--child")]
  results = {}
  for name in args.models:
    for remat in (False, True):
      r = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough,
                          f"--child={name}:{int(remat)}"], capture_output=True, text=True)
      if r.returncode:
        err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode
        print(f"{name:<24}{str(remat):>6}  failed: {err}", flush=True)
        continue
      m = json.loads(r.stdout.strip().splitlines()[-1])
      results[name, remat] = m
      print(f"{name:<24}{str(remat):>6}{m['params'] / 1e6:>7.1f}M{m['compile_s']:>10.1f}"
            f"{m['step_s']:>8.2f}{m['temp']:>10.0f}{m['argument']:>7.0f}{m['rss_peak']:>10.0f}"
            f"{m['rss_peak'] - m['rss_before']:>11.0f}", flush=True)
    if (name, False) in results and (name, True) in results:
      a, b = results[name, False], results[name, True]
      print(f"{'':<24}remat saves {a['temp'] - b['temp']:.0f} MiB of XLA temp "
            f"({100 * (1 - b['temp'] / a['temp']):.0f} %), "
            f"{a['rss_peak'] - b['rss_peak']:.0f} MiB of peak RSS, "
            f"for {100 * (b['step_s'] / a['step_s'] - 1):+.0f} % step time", flush=True)


if __name__ == "__main__":
  main()
