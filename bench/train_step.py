"""UNet train-step throughput: jaxseg vs an equivalent hand-written PyTorch UNet.

Both sides: padded UNet (3x3 conv + BatchNorm + ReLU twice per level, 2x2 max-pool,
2x2 stride-2 transposed conv, skip concatenation), softmax cross-entropy, backward and an
SGD-momentum update, float32, same parameter count (printed). Run on the same machine in the
same process so the ratio is meaningful on a noisy machine:

  python bench/train_step.py [--batch 4] [--size 128] [--features 32] [--depth 4] [--steps 10]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxseg


def bench_jax(args, images, masks):
  model = jaxseg.models.build("unet", num_classes=args.classes, features=args.features,
                              depth=args.depth)
  state = jaxseg.train.create_train_state(jax.random.key(0), model,
                                          optax.sgd(1e-2, momentum=0.9), images)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  step = jaxseg.train.make_train_step(jaxseg.losses.cross_entropy)
  state = jaxseg.train.replicate(state, step.mesh)
  batch = {"image": images, "mask": masks}
  t0 = time.perf_counter()
  state, m = step(state, batch, jax.random.key(0))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    state, m = step(state, batch, jax.random.key(0))
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(args.steps):
    state, m = step(state, batch, jax.random.key(i))
  jax.block_until_ready(m)
  return n_params, compile_s, (time.perf_counter() - t0) / args.steps


def bench_torch(args, images, masks):
  import torch
  from torch import nn

  def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

  class TorchUNet(nn.Module):

    def __init__(self, classes, f, depth):
      super().__init__()
      self.down = nn.ModuleList(block(3 if i == 0 else f * 2**(i - 1), f * 2**i)
                                for i in range(depth))
      self.bottleneck = block(f * 2**(depth - 1), f * 2**depth)
      self.upconv = nn.ModuleList(nn.ConvTranspose2d(f * 2**(i + 1), f * 2**i, 2, 2)
                                  for i in range(depth))
      self.up = nn.ModuleList(block(f * 2**(i + 1), f * 2**i) for i in range(depth))
      self.head = nn.Conv2d(f, classes, 1)

    def forward(self, x):
      skips = []
      for d in self.down:
        x = d(x)
        skips.append(x)
        x = nn.functional.max_pool2d(x, 2)
      x = self.bottleneck(x)
      for i in reversed(range(len(self.up))):
        x = self.up[i](torch.cat([skips[i], self.upconv[i](x)], 1))
      return self.head(x)

  torch.manual_seed(0)
  model = TorchUNet(args.classes, args.features, args.depth)
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  x = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() - mean) / std
  y = torch.from_numpy(masks).long()
  loss_fn = nn.CrossEntropyLoss(ignore_index=255)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss

  for _ in range(args.warmup + 1):
    step()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    step()
  return n_params, (time.perf_counter() - t0) / args.steps, torch.get_num_threads()


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--features", type=int, default=32)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--classes", type=int, default=5)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  images = rng.random((args.batch, args.size, args.size, 3), dtype=np.float32)
  masks = rng.integers(0, args.classes, (args.batch, args.size, args.size)).astype(np.int32)
  print(f"UNet features={args.features} depth={args.depth}, batch {args.batch} x "
        f"{args.size}x{args.size}, {args.classes} classes; jax {jax.__version__} on "
        f"{jax.devices()[0].platform} x{jax.device_count()}")
  n_jax, compile_s, t_jax = bench_jax(args, images, masks)
  print(f"jaxseg : {n_jax:,} params, compile {compile_s:.1f} s, step {1000 * t_jax:.0f} ms, "
        f"{args.batch / t_jax:.1f} images/s")
  if args.no_torch:
    return
  import torch
  n_torch, t_torch, threads = bench_torch(args, images, masks)
  print(f"PyTorch: {n_torch:,} params, step {1000 * t_torch:.0f} ms, {args.batch / t_torch:.1f} "
        f"images/s (torch {torch.__version__}, {threads} threads)")
  print(f"ratio jaxseg/PyTorch throughput: {t_torch / t_jax:.2f}x"
        + ("" if n_jax == n_torch else "  (WARNING: parameter counts differ)"))


if __name__ == "__main__":
  main()
