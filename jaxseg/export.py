"""Serialise a trained model with ``jax.export`` (StableHLO) for use without jaxseg.

``export_model(variables, model, image_size=(H, W))`` traces the eval-mode forward pass
``model.apply(variables, images, train=False)`` with the weights closed over, so they are
embedded in the program as constants and the file is self-contained: the side that loads it
needs JAX only, not jaxseg, flax or the model's Python code::

  import jax, numpy as np
  with open("model.jaxexport", "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  logits = exported.call(images)   # images: float32 [B,H,W,3] in [0,1] -> float32 [B,H,W,C]
  labels = np.asarray(logits).argmax(-1)

The exported function takes float32 images [B,H,W,3] in [0,1] and returns float32 logits
[B,H,W,C] (half-precision outputs of a bfloat16 model are cast to float32). The spatial size
(H, W) is fixed at export time; the batch size B is either fixed (``batch_size=N``) or
symbolic (``batch_size=None``: any B >= 1 works with the one file). ``exported.in_avals`` and
``exported.out_avals`` describe the shapes; ``exported.platforms`` lists where it runs (CPU
by default; pass ``platforms=("cpu", "cuda")`` for a file that runs on both).

Mask R-CNN (an instance model whose eval output is a dict of detections) is refused: only
semantic models, whose output is one logits array, are exported.

Writing and reading the file (``exported.serialize()``, ``jax.export.deserialize``) needs the
``flatbuffers`` package on both sides; tracing and calling an ``Exported`` in memory does not.

From a training run (the newest intact checkpoint, or ``--step``)::

  python -m jaxseg.export --workdir runs/unet_shapes --out model.jaxexport [--batch N|symbolic]
"""
import argparse
import dataclasses
import os
import sys
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import fileio
from jaxseg.models import registry
from jaxseg.train import step as step_lib

__all__ = ["export_model", "export_workdir", "save", "load", "PLATFORMS", "main"]

# Platform names jax.export lowers for.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _check_image_size(image_size) -> Tuple[int, int]:
  ok = (isinstance(image_size, (tuple, list)) and len(image_size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
                for s in image_size))
  if not ok:
    raise ValueError(f"image_size must be two positive ints (H, W), got {image_size!r}")
  return int(image_size[0]), int(image_size[1])


def _check_batch_size(batch_size) -> Optional[int]:
  if batch_size is None:
    return None
  if (not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool)
      or batch_size < 1):
    raise ValueError(f"batch_size must be a positive int or None (symbolic), got {batch_size!r}")
  return int(batch_size)


def _check_platforms(platforms) -> Tuple[str, ...]:
  if isinstance(platforms, str):
    platforms = (platforms,)
  try:
    platforms = tuple(platforms)
  except TypeError:
    raise ValueError(f"platforms must be a sequence of names from {PLATFORMS}, "
                     f"got {platforms!r}") from None
  bad = [p for p in platforms if p not in PLATFORMS]
  if not platforms or bad or len(set(platforms)) != len(platforms):
    raise ValueError(f"platforms must be distinct names from {PLATFORMS} (at least one), "
                     f"got {platforms!r}")
  return platforms


def _with_dtype(module: nn.Module, dtype) -> Tuple[nn.Module, bool]:
  """``module`` with every ``dtype`` field (its own and its sub-modules') set to ``dtype``.

  Returns the clone and whether any field was set. Sub-modules that a module creates inside
  ``setup``/``__call__`` take their dtype from the parent's field, so the fields are enough.
  """
  updates, found = {}, False
  for field in dataclasses.fields(module):
    if field.name in ("parent", "name"):
      continue
    value = getattr(module, field.name)
    if field.name == "dtype":
      updates["dtype"], found = dtype, True
    elif isinstance(value, nn.Module):
      updates[field.name], sub = _with_dtype(value, dtype)
      found = found or sub
  return module.clone(**updates), found


def export_model(variables: Mapping[str, Any], model: nn.Module, *,
                 image_size: Sequence[int], batch_size: Optional[int] = None,
                 dtype: Any = None, platforms: Sequence[str] = ("cpu",)) -> jax.export.Exported:
  """Export ``model``'s eval-mode forward pass with ``variables`` embedded as constants.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` as for ``model.apply`` (host or
      device arrays).
    model: a semantic jaxseg model (``jaxseg.models.build``); its output must be one array.
    image_size: (H, W), fixed in the exported program (a different size is refused when the
      file is called).
    batch_size: a fixed batch size, or None for a symbolic one (the file accepts any B).
    dtype: computation dtype to export with ("float32", "bfloat16" or the jnp types); None
      keeps the model's. The parameters stay float32 either way (as in training), so a
      float32-trained model can be exported to run in bfloat16.
    platforms: where the file may run, names from ``PLATFORMS``; CPU only by default.

  Returns:
    The ``jax.export.Exported``: ``call(images)`` maps float32 [B,H,W,3] in [0,1] to float32
    logits [B,H,W,C]; ``serialize()`` gives the bytes :func:`save` writes.

  Raises:
    ValueError: a bad ``image_size``, ``batch_size``, ``dtype`` or ``platforms``, a model
      without ``dtype`` fields when ``dtype`` is given, or variables without ``params``.
    TypeError: ``model`` is not a flax module, or an instance model (Mask R-CNN) or any
      model whose output is not a single array.
  """
  height, width = _check_image_size(image_size)
  batch_size = _check_batch_size(batch_size)
  platforms = _check_platforms(platforms)
  if not isinstance(model, nn.Module):
    raise TypeError(f"model must be a flax.linen.Module, got {type(model).__name__}")
  if getattr(model, "takes_targets", False):
    raise TypeError(f"{type(model).__name__} is an instance model (its eval output is a dict of "
                    "detections); jaxseg.export exports semantic segmentation models only")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be a mapping with 'params' (and 'batch_stats' when the "
                     f"model has BatchNorm), got {type(variables).__name__}"
                     + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping)
                        else ""))
  if dtype is not None:
    model, found = _with_dtype(model, registry.resolve_dtype(dtype))
    if not found:
      raise ValueError(f"dtype={dtype!r}: {type(model).__name__} has no dtype field to set")
  # Host copies: the constants are embedded in the program, whatever device they lived on.
  variables = jax.tree.map(np.asarray, dict(variables))

  def forward(images):
    return step_lib.float32_outputs(model.apply(variables, images, train=False))

  if batch_size is None:
    (batch,) = jax.export.symbolic_shape("b")
  else:
    batch = batch_size
  spec = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
  out = jax.eval_shape(forward, spec)
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise TypeError(f"{type(model).__name__}'s eval output is a {type(out).__name__}, not one "
                    "logits array; jaxseg.export exports semantic segmentation models only")
  if len(out.shape) != 4 or tuple(out.shape[1:3]) != (height, width):
    raise TypeError(f"{type(model).__name__} returns shape {out.shape} for images "
                    f"{spec.shape}; expected logits [B,{height},{width},C]")
  return jax.export.export(jax.jit(forward), platforms=platforms)(spec)


def save(exported: jax.export.Exported, path: str) -> None:
  """Write ``exported.serialize()`` to ``path`` atomically.

  The bytes go to a temporary file in the same folder that then replaces ``path``, so a
  crash or a full disk never leaves a partial file under ``path`` (nor a stray temporary).

  Raises:
    TypeError: ``exported`` is not a ``jax.export.Exported``.
    FileNotFoundError: the folder of ``path`` does not exist.
  """
  if not isinstance(exported, jax.export.Exported):
    raise TypeError(f"exported must be a jax.export.Exported, got {type(exported).__name__}")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"cannot save the exported model to {path}: folder {folder} does "
                            "not exist")
  data = exported.serialize()
  with fileio.atomic_write(path) as f:
    f.write(data)


def load(path: str) -> jax.export.Exported:
  """The ``jax.export.Exported`` stored in ``path`` by :func:`save`.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file is empty, truncated or not a serialised ``jax.export`` model.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no exported model at {path}")
  with open(path, "rb") as f:
    data = f.read()
  if not data:
    raise ValueError(f"{path} is empty, not a serialised jax.export model")
  try:
    return jax.export.deserialize(bytearray(data))
  except ImportError:  # jax's own message: the 'flatbuffers' package is missing
    raise
  except Exception as e:  # noqa: BLE001 - flatbuffer/MLIR errors have no common type
    raise ValueError(f"{path} is not a valid serialised jax.export model (corrupt or "
                     f"truncated, {len(data)} bytes): {type(e).__name__}: {e}") from e


def _restore(workdir: str, step: Optional[int], dtype: Any):
  # Imported here: the training loop pulls in the data pipeline, which export_model, save
  # and load do not need.
  from jaxseg.train import loop
  config = loop.load_config(workdir)
  if dtype is not None:
    config.dtype = registry.resolve_dtype(dtype).dtype.name
  return loop.restore_run(workdir, config=config, step=step)


def export_workdir(workdir: str, out_path: str, *, step: Optional[int] = None,
                   batch_size: Optional[int] = None,
                   image_size: Optional[Sequence[int]] = None, dtype: Any = None,
                   platforms: Sequence[str] = ("cpu",)) -> jax.export.Exported:
  """Restore a training run and :func:`save` its exported model to ``out_path``.

  Args:
    workdir: a ``train.py`` output folder (``config.json`` and ``checkpoints/``).
    out_path: the file to write.
    step: checkpoint step; None takes the newest intact one.
    batch_size: fixed batch size, or None for a symbolic one.
    image_size: (H, W); None takes the run's ``config.crop_size``, else its
      ``config.eval_image_size``.
    dtype: computation dtype ("float32"/"bfloat16"); None keeps the run's ``config.dtype``.
    platforms: as in :func:`export_model`.

  Returns:
    The exported model (also written to ``out_path``).

  Raises:
    ValueError: bad arguments, or no ``image_size`` given and none in the config.
    FileNotFoundError, jaxseg.train.CheckpointError: no run or checkpoint to restore.
  """
  if image_size is not None:
    image_size = _check_image_size(image_size)
  batch_size = _check_batch_size(batch_size)
  platforms = _check_platforms(platforms)
  if dtype is not None:
    registry.resolve_dtype(dtype)
  run = _restore(workdir, step, dtype)
  if image_size is None:
    size = run.config.get("crop_size", None) or run.config.get("eval_image_size", None)
    if not size:
      raise ValueError(f"the run in {workdir} sets neither config.crop_size nor "
                       "config.eval_image_size: pass image_size=(H, W) (--image_size H,W)")
    image_size = _check_image_size(tuple(size))
  exported = export_model(run.variables, run.model, image_size=image_size,
                          batch_size=batch_size, platforms=platforms)
  save(exported, out_path)
  return exported


def _describe(aval) -> str:
  return f"{aval.dtype}[{','.join(str(d) for d in aval.shape)}]"


def _parse_batch(text: str) -> Optional[int]:
  if text == "symbolic":
    return None
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"--batch must be a positive int or 'symbolic', got {text!r}")
  return value


def _parse_size(text: str) -> Tuple[int, int]:
  try:
    size = tuple(int(s) for s in text.replace("x", ",").split(","))
  except ValueError:
    size = ()
  if len(size) != 2 or min(size) < 1:
    raise argparse.ArgumentTypeError(f"--image_size must be H,W (two positive ints), "
                                     f"got {text!r}")
  return size


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``python -m jaxseg.export --workdir RUN --out FILE [--batch N|symbolic] [--step N]``."""
  parser = argparse.ArgumentParser(prog="python -m jaxseg.export",
                                   description="Export a trained run with jax.export (StableHLO).")
  parser.add_argument("--workdir", required=True, help="train.py output folder")
  parser.add_argument("--out", required=True, help="file to write (e.g. model.jaxexport)")
  parser.add_argument("--batch", type=_parse_batch, default=None,
                      help="fixed batch size, or 'symbolic' (default: any batch size)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  parser.add_argument("--image_size", type=_parse_size, default=None,
                      help="H,W (default: the run's crop_size or eval_image_size)")
  parser.add_argument("--dtype", choices=sorted(registry.COMPUTE_DTYPES), default=None,
                      help="computation dtype (default: the run's)")
  parser.add_argument("--platforms", default="cpu",
                      help=f"comma-separated, from {','.join(PLATFORMS)} (default: cpu)")
  args = parser.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # orbax warns about every read-only restore
  platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
  exported = export_workdir(args.workdir, args.out, step=args.step, batch_size=args.batch,
                            image_size=args.image_size, dtype=args.dtype, platforms=platforms)
  (inp,), (out,) = exported.in_avals, exported.out_avals
  print(f"Wrote {args.out} ({os.path.getsize(args.out)} bytes) for "
        f"{','.join(exported.platforms)}: images {_describe(inp)} -> logits {_describe(out)}",
        flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
