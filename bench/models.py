"""Train-step speed of every VGG-era model, and SegNet / FCN-8s against PyTorch.

For each model: parameter count, compile time of the jitted train step and
images/s of forward + softmax cross-entropy + backward + SGD-momentum update
(float32, train mode: BatchNorm statistics and dropout active). For SegNet and
FCN-8s the same step runs in an equivalent hand-written PyTorch model (same
layers, same parameter count, printed) in the same process, with the ratio
jax/torch. Default: full-width models, 64x64 images, batch 2, 3 timed steps
(a few minutes on 2 CPU cores):

  python bench/models.py [--models segnet,fcn8s] [--size 64] [--batch 2] [--steps 3]
                         [--width 1.0] [--no-torch] [--torch-threads N]

Timings on a shared machine are noisy (the load average is printed): on an
oversubscribed CPU, torch's OpenMP threads spin and lose most of their speed,
so compare ratios only from runs on an otherwise idle machine.

FCN's conv1_1 pads by 100 and Dilation reflect-pads by 186 px per side, so at
64 px they compute on 262 px and 436 px maps: their images/s are not
comparable with the other models at the same nominal size.
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxseg

MODELS = ["unet", "segnet", "fcn32s", "fcn16s", "fcn8s", "dilation", "deeplabv1", "deeplabv2"]


def build(name, num_classes, width):
  if name == "unet":
    return jaxseg.models.build(name, num_classes=num_classes,
                               features=max(1, int(round(64 * width))))
  return jaxseg.models.build(name, num_classes=num_classes, width_multiplier=width)


def bench_jax(model, images, labels, steps):
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
  params, stats = variables["params"], variables.get("batch_stats", {})
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  tx = optax.sgd(1e-3, momentum=0.9)
  opt = tx.init(params)

  def step(params, stats, opt, rng):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, images, train=True,
                                mutable=["batch_stats"], rngs={"dropout": rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), upd.get("batch_stats", {}), opt, loss

  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(params, stats, opt, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - t0
  state = compiled(params, stats, opt, jax.random.key(1))  # warm-up
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for i in range(steps):
    state = compiled(*state[:3], jax.random.key(i + 2))
  jax.block_until_ready(state)
  return n_params, compile_s, steps * images.shape[0] / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------
# PyTorch equivalents (NCHW), same layer sequence as jaxseg's modules
# ---------------------------------------------------------------------------

def torch_models(num_classes, width):
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

  return {"segnet": SegNet, "fcn8s": FCN8s}


def bench_torch(model_cls, images, labels, steps):
  import torch
  torch.manual_seed(0)
  model = model_cls().train()
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
  x = torch.tensor(np.asarray(images).transpose(0, 3, 1, 2).copy())
  y = torch.tensor(np.asarray(labels), dtype=torch.long)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

  step()  # warm-up
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  return n_params, steps * images.shape[0] / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--classes", type=int, default=12)
  parser.add_argument("--width", type=float, default=1.0, help="width multiplier")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch.set_num_threads (0: torch's default)")
  args = parser.parse_args()

  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.uniform(size=(args.batch, args.size, args.size, 3)), jnp.float32)
  labels = jnp.asarray(rng.randint(0, args.classes, size=(args.batch, args.size, args.size)))
  torch_cls = {} if args.no_torch else torch_models(args.classes, args.width)
  if torch_cls:
    import torch
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ", end="")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; images {args.batch}x"
        f"{args.size}x{args.size}, {args.classes} classes, width x{args.width}, "
        f"{args.steps} timed steps; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores")
  print(f"{'model':<10} {'params':>12} {'compile s':>10} {'img/s':>8} | "
        f"{'torch params':>12} {'torch img/s':>11} {'jax/torch':>9}")
  for name in args.models.split(","):
    model = build(name, args.classes, args.width)
    n, compile_s, ips = bench_jax(model, images, labels, args.steps)
    line = f"{name:<10} {n:>12,} {compile_s:>10.1f} {ips:>8.2f} |"
    if name in torch_cls:
      tn, tips = bench_torch(torch_cls[name], images, labels, args.steps)
      line += f" {tn:>12,} {tips:>11.2f} {ips / tips:>9.2f}"
    print(line, flush=True)


if __name__ == "__main__":
  main()
