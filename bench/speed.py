"""Train and inference speed of every registered model, jaxseg vs its PyTorch twin, in one run.

Every case of ``bench/twins.py``'s ``CASES`` (a registered model name they miss runs with its
defaults, with a note) plus one Mask R-CNN case. Each case runs in two subprocesses, one after
the other, never concurrently: ``--worker jax`` then ``--worker torch``; each prints one JSON
line on stdout that this (parent) process parses, so peak memory is per model and per side.

jaxseg side: ``jaxseg.models.build(name, num_classes=--classes, **kwargs)``,
``jaxseg.train.create_train_state`` with ``optax.sgd(1e-3, momentum=0.9)``, the library's own
``jaxseg.train.make_train_step(jaxseg.losses.cross_entropy, aux_weight=--aux-weight)`` (forward
in train mode, cross-entropy plus aux-weight x that of every auxiliary head, backward, update,
state donated, batch validated) on a state replicated and a batch sharded over the mesh as the
trainer does. Inference: ``jaxseg.train.make_predict_step`` (a jitted eval-mode
``model.apply`` returning the logits, images sharded on the mesh), what research code and
torch's ``model.eval()`` forward compare to. The batch is put on the devices once: data loading
is not in the step figures (the loader has its own figure, below).

PyTorch side: ``twins.twin(name, kwargs, num_classes)`` (NCHW input normalised with
``jaxseg.models.layers.IMAGENET_MEAN/STD``, as jaxseg normalises inside its models), train
mode, ``torch.optim.SGD`` with the same lr and momentum, ``CrossEntropyLoss(ignore_index=255)``
plus aux-weight x the cross-entropy of every aux head, backward, step; inference with
``model.eval()`` under ``torch.inference_mode()``. ``torch.set_num_threads(T)`` with T the cores
JAX's CPU client uses (``len(os.sched_getaffinity(0))``). Both sides get the same images and
labels (``np.random.RandomState(0)``). On GPU (jax on gpu and torch.cuda available) torch runs
on cuda.

Timing, each side: compile time = the first call (timed, waited for) minus the steady median;
one more warm-up call; then the median of ``--steps`` timed calls, each waited for
(``block_until_ready`` / ``torch.cuda.synchronize``); images/s = batch / median. Peak memory:
the worker's peak RSS on CPU (``VmHWM``: ``ru_maxrss`` would carry this parent's own peak
into the worker), which includes the imported libraries (``rss_imports_mb`` in the JSON is
the peak right after the imports); on GPU the device's
``peak_bytes_in_use`` (jax, device 0) and ``torch.cuda.max_memory_allocated``.
``--dtype bfloat16`` passes ``dtype=jnp.bfloat16`` to the jaxseg builder (a row whose model
does not take it, or still computes in float32, says so instead of giving figures) and runs
torch's forward and loss under ``torch.autocast(dtype=torch.bfloat16)``.

Mask R-CNN (case ``maskrcnn``) reuses ``bench/maskrcnn.py``'s ``make_batch``, ``bench_jax`` and
``bench_torch`` (torchvision ``maskrcnn_resnet50_fpn``, FrozenBatchNorm, same images/targets),
at ``--maskrcnn-size`` (default 256) so the full run stays affordable; always float32, torch on
CPU. The data loader figure: batches/s of ``jaxseg.data.train_batches`` on the embedded
``shapes`` dataset at ``--batch`` and ``--size`` crops (20 batches after 2 warm-ups), next to
every case's train steps/s: a case whose steps/s exceed it would be loader-bound in training.

Output: a header (machine, CPU, cores, versions, backends, threads, settings, load average),
a markdown table with the ratios jaxseg/torch (images/s: above 1 jaxseg is faster; memory:
below 1 jaxseg uses less; ``*`` where parameter counts or aux heads differ), the load
average after and the loader figure; progress on stderr; ``--json PATH`` writes every figure
plus machine, versions, load averages, argv, git commit and date. Timings on a shared machine
are noisy (the load average after each row is in the table): compare ratios from an idle one.

Default run (every case, 64x64, batch 2, 12 classes, float32): 29 minutes with ``--steps 3``
on the idle 2-core development machine (2026-12-04). ``--models`` cuts it down:

  python bench/speed.py [--models unet,segnet,deeplabv3plus/mobilenet_v2,maskrcnn]
      [--size 64] [--batch 2] [--steps 5] [--classes 12] [--aux-weight 0.4] [--no-torch]
      [--dtype float32|bfloat16] [--host-devices N] [--maskrcnn-size 256] [--json PATH]
      [--timeout 900]
"""
import argparse
import ast
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCH_DIR not in sys.path:
  sys.path.insert(0, BENCH_DIR)  # twins.py, maskrcnn.py

SGD_LR, SGD_MOMENTUM = 1e-3, 0.9
IGNORE_INDEX = 255
MASKRCNN = "maskrcnn"
LOADER_WARMUP, LOADER_BATCHES = 2, 20
INFO_TIMEOUT_S = 600


def label(name, kwargs):
  """The case label, ``name/value...`` (as ``--models`` takes it)."""
  return "/".join([name] + [str(v) for v in kwargs.values()])


def usable_cores():
  return len(os.sched_getaffinity(0))


def peak_rss_mb():
  """Peak resident set size of this process's own address space (``VmHWM``), MB.

  Not ``ru_maxrss`` alone: Linux carries the parent's peak across fork + exec into it, so a
  worker spawned by this parent (which holds torch and jax) would report at least the
  parent's size. ``ru_maxrss`` is the fallback where ``/proc`` is missing.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_timing(fn, steps):
  """(first call s, steady median s): the first call, one warm-up, median of `steps` calls."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  fn()  # warm-up, not timed
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def semantic_data(args):
  """Images float32 [B,S,S,3] in [0,1] and labels int32 [B,S,S], the same in every worker."""
  import numpy as np
  rng = np.random.RandomState(0)
  images = rng.uniform(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  labels = rng.randint(0, args.classes, size=(args.batch, args.size, args.size)).astype(np.int32)
  return images, labels


def maskrcnn_namespace(args):
  """The ``args`` that bench/maskrcnn.py's functions read."""
  return argparse.Namespace(classes=args.classes, backbone=args.maskrcnn_backbone,
                            steps=args.steps, batch=args.batch, size=args.maskrcnn_size,
                            instances=args.instances)


def maskrcnn_data(args):
  import numpy as np
  import maskrcnn as maskrcnn_bench
  return maskrcnn_bench.make_batch(np.random.RandomState(0), args.batch, args.maskrcnn_size,
                                   args.instances, args.classes)


class NotWired(Exception):
  """The requested configuration is not supported by this side (reported, not a crash)."""


# ---------------------------------------------------------------------------------------------
# jaxseg worker
# ---------------------------------------------------------------------------------------------

def jax_peak_mb(jax):
  """Device 0's peak bytes in use (GPU/TPU), or None where the backend does not report it."""
  stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def jax_memory(jax, out):
  out["peak_rss_mb"] = peak_rss_mb()
  device_mb = jax_peak_mb(jax)
  out["peak_device_mb"] = device_mb
  out["peak_mb"] = device_mb if device_mb is not None else out["peak_rss_mb"]
  out["peak_kind"] = "device" if device_mb is not None else "rss"


def jax_worker(args, name, kwargs):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import jaxseg
  out = {"rss_imports_mb": peak_rss_mb(), "platform": jax.devices()[0].platform,
         "devices": jax.device_count()}
  if name == MASKRCNN:
    import maskrcnn as maskrcnn_bench
    batch = maskrcnn_data(args)
    result = maskrcnn_bench.bench_jax(maskrcnn_namespace(args), batch)
    out.update(params=result["params"], train_compile_s=result["train_compile_s"],
               train_ips=result["train_ips"], infer_compile_s=result["infer_compile_s"],
               infer_ips=result["infer_ips"], aux=False, dtype="float32")
    jax_memory(jax, out)
    return out

  images, labels = semantic_data(args)
  build_kwargs = dict(kwargs)
  if args.dtype == "bfloat16":
    build_kwargs["dtype"] = jnp.bfloat16
  try:
    model = jaxseg.models.build(name, num_classes=args.classes, **build_kwargs)
  except TypeError as e:
    if args.dtype == "bfloat16":
      raise NotWired(f"bfloat16 not wired in jaxseg for {name}: its builder does not take "
                     f"dtype ({e})") from None
    raise
  out["dtype"] = args.dtype
  tx = optax.sgd(SGD_LR, momentum=SGD_MOMENTUM)
  state = jaxseg.train.create_train_state(jax.random.key(0), model, tx, images)
  out["params"] = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
  step = jaxseg.train.make_train_step(jaxseg.losses.cross_entropy, aux_weight=args.aux_weight)
  predict = jaxseg.train.make_predict_step(mesh=step.mesh)
  batch = jaxseg.train.shard_batch({"image": images, "mask": labels}, step.mesh)
  if args.dtype == "bfloat16":
    # A builder may take dtype and still compute in float32 somewhere; look at the program.
    text = predict.jitted.lower(state, batch["image"]).as_text()
    if "bf16" not in text:
      raise NotWired(f"bfloat16 not wired in jaxseg for {name}: the builder takes dtype but "
                     "the lowered inference program has no bf16 operation")
  holder = {"state": jaxseg.train.replicate_on_mesh(state, step.mesh), "i": 0, "metrics": None}
  del state

  def train_once():
    holder["i"] += 1
    holder["state"], holder["metrics"] = step(holder["state"], batch,
                                              jax.random.key(holder["i"]))
    jax.block_until_ready((holder["state"], holder["metrics"]))

  first, steady = median_timing(train_once, args.steps)
  metrics = holder["metrics"]
  out.update(train_first_s=first, train_step_s=steady, train_compile_s=first - steady,
             train_ips=args.batch / steady, train_jits=step.jitted._cache_size(),
             loss=float(metrics["loss"]), aux="aux_loss" in metrics)
  out["train_peak_mb"] = jax_peak_mb(jax) or peak_rss_mb()

  state = holder["state"]
  first, steady = median_timing(lambda: jax.block_until_ready(predict(state, batch["image"])),
                                args.steps)
  out.update(infer_first_s=first, infer_step_s=steady, infer_compile_s=first - steady,
             infer_ips=args.batch / steady)
  jax_memory(jax, out)
  return out


# ---------------------------------------------------------------------------------------------
# PyTorch worker
# ---------------------------------------------------------------------------------------------

def torch_worker(args, name, kwargs):
  import numpy as np
  import torch
  torch.set_num_threads(args.threads)
  if name == MASKRCNN:
    import maskrcnn as maskrcnn_bench
    out = {"rss_imports_mb": peak_rss_mb(), "threads": torch.get_num_threads(), "device": "cpu",
           "dtype": "float32"}
    result = maskrcnn_bench.bench_torch(maskrcnn_namespace(args), maskrcnn_data(args))
    out.update(twin=True, params=result["params"], train_ips=result["train_ips"],
               infer_ips=result["infer_ips"], aux=False, peak_rss_mb=peak_rss_mb(),
               peak_device_mb=None, peak_mb=peak_rss_mb(), peak_kind="rss")
    return out

  import twins
  out = {"rss_imports_mb": peak_rss_mb(), "threads": torch.get_num_threads()}
  device = "cuda" if args.jax_platform == "gpu" and torch.cuda.is_available() else "cpu"
  out["device"] = device
  torch.manual_seed(0)
  model = twins.twin(name, kwargs, args.classes)
  if model is None:
    out["twin"] = False
    return out
  out["twin"] = True
  model = model.to(device).train()
  out["params"] = sum(p.numel() for p in model.parameters())
  opt = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM)
  images, labels = semantic_data(args)
  mean, std = (np.asarray(v, np.float32) for v in args.norm)
  x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy()).to(device)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
  bf16 = args.dtype == "bfloat16"
  out["dtype"] = "bfloat16 (autocast)" if bf16 else "float32"

  def autocast():
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  def split(output):
    """(main logits [N,C,H,W], list of aux logits) of the twin's output."""
    if isinstance(output, dict):
      aux = output.get("aux")
      aux = [] if aux is None else list(aux) if isinstance(aux, (list, tuple)) else [aux]
      return output["out"], aux
    return output, []

  def check_shape(logits):
    want = (args.batch, args.classes, args.size, args.size)
    if tuple(logits.shape) != want:
      raise ValueError(f"twin of {name} returned logits of shape {tuple(logits.shape)}; "
                       f"expected [N,C,H,W] = {want}")

  seen = {}

  def train_once():
    opt.zero_grad(set_to_none=True)
    with autocast():
      main, aux = split(model(x))
      check_shape(main)
      loss = ce(main, y)
      if aux:
        loss = loss + args.aux_weight * sum(ce(a, y) for a in aux)
    loss.backward()
    opt.step()
    sync()
    seen.update(loss=float(loss), aux=bool(aux))

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  first, steady = median_timing(train_once, args.steps)
  out.update(train_first_s=first, train_step_s=steady, train_ips=args.batch / steady,
             loss=seen["loss"], aux=seen["aux"])
  out["train_peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                          else peak_rss_mb())
  model.eval()

  def infer_once():
    with torch.inference_mode(), autocast():
      split(model(x))
    sync()

  first, steady = median_timing(infer_once, args.steps)
  out.update(infer_first_s=first, infer_step_s=steady, infer_ips=args.batch / steady)
  out["peak_rss_mb"] = peak_rss_mb()
  out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
  out["peak_mb"] = out["peak_device_mb"] if device == "cuda" else out["peak_rss_mb"]
  out["peak_kind"] = "device" if device == "cuda" else "rss"
  return out


# ---------------------------------------------------------------------------------------------
# Info worker: versions, backends and the data loader figure
# ---------------------------------------------------------------------------------------------

def info_worker(args):
  import jax
  import jaxseg
  out = {"jax": jax.__version__, "jax_platform": jax.devices()[0].platform,
         "jax_devices": jax.device_count(), "jax_device_kind": jax.devices()[0].device_kind}
  try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.cuda.is_available())
  except ImportError:
    out.update(torch=None, torch_cuda=False)
  import flax
  import optax
  out.update(flax=flax.__version__, optax=optax.__version__)
  source = jaxseg.data.load("shapes", "train")
  batches = jaxseg.data.train_batches(source, batch_size=args.batch,
                                      crop_size=(args.size, args.size))
  for _ in range(LOADER_WARMUP):
    next(batches)
  t0 = time.perf_counter()
  for _ in range(LOADER_BATCHES):
    next(batches)
  elapsed = time.perf_counter() - t0
  out["loader"] = {"dataset": "shapes/train", "batch": args.batch, "crop": args.size,
                   "batches": LOADER_BATCHES, "warmup": LOADER_WARMUP,
                   "batches_per_s": LOADER_BATCHES / elapsed,
                   "images_per_s": LOADER_BATCHES * args.batch / elapsed}
  return out


def run_worker(args):
  """Worker entry: run one side of one case; print one JSON line on stdout."""
  name, kwargs = args.case.split("/")[0], ast.literal_eval(args.kwargs)
  t0 = time.perf_counter()
  try:
    if args.worker == "info":
      result = info_worker(args)
    elif args.worker == "jax":
      result = jax_worker(args, name, kwargs)
    else:
      result = torch_worker(args, name, kwargs)
  except NotWired as e:
    result = {"error": str(e), "not_wired": True}
  except Exception as e:  # reported as the row's error; the parent's run goes on
    import traceback
    traceback.print_exc()
    result = {"error": f"{type(e).__name__}: {e}"}
  result.update(worker=args.worker, case=args.case, wall_s=time.perf_counter() - t0)
  sys.stdout.flush()
  print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------

def all_cases():
  """(name, kwargs, note) of every case: twins.CASES, then missing registered names, Mask R-CNN."""
  import twins
  import jaxseg
  cases = [(n, dict(k), "") for n, k in twins.CASES if n != MASKRCNN]
  covered = {n for n, _, _ in cases}
  for name in jaxseg.models.names():
    if name != MASKRCNN and name not in covered:
      cases.append((name, {}, "not in twins.CASES: run with its defaults"))
  cases.append((MASKRCNN, {}, ""))
  return cases


def select_cases(parser, cases, models):
  if not models:
    return cases
  wanted = [m.strip() for m in models.split(",") if m.strip()]
  known = {n for n, _, _ in cases} | {label(n, k) for n, k, _ in cases}
  unknown = [m for m in wanted if m not in known]
  if unknown:
    parser.error(f"unknown model(s) {', '.join(unknown)}; cases: "
                 f"{', '.join(label(n, k) for n, k, _ in cases)}")
  return [c for c in cases if c[0] in wanted or label(c[0], c[1]) in wanted]


def worker_argv(args, side, case_label, kwargs, jax_platform):
  argv = [sys.executable, os.path.abspath(__file__), "--worker", side, "--case", case_label,
          "--kwargs", repr(kwargs), "--size", str(args.size), "--batch", str(args.batch),
          "--steps", str(args.steps), "--classes", str(args.classes),
          "--aux-weight", str(args.aux_weight), "--dtype", args.dtype,
          "--maskrcnn-size", str(args.maskrcnn_size),
          "--maskrcnn-backbone", args.maskrcnn_backbone, "--instances", str(args.instances),
          "--threads", str(args.threads), "--jax-platform", jax_platform,
          "--norm", json.dumps(args.norm)]
  return argv


def jax_env(args):
  env = dict(os.environ)
  if args.host_devices:
    flag = f"--xla_force_host_platform_device_count={args.host_devices}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
  return env


def spawn(args, side, case_label, kwargs, jax_platform="cpu", timeout=None):
  """Run one worker; its JSON dict, or {"error": ...} when it failed or timed out."""
  cmd = worker_argv(args, side, case_label, kwargs, jax_platform)
  env = jax_env(args) if side in ("jax", "info") else dict(os.environ)
  timeout = args.timeout if timeout is None else timeout
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:g} s", "worker": side}
  result = None
  for line in reversed(proc.stdout.splitlines()):
    try:
      parsed = json.loads(line)
    except ValueError:
      continue
    if isinstance(parsed, dict) and parsed.get("worker") == side:
      result = parsed
      break
  if result is None:
    tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
    result = {"error": f"worker exited with status {proc.returncode}: {tail[0][:300]}"}
  if "error" in result and not result.get("not_wired"):
    print(f"--- {side} worker of {case_label} failed; stderr tail:\n"
          + "\n".join(proc.stderr.strip().splitlines()[-15:]), file=sys.stderr, flush=True)
  return result


def cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def git_commit():
  try:
    head = subprocess.run(["git", "-C", BENCH_DIR, "rev-parse", "HEAD"], capture_output=True,
                          text=True, timeout=10)
    dirty = subprocess.run(["git", "-C", BENCH_DIR, "status", "--porcelain"],
                           capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None, None
  if head.returncode:
    return None, None
  return head.stdout.strip(), bool(dirty.stdout.strip()) if not dirty.returncode else None


def fmt(value, spec, missing="-"):
  return missing if value is None else format(value, spec)


def ratio(a, b):
  return a / b if a is not None and b else None


def build_row(name, kwargs, note, j, t, args):
  """The row's figures: both sides' dicts, ratios, mismatch flag, notes."""
  case_label = label(name, kwargs)
  notes = [note] if note else []
  if name == MASKRCNN:
    case_label = f"{MASKRCNN}/{args.maskrcnn_backbone} @{args.maskrcnn_size}px"
    if args.dtype != "float32":
      notes.append("float32 only (bench/maskrcnn.py builds float32)")
    if t and j.get("platform") == "gpu":
      notes.append("torch on CPU (bench/maskrcnn.py's torch side)")
  j_ok = "error" not in j
  t_ok = t is not None and "error" not in t and t.get("twin")
  mismatch = bool(j_ok and t_ok and (j["params"] != t["params"] or j["aux"] != t["aux"]))
  both = j_ok and t_ok
  row = {"label": case_label, "name": name, "kwargs": repr(kwargs), "notes": notes, "jax": j,
         "torch": t, "mismatch": mismatch,
         "train_ratio": ratio(j.get("train_ips"), t.get("train_ips")) if both else None,
         "infer_ratio": ratio(j.get("infer_ips"), t.get("infer_ips")) if both else None,
         "mem_ratio": ratio(j.get("peak_mb"), t.get("peak_mb")) if both else None,
         "load": os.getloadavg()[0]}
  return row


COLUMNS = ("model", "params", "torch params", "compile train s", "compile infer s",
           "train img/s", "train steps/s", "torch train img/s", "train ratio", "infer img/s",
           "torch infer img/s", "infer ratio", "peak MB", "torch peak MB", "mem ratio", "load")


def table_cells(row, args):
  j, t = row["jax"], row["torch"] or {}
  star = "*" if row["mismatch"] else ""
  j_err = "error" in j
  # A failed side shows "-" in its cells and says why in the model cell (details below the
  # table), so a row that lacks figures is never mistaken for one with a missing twin.
  flags = []
  if j_err:
    flags.append(f"jaxseg: {args.dtype} not wired" if j.get("not_wired") else "jaxseg failed")
  if "error" in t:
    flags.append("torch failed")
  t_cell = "-" if "error" in t or not t.get("twin") else None

  def jcell(key, spec):
    return "-" if j_err else fmt(j.get(key), spec)

  def tcell(key, spec):
    return t_cell if t_cell else fmt(t.get(key), spec)

  def rcell(key):
    return fmt(row[key], ".2f") + (star if row[key] is not None else "")

  steps_s = None if j_err else j["train_ips"] / (args.batch)
  model = row["label"] + (f" [{'; '.join(flags)}]" if flags else "")
  return [model, jcell("params", ","), tcell("params", ","),
          jcell("train_compile_s", ".1f"), jcell("infer_compile_s", ".1f"),
          jcell("train_ips", ".3g"), "-" if j_err else fmt(steps_s, ".3g"),
          tcell("train_ips", ".3g"), rcell("train_ratio"), jcell("infer_ips", ".3g"),
          tcell("infer_ips", ".3g"), rcell("infer_ratio"), jcell("peak_mb", ",.0f"),
          tcell("peak_mb", ",.0f"), rcell("mem_ratio"), f"{row['load']:.1f}"]


def print_table(rows, args):
  cells = [list(COLUMNS)] + [table_cells(r, args) for r in rows]
  widths = [max(len(str(c[i])) for c in cells) for i in range(len(COLUMNS))]

  def line(values):
    return "| " + " | ".join(
        str(v).ljust(w) if i == 0 else str(v).rjust(w)
        for i, (v, w) in enumerate(zip(values, widths))) + " |"

  print(line(cells[0]))
  print("|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2))
                       for i, w in enumerate(widths)) + "|")
  for values in cells[1:]:
    print(line(values))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="",
                      help="comma-separated model names or case labels (name/value...); "
                           "default: every case, Mask R-CNN included")
  parser.add_argument("--size", type=int, default=64, help="image side, semantic cases")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5, help="timed calls (median)")
  parser.add_argument("--classes", type=int, default=12)
  parser.add_argument("--aux-weight", type=float, default=0.4,
                      help="weight of the auxiliary-head losses, both sides")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--host-devices", type=int, default=0,
                      help="jaxseg worker only: XLA host devices the batch is sharded over")
  parser.add_argument("--maskrcnn-size", type=int, default=256)
  parser.add_argument("--maskrcnn-backbone", default="resnet50",
                      choices=("resnet18", "resnet34", "resnet50", "resnet101"))
  parser.add_argument("--instances", type=int, default=4, help="Mask R-CNN instances per image")
  parser.add_argument("--json", metavar="PATH", help="write every figure to PATH")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per worker")
  # Worker-side (set by the parent).
  parser.add_argument("--worker", choices=("jax", "torch", "info"), help=argparse.SUPPRESS)
  parser.add_argument("--case", default="", help=argparse.SUPPRESS)
  parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
  parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--jax-platform", default="cpu", help=argparse.SUPPRESS)
  parser.add_argument("--norm", type=json.loads, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  for key in ("size", "batch", "steps", "classes", "maskrcnn_size", "instances"):
    if getattr(args, key) < 1:
      parser.error(f"--{key.replace('_', '-')} must be >= 1; got {getattr(args, key)}")
  if args.host_devices < 0:
    parser.error(f"--host-devices must be >= 0; got {args.host_devices}")
  if args.host_devices and args.batch % args.host_devices:
    parser.error(f"--batch {args.batch} is not divisible by --host-devices {args.host_devices}")
  if args.timeout <= 0:
    parser.error(f"--timeout must be > 0; got {args.timeout}")
  if args.classes > IGNORE_INDEX:
    parser.error(f"--classes must be < {IGNORE_INDEX} (the ignore label); got {args.classes}")

  if args.worker:
    run_worker(args)
    return

  from jaxseg.models import layers
  args.norm = [list(layers.IMAGENET_MEAN), list(layers.IMAGENET_STD)]
  args.threads = usable_cores()
  cases = select_cases(parser, all_cases(), args.models)

  load_before = os.getloadavg()
  print("... versions, backends and the data loader", file=sys.stderr, flush=True)
  # Not --timeout: a first run prepares the shapes dataset (tens of seconds).
  info = spawn(args, "info", "info", {}, timeout=max(args.timeout, INFO_TIMEOUT_S))
  if "error" in info:
    raise SystemExit(f"the info worker failed: {info['error']}")
  jax_platform = info["jax_platform"]
  torch_device = "cuda" if jax_platform == "gpu" and info["torch_cuda"] else "cpu"
  commit, dirty = git_commit()
  header = {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "argv": sys.argv, "git_commit": commit, "git_dirty": dirty,
      "machine": {"platform": platform.platform(), "cpu": cpu_model(),
                  "cpus": os.cpu_count(), "usable_cores": usable_cores(),
                  "python": platform.python_version()},
      "versions": {k: info.get(k) for k in ("jax", "flax", "optax", "torch")},
      "jax_backend": {"platform": jax_platform, "devices": info["jax_devices"],
                      "kind": info["jax_device_kind"]},
      "torch_device": None if args.no_torch else torch_device, "torch_threads": args.threads,
      "settings": {k: v for k, v in vars(args).items()
                   if k not in ("worker", "case", "kwargs", "jax_platform")},
      "load_before": load_before, "loader": info["loader"]}
  loader = info["loader"]
  print(f"machine: {header['machine']['platform']}, CPU {header['machine']['cpu']}, "
        f"{os.cpu_count()} CPUs ({usable_cores()} usable); python {platform.python_version()}")
  print(f"jax {info['jax']} on {jax_platform} x{info['jax_devices']} "
        f"({info['jax_device_kind']}); "
        + ("torch not run (--no-torch)" if args.no_torch else
           f"torch {info['torch']} on {torch_device}, {args.threads} threads (= the cores JAX's "
           "CPU client uses)")
        + f"; commit {commit or 'unknown'}{' (dirty)' if dirty else ''}")
  print(f"dtype {args.dtype}"
        + (" (jaxseg: builder dtype=bfloat16; torch: autocast bfloat16)"
           if args.dtype == "bfloat16" else "")
        + f"; images {args.batch}x{args.size}x{args.size} (Mask R-CNN {args.batch}x"
        f"{args.maskrcnn_size}x{args.maskrcnn_size}), {args.classes} classes, aux weight "
        f"{args.aux_weight}, SGD-momentum lr {SGD_LR}; compile = first call - median; "
        f"median of {args.steps} timed call(s) after 1 warm-up"
        + (f"; jaxseg on {args.host_devices} XLA host devices" if args.host_devices else ""))
  print(f"data loader: {loader['batches_per_s']:.1f} batches/s of train_batches(shapes, batch "
        f"{args.batch}, crop {args.size}x{args.size})")
  print("load average before: " + " ".join(f"{v:.2f}" for v in load_before), flush=True)

  rows = []
  for i, (name, kwargs, note) in enumerate(cases, 1):
    case_label = label(name, kwargs)
    print(f"[{i}/{len(cases)}] {case_label}: jaxseg ...", file=sys.stderr, flush=True)
    j = spawn(args, "jax", case_label, kwargs, jax_platform)
    msg = j["error"] if "error" in j else (f"train {j['train_ips']:.2f} img/s, infer "
                                            f"{j['infer_ips']:.2f} img/s")
    print(f"[{i}/{len(cases)}] {case_label}: jaxseg {msg}", file=sys.stderr, flush=True)
    t = None
    if not args.no_torch:
      t = spawn(args, "torch", case_label, kwargs, jax_platform)
      msg = (t["error"] if "error" in t else "no twin" if not t.get("twin") else
             f"train {t['train_ips']:.2f} img/s, infer {t['infer_ips']:.2f} img/s")
      print(f"[{i}/{len(cases)}] {case_label}: torch {msg}", file=sys.stderr, flush=True)
    rows.append(build_row(name, kwargs, note, j, t, args))

  load_after = os.getloadavg()
  print()
  print_table(rows, args)
  print()
  print("load average after: " + " ".join(f"{v:.2f}" for v in load_after))
  print(f"data loader: {loader['batches_per_s']:.1f} batches/s (train steps/s above it: "
        "training would be loader-bound)")
  kind = "device memory" if jax_platform != "cpu" else "peak RSS of the worker process"
  print(f"peak MB: {kind}; ratios are jaxseg/torch (img/s: >1 jaxseg faster; memory: <1 "
        "jaxseg smaller)")
  for side, name in (("jax", "jaxseg"), ("torch", "torch")):
    imports = [r[side]["rss_imports_mb"] for r in rows
               if r[side] and "rss_imports_mb" in r[side]]
    if imports and jax_platform == "cpu":
      print(f"{name} worker RSS after its imports alone: {statistics.median(imports):,.0f} MB "
            "(median over rows; part of its peak MB)")
  if any(r["mismatch"] for r in rows):
    print("*: parameter count or aux head differs between jaxseg and the PyTorch twin")
  for r in rows:
    for side in ("jax", "torch"):
      d = r[side] or {}
      if "error" in d:
        print(f"{r['label']} ({'jaxseg' if side == 'jax' else 'torch'}): {d['error']}")
    for note in r["notes"]:
      print(f"{r['label']}: {note}")

  if args.json:
    header.update(load_after=load_after, rows=rows)
    with open(args.json, "w") as f:
      json.dump(header, f, indent=1)
    print(f"figures written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
  main()
