"""mIoU from full masks vs weak labels: same model, schedule and seed; only the loss and the
label kinds the trainer sees change (weak runs never see a mask; scoring uses val masks).

  python bench/weak_supervision.py                                   # embedded shapes dataset
  python bench/weak_supervision.py --modes full,scribble --steps 1200
  python bench/weak_supervision.py --config jaxseg/configs/deeplabv3plus_camvid.py:cpu \
      --modes full,scribble_pce,scribble --steps 300
  python bench/weak_supervision.py --config jaxseg/configs/deeplabv3plus_shapes.py \
      --modes full,tags_ccnn --steps 600

Prints one row per supervision with its mIoU and the ratio to full supervision, and keeps
``summary.json`` under ``--root``: modes run by separate calls with the same ``--root`` end up
in one table (a mode already there is refused, not rerun).
"""
import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxseg.train import loop  # noqa: E402

# (label kinds the trainer may read, loss name, loss kwargs). Every loss at its defaults
# except CCNN's area bounds (its VOC fractions assume objects covering 30-70% of the image).
BOXES = ("boxes", "box_classes")
MODES = {
    "full": (("mask",), "cross_entropy", {}),
    "scribble_pce": (("scribble",), "partial_cross_entropy", {}),
    "scribble": (("scribble",), "scribble_loss", {}),
    "scribble_em": (("scribble",), "scribble_em_loss", {}),
    "boxes_seg": (BOXES + ("box_seg",), "box_loss", dict(mode="bbox_seg")),
    "boxes_soft": (BOXES, "box_loss", dict(mode="bbox_soft")),
    "boxes_em_fixed": (BOXES, "box_loss", dict(mode="em_fixed")),
    "boxes_em_adapt": (BOXES, "box_loss", dict(mode="em_adapt")),
    "boxinst": (BOXES, "box_loss", dict(mode="boxinst")),
    "tags_ccnn": (("tags",), "image_level_loss", dict(fg_lower=0.02, bg_lower=0.5,
                                                      bg_upper=0.95)),
    "tags_em_adapt": (("tags",), "image_level_loss", dict(mode="em_adapt")),
}


def loss_kwargs(mode, class_names, num_steps):
  """The mode's loss kwargs for this schedule and dataset (CamVid has no background class)."""
  kwargs = dict(MODES[mode][2])
  if class_names[0].lower() != "background":
    if mode == "tags_ccnn":  # every class is a foreground class: only per-class lower bounds
      kwargs = dict(fg_lower=kwargs["fg_lower"], background_class=None)
    elif mode.startswith("box"):
      print(f"WARNING: {class_names[0]!r} stands in for the background of the box targets: "
            "this dataset has no background class, and classes without boxes (stuff) get "
            "no label of their own.", flush=True)
  return kwargs


def _read_summary(path):
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def load_config(spec):
  """``path.py[:variant]`` -> the recipe's ConfigDict."""
  path, _, variant = spec.partition(":")
  s = importlib.util.spec_from_file_location("recipe", path)
  module = importlib.util.module_from_spec(s)
  s.loader.exec_module(module)
  return module.get_config(variant or None)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="jaxseg/configs/unet_shapes.py")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--steps", type=int, default=None, help="override num_steps")
  p.add_argument("--set", action="append", default=[], help="key=value config override")
  p.add_argument("--root", default="runs/weak_supervision")
  args = p.parse_args()
  modes = args.modes.split(",")
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    p.error(f"unknown modes {unknown}; valid: {', '.join(MODES)}")
  name = os.path.splitext(os.path.basename(args.config.partition(':')[0]))[0]
  variant = args.config.partition(":")[2]
  root = os.path.join(args.root, name + (f"_{variant}" if variant else ""))
  taken = [m for m in modes if os.path.exists(os.path.join(root, m))]
  if taken:
    p.error(f"{root} already holds runs {taken}: a resumed run would report the wrong time; "
            "pass another --root or remove them")
  summary_path = os.path.join(root, "summary.json")
  for mode in modes:
    kinds, loss, _ = MODES[mode]
    config = load_config(args.config)
    if args.steps:
      config.num_steps = args.steps
    for kv in args.set:
      key, _, value = kv.partition("=")
      loop.apply_override(config, key, value)
    kwargs = loss_kwargs(mode, loop.load_split(config, config.train_split).class_names,
                         int(config.num_steps))
    config.label_kinds = kinds
    config.loss = loss
    config.loss_kwargs = kwargs
    config.eval_every = config.num_steps + 1
    t0 = time.time()
    summary = loop.train_and_evaluate(config, os.path.join(root, mode))
    print(f"== {mode}: mIoU {100 * summary['miou']:.2f}", flush=True)
    # Merge into the file as it is now: earlier (or concurrent) calls may have added modes.
    results = _read_summary(summary_path)
    results[mode] = {"miou": summary["miou"], "minutes": (time.time() - t0) / 60,
                     "steps": int(config.num_steps), "loss": loss, "loss_kwargs": kwargs}
    with open(summary_path, "w") as f:
      json.dump(results, f, indent=2)
  results = _read_summary(summary_path)
  full = results.get("full", {}).get("miou")
  print(f"\n{args.config}, seed {config.seed}")
  print(f"{'supervision':<14} {'loss':<24} {'steps':>6} {'mIoU':>6} {'/ full':>7} {'min':>5}")
  for mode, r in results.items():
    ratio = f"{r['miou'] / full:.3f}" if full else "  n/a"
    print(f"{mode:<14} {r['loss']:<24} {r.get('steps', ''):>6} {100 * r['miou']:6.2f} {ratio:>7} "
          f"{r['minutes']:5.1f}")


if __name__ == "__main__":
  main()
