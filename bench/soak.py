"""Soak test: a long run of the smoke recipe, watching memory and step time.

  python bench/soak.py                      # 10 000 steps, eval + checkpoint every 500
  python bench/soak.py --steps 2000 --every 250 --json bench/results/soak.json

Trains ``unet_shapes.py:smoke`` through ``jaxseg.train.loop.train_and_evaluate`` (the
``train.py`` path: prefetching, async checkpoints, periodic evaluation, metric writers) and
prints, at every checkpoint, the process's resident memory now (VmRSS) and its peak so far
(VmHWM), then the time per step over the first and the last ``--every`` steps. A leak shows
as VmRSS growing from checkpoint to checkpoint after the first few; a slowdown as the last
steps taking longer than the first (after compilation).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def memory_mib():
  """(VmRSS, VmHWM) of this process in MiB (Linux /proc)."""
  fields = {}
  with open("/proc/self/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key in ("VmRSS", "VmHWM"):
        fields[key] = int(value.split()[0]) / 1024
  return fields["VmRSS"], fields["VmHWM"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10_000)
  parser.add_argument("--every", type=int, default=500, help="eval and checkpoint interval")
  parser.add_argument("--workdir", default=None, help="default: a temporary folder")
  parser.add_argument("--json", default=None, help="also write the figures here")
  args = parser.parse_args()
  if args.steps < 2 * args.every or args.every < 1:
    parser.error("--steps must be at least twice --every (first and last window)")

  import jax
  from jaxseg.configs import unet_shapes
  from jaxseg.train import checkpoint as ckpt_lib
  from jaxseg.train import loop

  config = unet_shapes.get_config("smoke")
  config.num_steps = args.steps
  config.eval_every = args.every
  config.checkpoint_every = args.every
  config.log_every = args.every // 5 or 1
  workdir = args.workdir or tempfile.mkdtemp(prefix="jaxseg-soak-")

  rows = []
  start = time.perf_counter()
  save = ckpt_lib.Checkpointer.save

  def save_and_record(self, state, **kwargs):
    out = save(self, state, **kwargs)
    rss, hwm = memory_mib()
    step = int(jax.device_get(state.step))
    rows.append({"step": step, "rss_mib": rss, "peak_mib": hwm,
                 "elapsed_s": time.perf_counter() - start})
    print(f"step {step:6d}  RSS {rss:8.1f} MiB  peak {hwm:8.1f} MiB  "
          f"{rows[-1]['elapsed_s']:7.1f} s", flush=True)
    return out

  ckpt_lib.Checkpointer.save = save_and_record
  try:
    summary = loop.train_and_evaluate(config, workdir)
  finally:
    ckpt_lib.Checkpointer.save = save

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logs = [json.loads(line) for line in f if "train/images_per_sec" in line]
  step_ms = [(r["step"], 1000 * config.batch_size / r["train/images_per_sec"]) for r in logs]
  # The first log window holds the compilation: the start is the rest of the first interval.
  first = [ms for s, ms in step_ms if config.log_every < s <= args.every]
  last = [ms for s, ms in step_ms if s > args.steps - args.every]
  settled = rows[2:] if len(rows) > 3 else rows
  growth = settled[-1]["rss_mib"] - settled[0]["rss_mib"]
  result = {
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      "jax": jax.__version__, "devices": str(jax.devices()), "steps": args.steps,
      "every": args.every, "batch_size": config.batch_size, "checkpoints": rows,
      "step_ms_first": statistics.median(first), "step_ms_last": statistics.median(last),
      "rss_growth_mib_after_warmup": growth, "final_miou": summary.get("miou"),
      "date": time.strftime("%Y-%m-%d"), "load_avg": os.getloadavg(),
  }
  print(f"\ntime per step (median of the log windows): first {args.every} steps "
        f"{result['step_ms_first']:.2f} ms, last {args.every} steps "
        f"{result['step_ms_last']:.2f} ms ({result['step_ms_last'] / result['step_ms_first']:.2f}x)")
  print(f"VmRSS from step {settled[0]['step']} to {settled[-1]['step']}: "
        f"{settled[0]['rss_mib']:.1f} -> {settled[-1]['rss_mib']:.1f} MiB ({growth:+.1f} MiB); "
        f"peak {rows[-1]['peak_mib']:.1f} MiB; final mIoU {100 * summary.get('miou', 0):.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
