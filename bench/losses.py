"""Cost of the weak-supervision losses (jit, forward + backward) against a UNet train step.

For each size and class count, times ``jax.value_and_grad(loss)`` of every loss on random
logits and a synthetic batch (image of flat colour regions, scribbles, boxes, tags), then one
train step of a small UNet (``jaxseg.models.build("unet", features=..., depth=4)``, SGD,
cross-entropy) on the same batch, and prints each loss's time as a fraction of that step.
Also prints the bilateral grid's error against the exact dense kernel on 16x16 and 32x32.

  python bench/losses.py [--batch 8] [--sizes 64,128] [--classes 5,12] [--repeats 5]
"""
import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jaxseg  # noqa: E402
from jaxseg import losses  # noqa: E402

LOSSES = [
    ("cross_entropy", {}),
    ("crf_pairwise dense grid", dict(name="crf_pairwise")),
    ("crf_pairwise dense grid scale=0.5", dict(name="crf_pairwise", scale=0.5)),
    ("crf_pairwise local r=5", dict(name="crf_pairwise", kernel="local", radius=5)),
    ("scribble_loss (defaults)", dict(name="scribble_loss")),
    ("scribble_loss dense grid, unbalanced",
     dict(name="scribble_loss", kernel="dense", balance="none", pairwise_weight=1e-3)),
    ("scribble_em_loss (5 mean-field it.)", dict(name="scribble_em_loss")),
    ("image_level_loss newton /8", dict(name="image_level_loss")),
    ("image_level_loss pgd /8", dict(name="image_level_loss", solver="pgd")),
    ("image_level_loss em_adapt /8", dict(name="image_level_loss", mode="em_adapt")),
    ("box_loss em_fixed", dict(name="box_loss", mode="em_fixed")),
    ("box_loss em_adapt", dict(name="box_loss", mode="em_adapt")),
    ("box_loss bbox_seg (CE on precomputed box_seg)", dict(name="box_loss", mode="bbox_seg")),
    ("box_loss bbox_soft", dict(name="box_loss", mode="bbox_soft")),
    ("box_loss bbox_soft + local CRF r=5", dict(name="box_loss", mode="bbox_soft",
                                                crf_weight=0.2,
                                                crf_kwargs=dict(kernel="local", radius=5))),
    ("box_loss boxinst", dict(name="box_loss", mode="boxinst")),
]


def make_batch(rng, n, size, c):
  image = np.zeros((n, size, size, 3), np.float32)
  yy, xx = np.mgrid[:size, :size]
  mask = np.zeros((n, size, size), np.int32)
  for i in range(n):
    region = (xx > size * rng.uniform(.2, .8)).astype(int) + 2 * (yy > size * rng.uniform(.2, .8))
    colours = rng.uniform(0, 1, (4, 3))
    image[i] = colours[region]
    mask[i] = rng.integers(0, c, 4)[region]
  image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1).astype(np.float32)
  scribble = np.where(rng.random(mask.shape) < 0.03, mask, 255).astype(np.int32)
  boxes = np.zeros((n, 8, 4), np.float32)
  classes = np.full((n, 8), -1, np.int32)
  for i in range(n):
    for m in range(4):
      y0, x0 = rng.integers(0, size // 2, 2)
      bh, bw = rng.integers(size // 8, size // 2, 2)
      boxes[i, m] = [y0, x0, y0 + bh, x0 + bw]
      classes[i, m] = rng.integers(1, c)
  tags = np.zeros((n, c), np.float32)
  tags[:, 0] = 1
  for i in range(n):
    tags[i, classes[i][classes[i] >= 0]] = 1
  # box_seg is precomputed once per image (weak_labels.box_seg_from_boxes); its cost is the
  # data side's, so the loss is timed on a stand-in label map.
  return dict(image=image, mask=mask, scribble=scribble, boxes=boxes, box_classes=classes,
              tags=tags, box_seg=mask)


def timed(fn, *args, repeats):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return compile_s, (time.perf_counter() - t0) / repeats


def unet_step_time(batch, c, features, repeats):
  try:
    model = jaxseg.models.build("unet", num_classes=c, features=features, depth=4)
  except Exception as e:  # noqa: BLE001 - the bench still reports the losses alone
    return None, f"unet not available ({type(e).__name__}: {e})"
  state = jaxseg.train.create_train_state(jax.random.key(0), model, optax.sgd(1e-2, momentum=0.9),
                                          batch["image"][:1])
  step = jaxseg.train.make_train_step(losses.cross_entropy)
  if hasattr(jaxseg.train, "replicate"):
    state = jaxseg.train.replicate_on_mesh(state, step.mesh)
  b = {"image": batch["image"], "mask": batch["mask"]}
  state, m = step(state, b, jax.random.key(0))
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(repeats):
    state, m = step(state, b, jax.random.key(i))
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / repeats, f"UNet features={features} depth=4, SGD, CE"


def grid_accuracy():
  rng = np.random.default_rng(0)
  print("\nbilateral grid vs exact dense kernel (2 images of 4 flat colour regions + noise, "
        "random logits, C=4):")
  print(f"{'size':>5} {'sigma_xy':>8} {'sigma_rgb':>9} {'energy rel. err':>16} {'grad cosine':>12}")
  for size in (16, 32):
    batch = make_batch(rng, 2, size, 4)
    logits = jnp.asarray(rng.normal(0, 2, (2, size, size, 4)).astype(np.float32))
    for sxy, srgb in ((100.0, 15.0), (10.0, 15.0), (5.0, 30.0)):
      def vg(method):
        fn = functools.partial(losses.crf_pairwise, method=method, sigma_xy=sxy, sigma_rgb=srgb)
        return jax.jit(jax.value_and_grad(fn))(logits, {"image": batch["image"]})
      (ve, ge), (vf, gf) = vg("exact"), vg("grid")
      cos = float(jnp.sum(ge * gf) / (jnp.linalg.norm(ge) * jnp.linalg.norm(gf)))
      err = abs(float(vf) / float(ve) - 1)
      print(f"{size:>5} {sxy:>8.0f} {srgb:>9.0f} {err:>16.3f} {cos:>12.4f}")


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--sizes", default="64,128")
  p.add_argument("--classes", default="5,12")
  p.add_argument("--features", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--skip-accuracy", action="store_true")
  args = p.parse_args()
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}) x{jax.device_count()}")
  rng = np.random.default_rng(0)
  for size in (int(s) for s in args.sizes.split(",")):
    for c in (int(k) for k in args.classes.split(",")):
      batch = {k: jnp.asarray(v) for k, v in make_batch(rng, args.batch, size, c).items()}
      logits = jnp.asarray(rng.normal(0, 1, (args.batch, size, size, c)).astype(np.float32))
      step_s, what = unet_step_time(batch, c, args.features, args.repeats)
      print(f"\nbatch {args.batch} x {size}x{size}, C={c}: "
            + (f"train step {1000 * step_s:.1f} ms ({what})" if step_s else what))
      print(f"{'loss (fwd+bwd, jit)':<38} {'compile s':>9} {'ms':>9} {'/ step':>7}")
      for label, kw in LOSSES:
        kw = dict(kw)
        fn = losses.get(kw.pop("name", label), **kw)
        compile_s, t = timed(jax.jit(jax.value_and_grad(fn)), logits, batch, repeats=args.repeats)
        frac = f"{t / step_s:>7.2f}" if step_s else f"{'-':>7}"
        print(f"{label:<38} {compile_s:>9.1f} {1000 * t:>9.1f} {frac}")
  if not args.skip_accuracy:
    grid_accuracy()


if __name__ == "__main__":
  main()
