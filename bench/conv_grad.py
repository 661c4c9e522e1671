"""Convolution gradient on CPU: XLA's own vs ``jaxseg.ops.conv``'s routes, per shape.

For each shape (batch, map, channels, kernel, stride, dilation of convolutions the model zoo
runs at the benchmark's 64 px inputs and UNet's 128 px), the time of one jitted
``jax.vjp`` (forward + input and weight gradients) with:
``xla`` (``lax.conv_general_dilated``'s own gradient), ``dw`` (per-tap matmul weight
gradient), ``dx`` (flipped-kernel input gradient, stride 1) and ``both``; and PyTorch's
``conv2d`` forward + backward on the same data for scale. Routes are timed interleaved
(ABAB...), median of ``--reps``; ``plan`` is what ``jaxseg.ops.conv.gradient_plan`` picks.
``gradient_plan``'s rule was read off this table.

  python bench/conv_grad.py [--reps 7] [--torch-threads N]
"""
import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.ops import conv as conv_ops

SHAPES = [  # (N, H, W, C_in, C_out, k, stride, dilation)
    (4, 128, 128, 32, 32, 3, 1, 1),   # UNet level 0
    (4, 64, 64, 64, 64, 3, 1, 1),
    (4, 16, 16, 256, 256, 3, 1, 1),
    (4, 8, 8, 512, 512, 3, 1, 1),     # UNet bottleneck
    (2, 64, 64, 64, 64, 3, 1, 1),     # VGG conv1 at 64 px
    (2, 16, 16, 256, 256, 3, 1, 1),
    (2, 4, 4, 512, 512, 3, 1, 1),     # VGG conv5
    (2, 16, 16, 64, 64, 3, 1, 1),     # ResNet layer1 at 64 px
    (2, 16, 16, 64, 256, 1, 1, 1),
    (2, 8, 8, 512, 128, 1, 1, 1),
    (2, 8, 8, 128, 128, 3, 1, 1),
    (2, 8, 8, 256, 256, 3, 1, 2),     # ResNet OS8 layer3 (dilated)
    (2, 8, 8, 1024, 256, 1, 1, 1),
    (2, 8, 8, 512, 512, 3, 1, 4),     # ResNet OS8 layer4
    (2, 8, 8, 2048, 256, 3, 1, 12),   # ASPP branch
    (2, 8, 8, 2048, 512, 1, 1, 1),
    (2, 4, 4, 512, 512, 3, 1, 2),     # OS16 layer4
    (2, 2, 2, 512, 512, 3, 1, 1),     # RefineNet-4 at 64 px
    (2, 32, 32, 3, 64, 7, 2, 1),      # ResNet stem
    (2, 16, 16, 128, 128, 3, 2, 1),   # strided 3x3
    (256, 28, 28, 256, 91, 1, 1, 1),  # Mask R-CNN mask_fcn_logits
    (64, 14, 14, 256, 256, 3, 1, 1),  # Mask R-CNN mask head, 32 RoIs x 2 images
]
DN = ("NHWC", "HWIO", "NHWC")
ROUTES = {"xla": None, "dw": (True, False), "dx": (False, True), "both": (True, True)}


def make_fn(route, stride, dilation, pad):
  strides, dil, pads = (stride, stride), (dilation, dilation), ((pad, pad), (pad, pad))
  if route == "xla":
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dil,
                                                     dimension_numbers=DN)
  else:
    cdw, cdx = ROUTES[route]
    conv = lambda x, w: conv_ops._conv(x, w, strides, pads, dil, None, cdw, cdx)

  @jax.jit
  def fn(x, w, g):
    y, vjp = jax.vjp(conv, x, w)
    return y, vjp(g)
  return fn


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)))
  args = p.parse_args()
  import torch
  torch.set_num_threads(args.torch_threads)
  print(f"jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load {os.getloadavg()[0]:.2f}; ms per forward + "
        "backward, median of interleaved reps")
  print("| N,H,W,Cin,Cout,k,s,d | xla | dw | dx | both | torch | plan | plan/xla |")
  print("|---|---|---|---|---|---|---|---|")
  for (n, h, w, cin, cout, k, s, d) in SHAPES:
    pad = d * (k - 1) // 2
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(n, h, w, cin), jnp.float32)
    kern = jnp.asarray(rng.randn(k, k, cin, cout) * 0.05, jnp.float32)
    ho = (h + 2 * pad - d * (k - 1) - 1) // s + 1
    g = jnp.asarray(rng.randn(n, ho, ho if h == w else (w + 2 * pad - d * (k - 1) - 1) // s + 1,
                              cout), jnp.float32)
    routes = [r for r in ROUTES if not (s != 1 and r in ("dx", "both"))]
    fns = {r: make_fn(r, s, d, pad) for r in routes}
    for f in fns.values():
      jax.block_until_ready(f(x, kern, g))
    tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
    tw = torch.tensor(np.asarray(kern).transpose(3, 2, 0, 1), requires_grad=True)
    tg = torch.tensor(np.asarray(g).transpose(0, 3, 1, 2))

    def torch_step():
      y = torch.nn.functional.conv2d(tx, tw, stride=s, padding=pad, dilation=d)
      y.backward(tg)
    torch_step()
    times = {r: [] for r in routes + ["torch"]}
    for _ in range(args.reps):
      for r in routes:
        t0 = time.perf_counter()
        jax.block_until_ready(fns[r](x, kern, g))
        times[r].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      torch_step()
      times["torch"].append(time.perf_counter() - t0)
    ms = {r: 1e3 * statistics.median(v) for r, v in times.items()}
    plan = conv_ops.gradient_plan((n, h, w, cin), (k, k, cin, cout), (s, s), (d, d), "cpu")
    picked = {(False, False): "xla", (True, False): "dw", (False, True): "dx",
              (True, True): "both"}[plan]
    cell = lambda r: f"{ms[r]:.2f}" if r in ms else "-"
    print(f"| {n},{h},{w},{cin},{cout},{k},{s},{d} | {cell('xla')} | {cell('dw')} | "
          f"{cell('dx')} | {cell('both')} | {cell('torch')} | {picked} | "
          f"{ms[picked] / ms['xla']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
