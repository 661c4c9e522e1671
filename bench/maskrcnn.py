"""Mask R-CNN train-step and inference speed, jaxseg vs torchvision, in one run.

jaxseg: ``jaxseg.models.build("maskrcnn", backbone=...)`` trained through the library's own
``jaxseg.train.make_train_step(jaxseg.losses.maskrcnn_loss)`` (forward in train mode with
anchor/RoI matching and sampling inside the jitted program, the five losses, backward,
SGD-momentum update, state donated) and inference through a jitted ``model.apply(train=False)``
(proposals, per-class NMS, masks pasted at image resolution). torchvision:
``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` (or the same MaskRCNN around
``resnet_fpn_backbone`` for other depths) with ``min_size = max_size = --size`` so its transform
does not resize, FrozenBatchNorm in both, the same images, targets, optimizer and loss sum.

Printed per side: parameters, compile time (jaxseg: first call minus a steady call), steady
images/s (median of ``--steps`` timed calls after one warm-up, each waited for), peak RSS of
the process, and the ratio jaxseg/torch. The load average is printed before and after: compare
ratios only from an otherwise idle machine.

  python bench/maskrcnn.py [--backbone resnet50] [--size 512] [--batch 2] [--steps 3]
                           [--instances 4] [--classes 91] [--torch-threads 2] [--no-torch]
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
import optax

import jaxseg

SGD_LR, SGD_MOMENTUM = 1e-3, 0.9


def peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_batch(rng, batch, size, instances, classes):
  """Random images with `instances` filled ellipses each (inclusive boxes, masks, classes)."""
  images = rng.uniform(size=(batch, size, size, 3)).astype(np.float32)
  masks = np.zeros((batch, instances, size, size), np.uint8)
  boxes = np.zeros((batch, instances, 4), np.float32)
  labels = rng.randint(1, classes, size=(batch, instances)).astype(np.int32)
  yy, xx = np.mgrid[:size, :size]
  for b in range(batch):
    for k in range(instances):
      h, w = rng.randint(size // 8, size // 2, 2)
      y0, x0 = rng.randint(0, size - h), rng.randint(0, size - w)
      cy, cx = y0 + (h - 1) / 2, x0 + (w - 1) / 2
      m = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1
      masks[b, k] = m
      ys, xs = np.nonzero(m)
      boxes[b, k] = (ys.min(), xs.min(), ys.max(), xs.max())
  return {"image": images, "boxes": boxes, "box_classes": labels, "instance_masks": masks}


def timed_calls(fn, steps):
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps + 1):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  steady = statistics.median(times[1:])
  return first, steady


def bench_jax(args, batch):
  model = jaxseg.models.build("maskrcnn", num_classes=args.classes, backbone=args.backbone)
  tx = optax.sgd(SGD_LR, momentum=SGD_MOMENTUM)
  state = jaxseg.train.create_train_state(jax.random.key(0), model, tx, batch["image"])
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
  step = jaxseg.train.make_train_step(jaxseg.losses.maskrcnn_loss)
  holder = {"state": jaxseg.train.replicate_on_mesh(state, step.mesh), "i": 0}
  device_batch = jaxseg.train.shard_batch(batch, step.mesh)

  def train_once():
    holder["i"] += 1
    holder["state"], metrics = step(holder["state"], device_batch, jax.random.key(holder["i"]))
    jax.block_until_ready(metrics)

  first, steady = timed_calls(train_once, args.steps)
  out = {"params": n_params, "train_compile_s": first - steady,
         "train_ips": args.batch / steady}
  variables = holder["state"].variables()
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
  images = device_batch["image"]
  first, steady = timed_calls(lambda: jax.block_until_ready(infer(variables, images)),
                              args.steps)
  out.update(infer_compile_s=first - steady, infer_ips=args.batch / steady,
             rss_mb=peak_rss_mb())
  return out


def bench_torch(args, batch):
  import torch
  from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
  from torchvision.ops.misc import FrozenBatchNorm2d
  torch.manual_seed(0)
  if args.backbone == "resnet50":
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=args.classes,
                                  min_size=args.size, max_size=args.size,
                                  trainable_backbone_layers=5)
  else:
    bb = resnet_fpn_backbone(backbone_name=args.backbone, weights=None,
                             norm_layer=FrozenBatchNorm2d, trainable_layers=5)
    model = MaskRCNN(bb, num_classes=args.classes, min_size=args.size, max_size=args.size)
  # weights=None builds trainable BatchNorm; detection trains with it frozen, as jaxseg does.
  model.backbone.body = _freeze_bn(model.backbone.body, FrozenBatchNorm2d)
  n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
  opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=SGD_LR,
                        momentum=SGD_MOMENTUM)
  images = [torch.from_numpy(im.transpose(2, 0, 1).copy()) for im in batch["image"]]
  targets = []
  for b in range(args.batch):
    boxes = batch["boxes"][b][:, [1, 0, 3, 2]] + np.array([0, 0, 1, 1], np.float32)
    targets.append({"boxes": torch.from_numpy(boxes),
                    "labels": torch.from_numpy(batch["box_classes"][b].astype(np.int64)),
                    "masks": torch.from_numpy(batch["instance_masks"][b])})

  def train_once():
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = sum(model(images, targets).values())
    loss.backward()
    opt.step()

  _, steady = timed_calls(train_once, args.steps)
  out = {"params": n_params, "train_ips": args.batch / steady}

  def infer_once():
    model.eval()
    with torch.no_grad():
      model(images)

  _, steady = timed_calls(infer_once, args.steps)
  out.update(infer_ips=args.batch / steady, rss_mb=peak_rss_mb())
  return out


def _freeze_bn(module, frozen_cls):
  import torch
  for name, child in module.named_children():
    if isinstance(child, torch.nn.BatchNorm2d):
      frozen = frozen_cls(child.num_features, eps=child.eps)
      frozen.weight.copy_(child.weight.detach())
      frozen.bias.copy_(child.bias.detach())
      frozen.running_mean.copy_(child.running_mean)
      frozen.running_var.copy_(child.running_var)
      setattr(module, name, frozen)
    else:
      _freeze_bn(child, frozen_cls)
  return module


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--backbone", default="resnet50",
                      choices=("resnet18", "resnet34", "resnet50", "resnet101"))
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--instances", type=int, default=4)
  parser.add_argument("--classes", type=int, default=91)
  parser.add_argument("--torch-threads", type=int, default=2)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
  parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  batch = make_batch(np.random.RandomState(0), args.batch, args.size, args.instances,
                     args.classes)
  if args.side:  # a child process: one side, figures as one JSON line
    if args.side == "torch":
      import torch
      torch.set_num_threads(args.torch_threads)
    result = bench_jax(args, batch) if args.side == "jax" else bench_torch(args, batch)
    print("RESULT " + json.dumps(result), flush=True)
    return
  print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; jax {jax.__version__} on "
        f"{jax.devices()[0].platform} x{jax.device_count()}")
  print(f"Mask R-CNN {args.backbone}-FPN, {args.classes} classes, batch {args.batch} x "
        f"{args.size}x{args.size}, {args.instances} instances per image, SGD-momentum, "
        f"{args.steps} timed calls (median); each side in its own process (peak RSS is "
        "per process)")
  print("load average before: " + " ".join(f"{v:.2f}" for v in os.getloadavg()), flush=True)
  results = {}
  for side in ("jax", "torch"):
    if side == "torch" and args.no_torch:
      continue
    cmd = [sys.executable, __file__, "--side", side] + [
        a for a in sys.argv[1:] if a not in ("--json",)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      raise SystemExit(f"{side} side failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    results[side] = json.loads(lines[-1][len("RESULT "):])
    print(f"{side:5s}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in results[side].items() if v is not None),
          flush=True)
  if "torch" in results:
    j, t = results["jax"], results["torch"]
    results["ratio"] = {"train": j["train_ips"] / t["train_ips"],
                        "inference": j["infer_ips"] / t["infer_ips"],
                        "rss": j["rss_mb"] / t["rss_mb"]}
    print(f"ratio jaxseg/torch: train {results['ratio']['train']:.2f}x, inference "
          f"{results['ratio']['inference']:.2f}x, peak RSS {results['ratio']['rss']:.2f}x "
          f"(trainable params {j['params']} vs {t['params']})")
  print("load average after: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
  if args.json:
    print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
  main()
