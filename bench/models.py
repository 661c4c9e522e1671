"""Train-step speed of every registered model, against PyTorch where a twin exists.

Every semantic model in ``jaxseg.models.names()`` runs at least once (Mask R-CNN has
``bench/maskrcnn.py``) (``CASES`` lists the cases; a
name registered later and missing there runs with its defaults, with a note). Each case
runs the library's own step, ``jaxseg.train.make_train_step(jaxseg.losses.cross_entropy)``
on a state from ``jaxseg.train.create_train_state`` replicated as the trainer does:
forward in train mode (BatchNorm statistics, dropout), softmax cross-entropy plus
``--aux-weight`` times the cross-entropy of every auxiliary head, backward and an
SGD-momentum update (lr 1e-3, momentum 0.9), float32, state donated. The batch is put on
the device once (data loading is not measured). Printed per case: parameter count, compile
time, steady-state images/s and, with a PyTorch twin, the same step in PyTorch (same
input, batch, loss incl. aux with the same weight, optimizer) and the ratio jaxseg/torch.

Compile time is the time of the first two calls minus two steady steps (with the state
donated a second call could compile again; the ``jits`` column says how many programs the
step compiled, 1 when it did not). Steady-state images/s is batch / median of ``--steps``
step times, each step waited for with ``block_until_ready`` (PyTorch: one warm-up step,
then the median of ``--steps`` steps).

PyTorch twins: ``torchvision.models.segmentation`` fcn_resnet50/101 and
deeplabv3_resnet50/101 (``weights=None, weights_backbone=None, aux_loss=True``; jaxseg
builds the same layers, so the parameter counts agree) and hand-written SegNet and FCN-8s
(same layers as jaxseg's, any ``--width``). The other models have none. Default: full
width, 64x64 images, batch 2, 3 timed steps, torch on 2 threads (12 minutes on 2 shared
CPU cores):

  python bench/models.py [--models segnet,deeplabv3plus] [--size 64] [--batch 2] [--steps 3]
                         [--width 1.0] [--no-torch] [--torch-threads 2] [--aux-weight 0.4]

``--models`` takes model names (every case of that name) or case labels such as
``deeplabv3plus/mobilenet_v2``. Timings on a shared machine are noisy (the load average
is printed before, after and at the end of every row): on an oversubscribed CPU, torch's
OpenMP threads spin and lose most of their speed, so compare ratios only from runs on an
otherwise idle machine.

FCN's conv1_1 pads by 100 and Dilation reflect-pads by 186 px per side, so at 64 px they
compute on 262 px and 436 px maps: their images/s are not comparable with the other models
at the same nominal size. The ResNet models at output stride 8 see 8x8 maps at 64 px.
RefineNet runs at output stride 32, so at 64 px its c5 and RefineNet-4 block are 2x2 maps,
where XLA:CPU's 3x3 convolution is pathologically slow (batch 2, 512 -> 512: forward 27 ms
at 2x2, 0.8 ms at 3x3; 2048 -> 512 forward + backward 0.7 s): it trains faster per image at
96 px than at 64 px.
"""
import argparse
import gc
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
import optax

import jaxseg

# Instance models have their own benchmark (bench/maskrcnn.py).
INSTANCE_MODELS = ("maskrcnn",)

# (registered name, builder kwargs). Every registered semantic model appears at least once.
CASES = [
    ("unet", {}),
    ("segnet", {}),
    ("fcn32s", {}),
    ("fcn16s", {}),
    ("fcn8s", {}),
    ("dilation", {}),
    ("deeplabv1", {}),
    ("deeplabv2", {"backbone": "vgg16"}),
    ("deeplabv2", {"backbone": "resnet101"}),
    ("fcn_resnet50", {}),
    ("fcn_resnet101", {}),
    ("deeplabv3_resnet50", {}),
    ("deeplabv3_resnet101", {}),
    ("deeplabv3", {"backbone": "resnet101"}),
    ("deeplabv3plus", {"backbone": "resnet50"}),
    ("deeplabv3plus", {"backbone": "resnet101"}),
    ("deeplabv3plus", {"backbone": "mobilenet_v2"}),
    ("pspnet", {"backbone": "resnet50"}),
    ("refinenet", {"backbone": "resnet101"}),
]

TORCHVISION_TWINS = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101")
SGD_LR, SGD_MOMENTUM = 1e-3, 0.9


def label(name, kwargs):
  return "/".join([name] + [str(v) for v in kwargs.values()])


def all_cases():
  """``CASES`` plus, with defaults, any registered name they miss."""
  cases = list(CASES)
  covered = {name for name, _ in cases}
  for name in jaxseg.models.names():
    if name in INSTANCE_MODELS:
      continue  # not a per-pixel classifier: bench/maskrcnn.py
    if name not in covered:
      print(f"note: {name} is not in CASES; running it with its defaults", file=sys.stderr)
      cases.append((name, {}))
  return cases


def build(name, kwargs, num_classes, width):
  if name == "unet":
    return jaxseg.models.build(name, num_classes=num_classes,
                               features=max(1, int(round(64 * width))), **kwargs)
  return jaxseg.models.build(name, num_classes=num_classes, width_multiplier=width, **kwargs)


def load():
  return os.getloadavg()[0]


# ---------------------------------------------------------------------------
# jaxseg
# ---------------------------------------------------------------------------

def bench_jax(model, images, labels, steps, aux_weight):
  tx = optax.sgd(SGD_LR, momentum=SGD_MOMENTUM)
  state = jaxseg.train.create_train_state(jax.random.key(0), model, tx, images)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
  step = jaxseg.train.make_train_step(jaxseg.losses.cross_entropy, aux_weight=aux_weight)
  state = jaxseg.train.replicate(state, step.mesh)
  batch = jaxseg.train.shard_batch({"image": images, "mask": labels}, step.mesh)

  def timed(state, i):
    t0 = time.perf_counter()
    state, metrics = step(state, batch, jax.random.key(i))
    jax.block_until_ready((state, metrics))
    return state, metrics, time.perf_counter() - t0

  state, metrics, t1 = timed(state, 0)
  state, metrics, t2 = timed(state, 1)
  times = []
  for i in range(steps):
    state, metrics, t = timed(state, i + 2)
    times.append(t)
  step_s = statistics.median(times)
  n_jits = step.jitted._cache_size()
  loss = float(metrics["loss"])
  has_aux = "aux_loss" in metrics
  del state, step, batch
  return dict(params=n_params, compile_s=t1 + t2 - 2 * step_s, jits=n_jits,
              ips=images.shape[0] / step_s, loss=loss, aux=has_aux)


# ---------------------------------------------------------------------------
# PyTorch twins (NCHW)
# ---------------------------------------------------------------------------

def torch_twins(num_classes, width):
  """label -> zero-argument constructor of a torch module (output tensor or dict)."""
  import torch
  from torch import nn

  widths = [max(1, int(round(w * width))) for w in (64, 128, 256, 512, 512)]
  fc = max(1, int(round(4096 * width)))
  depths = (2, 2, 3, 3, 3)

  class SegNet(nn.Module):
    def __init__(self):
      super().__init__()
      enc, c = [], 3
      for w, d in zip(widths, depths):
        stage = []
        for _ in range(d):
          stage += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
          c = w
        enc.append(nn.Sequential(*stage))
      self.enc = nn.ModuleList(enc)
      w1, w2, w3, w4, w5 = widths
      plan = [[w5, w5, w5, w4], [w4, w4, w4, w3], [w3, w3, w3, w2], [w2, w2, w1], [w1, w1]]
      dec = []
      for chans in plan:
        stage = []
        for a, b in zip(chans[:-1], chans[1:]):
          stage += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        dec.append(nn.Sequential(*stage))
      self.dec = nn.ModuleList(dec)
      self.final = nn.Conv2d(w1, num_classes, 3, padding=1)
      self.pool = nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)
      self.unpool = nn.MaxUnpool2d(2, 2)

    def forward(self, x):
      stack = []
      for stage in self.enc:
        x = stage(x)
        size = x.shape[2:]
        x, idx = self.pool(x)
        stack.append((idx, size))
      for stage, (idx, size) in zip(self.dec, reversed(stack)):
        x = stage(self.unpool(x, idx, output_size=size))
      return self.final(x)

  def bilinear(k, c):
    f = (k + 1) // 2
    og = torch.arange(k, dtype=torch.float32)
    f1 = 1 - (og - (f - 0.5)).abs() / f
    w = torch.zeros(c, c, k, k)
    for i in range(c):
      w[i, i] = f1[:, None] * f1[None, :]
    return w

  class FCN8s(nn.Module):
    def __init__(self):
      super().__init__()
      stages, c = [], 3
      for s, (w, d) in enumerate(zip(widths, depths)):
        layers = []
        for j in range(d):
          layers += [nn.Conv2d(c, w, 3, padding=100 if (s, j) == (0, 0) else 1),
                     nn.ReLU(inplace=True)]
          c = w
        layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        stages.append(nn.Sequential(*layers))
      self.stages = nn.ModuleList(stages)
      self.fc = nn.Sequential(nn.Conv2d(widths[4], fc, 7), nn.ReLU(inplace=True), nn.Dropout(),
                              nn.Conv2d(fc, fc, 1), nn.ReLU(inplace=True), nn.Dropout())
      self.score_fr = nn.Conv2d(fc, num_classes, 1)
      self.score_pool4 = nn.Conv2d(widths[3], num_classes, 1)
      self.score_pool3 = nn.Conv2d(widths[2], num_classes, 1)
      # Frozen bilinear deconvolutions: buffers, as jaxseg holds them as constants.
      self.register_buffer("up2", bilinear(4, num_classes))
      self.register_buffer("up8", bilinear(16, num_classes))

    def forward(self, x):
      h, w = x.shape[2:]
      feats = []
      for stage in self.stages:
        x = stage(x)
        feats.append(x)
      x = nn.functional.conv_transpose2d(self.score_fr(self.fc(x)), self.up2, stride=2)
      p4 = self.score_pool4(feats[3])[:, :, 5:5 + x.shape[2], 5:5 + x.shape[3]]
      x = nn.functional.conv_transpose2d(x + p4, self.up2, stride=2)
      p3 = self.score_pool3(feats[2])[:, :, 9:9 + x.shape[2], 9:9 + x.shape[3]]
      x = nn.functional.conv_transpose2d(x + p3, self.up8, stride=8)
      return x[:, :, 31:31 + h, 31:31 + w]

  twins = {"segnet": SegNet, "fcn8s": FCN8s}
  if width == 1.0:  # torchvision builds full width only
    import torchvision.models.segmentation as tvseg
    for name in TORCHVISION_TWINS:
      twins[name] = (lambda fn: lambda: fn(weights=None, weights_backbone=None,
                                           num_classes=num_classes, aux_loss=True))(
                                               getattr(tvseg, name))
  return twins


def bench_torch(make_model, images, labels, steps, aux_weight):
  import torch
  torch.manual_seed(0)
  model = make_model().train()
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM)
  # jaxseg's models normalise internally; torchvision's expect normalised input.
  mean = np.asarray(jaxseg.models.layers.IMAGENET_MEAN, np.float32)
  std = np.asarray(jaxseg.models.layers.IMAGENET_STD, np.float32)
  x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(labels.astype(np.int64))
  ce = torch.nn.CrossEntropyLoss(ignore_index=255)
  has_aux = False

  def step():
    nonlocal has_aux
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out = model(x)
    if isinstance(out, dict):
      loss = ce(out["out"], y)
      if "aux" in out:
        has_aux = True
        loss = loss + aux_weight * ce(out["aux"], y)
    else:
      loss = ce(out, y)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0

  step()  # warm-up
  times = [step() for _ in range(steps)]
  del model, opt
  return dict(params=n_params, ips=images.shape[0] / statistics.median(times), aux=has_aux)


# ---------------------------------------------------------------------------

def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="",
                      help="comma-separated model names or case labels (default: every case)")
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
  parser.add_argument("--classes", type=int, default=12)
  parser.add_argument("--width", type=float, default=1.0, help="width multiplier")
  parser.add_argument("--aux-weight", type=float, default=0.4,
                      help="weight of the auxiliary-head losses, both sides")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--torch-threads", type=int, default=2,
                      help="torch.set_num_threads (0: torch's default)")
  args = parser.parse_args()

  cases = all_cases()
  if args.models:
    wanted = set(args.models.split(","))
    unknown = wanted - {n for n, _ in cases} - {label(n, k) for n, k in cases}
    if unknown:
      parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; cases: "
                   f"{', '.join(label(n, k) for n, k in cases)}")
    cases = [(n, k) for n, k in cases if n in wanted or label(n, k) in wanted]

  rng = np.random.RandomState(0)
  images = rng.uniform(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  labels = rng.randint(0, args.classes, size=(args.batch, args.size, args.size)).astype(np.int32)
  twins = {} if args.no_torch else torch_twins(args.classes, args.width)
  torch_info = ""
  if twins:
    import torch
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    torch_info = f"torch {torch.__version__} ({torch.get_num_threads()} threads), "

  load_before = os.getloadavg()
  print(f"machine: {platform.platform()}, {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable); python "
        f"{platform.python_version()}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
        f"{torch_info}images {args.batch}x{args.size}x{args.size}, {args.classes} classes, "
        f"width x{args.width}, aux weight {args.aux_weight}, SGD-momentum, {args.steps} timed "
        f"steps (median)")
  print("load average before: " + " ".join(f"{v:.2f}" for v in load_before), flush=True)

  rows = []
  for name, kwargs in cases:
    lab = label(name, kwargs)
    print(f"... {lab}", end="", file=sys.stderr, flush=True)
    j = bench_jax(build(name, kwargs, args.classes, args.width), images, labels, args.steps,
                  args.aux_weight)
    gc.collect()
    t = None
    if name in twins and not kwargs:
      t = bench_torch(twins[name], images, labels, args.steps, args.aux_weight)
      gc.collect()
    rows.append((lab, j, t, load()))
    print(f": {j['ips']:.2f} img/s" + (f", torch {t['ips']:.2f}" if t else ""),
          file=sys.stderr, flush=True)

  load_after = os.getloadavg()
  print()
  print(f"| {'model':<28} | {'params':>12} | {'compile s':>9} | {'jits':>4} | {'aux':>3} | "
        f"{'img/s':>6} | {'torch params':>12} | {'torch img/s':>11} | {'jax/torch':>9} | "
        f"{'load':>4} |")
  print("|" + "|".join("-" * (n + 2) for n in (28, 12, 9, 4, 3, 6, 12, 11, 9, 4)) + "|")
  for lab, j, t, ld in rows:
    line = (f"| {lab:<28} | {j['params']:>12,} | {j['compile_s']:>9.1f} | {j['jits']:>4} | "
            f"{'yes' if j['aux'] else 'no':>3} | {j['ips']:>6.2f} |")
    if t:
      flag = "" if t["params"] == j["params"] and t["aux"] == j["aux"] else "*"
      ratio = f"{j['ips'] / t['ips']:.2f}{flag}"
      line += f" {t['params']:>12,} | {t['ips']:>11.2f} | {ratio:>9} |"
    else:
      line += f" {'-':>12} | {'-':>11} | {'-':>9} |"
    print(line + f" {ld:>4.1f} |")
  print()
  print("load average after: " + " ".join(f"{v:.2f}" for v in load_after))
  if any(t and (t["params"] != j["params"] or t["aux"] != j["aux"]) for _, j, t, _ in rows):
    print("*: parameter count or aux head differs between jaxseg and the PyTorch twin")


if __name__ == "__main__":
  main()
