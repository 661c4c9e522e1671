"""Peak memory and time of sliding-window vs whole-image inference on a large image.

A small padded UNet (default features=16, depth=3, 19 classes as on Cityscapes) on one
2048x1024 (W x H) image. Each configuration runs in its own child process so that its
peak resident set size is its own:

* XLA's compiled memory analysis of the jitted forward pass (``memory_analysis()``):
  temp (intermediate buffers), argument (weights + image) and output sizes, in MiB, and
  their sum (the program's device memory, as XLA planned it);
* peak RSS of the process (``ru_maxrss``) and its growth over the RSS after the model and
  image were built (that growth is what compiling and running the program cost);
* compile time and the best of ``--runs`` timed runs.

  python bench/inference_memory.py [--height 1024] [--width 2048] [--features 16] [--depth 3]
                                   [--window 512] [--stride 341] [--batch-windows 1 4]

Sliding-window temp memory should follow ``batch_windows`` (one group of windows in
flight) and not the number of windows; whole-image temp grows with the image.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args, mode: str) -> dict:
  import jax
  import jax.numpy as jnp

  import jaxseg
  from jaxseg.evaluation import inference

  model = jaxseg.models.build("unet", num_classes=args.classes, features=args.features,
                              depth=args.depth)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  images = jax.random.uniform(jax.random.key(1), (1, args.height, args.width, 3))
  jax.block_until_ready(images)
  rss_before = _rss_mib()

  if mode == "whole":
    def forward(v, x):
      return model.apply(v, x, train=False)
  else:
    batch_windows = int(mode.split(":")[1])

    def forward(v, x):
      return inference.sliding_window(
          lambda im: model.apply(v, im, train=False), x, num_classes=args.classes,
          window=args.window, stride=args.stride, blend="gaussian", batch_windows=batch_windows)

  t0 = time.perf_counter()
  compiled = jax.jit(forward).lower(variables, images).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  times = []
  for _ in range(args.runs):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables, images))
    times.append(time.perf_counter() - t0)
  mib = 1 / 2**20
  return dict(mode=mode, compile_s=compile_s, run_s=min(times),
              temp=mem.temp_size_in_bytes * mib, argument=mem.argument_size_in_bytes * mib,
              output=mem.output_size_in_bytes * mib,
              rss_before=rss_before, rss_peak=_rss_mib())


def _windows(args) -> int:
  from jaxseg.evaluation.inference import window_starts
  return (len(window_starts(max(args.height, args.window), args.window, args.stride))
          * len(window_starts(max(args.width, args.window), args.window, args.stride)))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--height", type=int, default=1024)
  p.add_argument("--width", type=int, default=2048)
  p.add_argument("--classes", type=int, default=19)
  p.add_argument("--features", type=int, default=16)
  p.add_argument("--depth", type=int, default=3)
  p.add_argument("--window", type=int, default=512)
  p.add_argument("--stride", type=int, default=341)
  p.add_argument("--batch-windows", type=int, nargs="+", default=[1, 4])
  p.add_argument("--runs", type=int, default=2)
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(child(args, args.child)), flush=True)
    return

  import jax
  print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU "
        f"cores, JAX {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), load average {os.getloadavg()[0]:.1f}")
  print(f"UNet features={args.features} depth={args.depth}, {args.classes} classes, one "
        f"{args.width}x{args.height} (WxH) image; sliding window {args.window}x{args.window} "
        f"stride {args.stride}: {_windows(args)} windows, Gaussian blend")
  head = (f"{'mode':<20}{'compile s':>10}{'run s':>8}{'XLA temp':>10}{'arg':>8}{'out':>8}"
          f"{'sum':>8}{'RSS peak':>10}{'RSS growth':>12}   (MiB)")
  print(head)
  modes = ["whole"] + [f"slide:{b}" for b in args.batch_windows]
  passthrough = sys.argv[1:]
  for mode in modes:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough,
                        f"--child={mode}"], capture_output=True, text=True)
    if r.returncode:
      print(f"{mode:<20}failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
      continue
    m = json.loads(r.stdout.strip().splitlines()[-1])
    label = "whole image" if mode == "whole" else f"slide, {mode.split(':')[1]} win/call"
    total = m["temp"] + m["argument"] + m["output"]
    print(f"{label:<20}{m['compile_s']:>10.1f}{m['run_s']:>8.2f}{m['temp']:>10.0f}"
          f"{m['argument']:>8.0f}{m['output']:>8.0f}{total:>8.0f}{m['rss_peak']:>10.0f}"
          f"{m['rss_peak'] - m['rss_before']:>12.0f}", flush=True)


if __name__ == "__main__":
  main()
