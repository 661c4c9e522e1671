"""PyTorch state dicts -> flax variables, without importing torch.

The mapping is structural: a flax variable at module path ``a/b/c`` with leaf
``kernel`` corresponds to the torch entry ``a.b.c.weight``. The module's type
(recorded while the model is initialised abstractly) decides the layout change:

| flax module | torch entries | conversion |
|---|---|---|
| ``nn.Conv`` | ``weight [O,I/g,kh,kw]``, ``bias`` | ``weight.transpose(2,3,1,0)`` (HWIO) |
| ``nn.ConvTranspose`` | ``weight [I,O,kh,kw]``, ``bias`` | ``transpose(2,3,0,1)`` flipped in space (``transpose_kernel=False``) or ``transpose(2,3,1,0)`` (``True``) |
| ``layers.NonOverlappingConvTranspose`` | ``weight [I,O,s,s]``, ``bias`` | ``transpose(2,3,0,1)`` (``transpose(2,3,1,0)`` with ``transpose_kernel``) |
| ``layers.BilinearConvTranspose`` | ``weight [I,O/g,kh,kw]`` | per group like ConvTranspose; when frozen (``trainable=False``) the entry must equal the bilinear filter and is only checked |
| ``nn.Dense`` | ``weight [out,in]``, ``bias`` | ``weight.T`` |
| ``nn.BatchNorm`` | ``weight, bias, running_mean, running_var`` | ``scale, bias`` and ``batch_stats`` ``mean, var``; ``num_batches_tracked`` dropped |
| ``layers.FrozenBatchNorm`` | ``weight, bias, running_mean, running_var`` | all four in ``batch_stats`` (``scale, bias, mean, var``) |
| ``nn.LayerNorm`` / ``nn.GroupNorm`` | ``weight, bias`` | ``scale, bias`` |

So any model whose torch counterpart uses the same module names converts
directly (the tests' reference UNet, SegNet and FCN modules do). Checkpoints
with other names are first renamed with ``rename`` (a dict or a function
returning the flax-side dotted name, or None to drop an entry), or prepared by a
helper such as ``vgg16_state_dict`` for torchvision VGG16 weights.
"""
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxseg.models import layers
from jaxseg.models.backbones import vgg

Rename = Union[Mapping[str, Optional[str]], Callable[[str], Optional[str]], None]

_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _record_modules(model, sample_input_shape, init_kwargs):
  modules = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      modules[tuple(context.module.path)] = context.module
    return next_fun(*args, **kwargs)

  def init():
    return model.init(jax.random.key(0), jnp.zeros(sample_input_shape, jnp.float32),
                      **init_kwargs)

  with nn.intercept_methods(interceptor):
    shapes = jax.eval_shape(init)
  return shapes, modules


def _torch_leaf(module, collection: str, leaf: str) -> Optional[str]:
  if isinstance(module, layers.FrozenBatchNorm):
    return {"scale": "weight", "bias": "bias", "mean": "running_mean",
            "var": "running_var"}.get(leaf)
  if isinstance(module, (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm)):
    return {("params", "scale"): "weight", ("params", "bias"): "bias",
            ("batch_stats", "mean"): "running_mean",
            ("batch_stats", "var"): "running_var"}.get((collection, leaf))
  return {"kernel": "weight", "bias": "bias"}.get(leaf)


def _transpose_conv_kernel(w, groups: int):
  """torch ConvTranspose weight [I, O/g, kh, kw] -> equivalent forward-conv HWIO [kh,kw,I/g,O]."""
  i, og, kh, kw = w.shape
  w = w.reshape(groups, i // groups, og, kh, kw).transpose(3, 4, 1, 0, 2)
  return w.reshape(kh, kw, i // groups, groups * og)[::-1, ::-1]


def _convert(module, leaf: str, w: np.ndarray) -> np.ndarray:
  if leaf != "kernel":
    return w
  if isinstance(module, nn.Dense):
    return w.T if w.ndim == 2 else w
  if isinstance(module, nn.ConvTranspose):
    if w.ndim != 4:
      return w
    if module.transpose_kernel:
      return w.transpose(2, 3, 1, 0)
    return w.transpose(2, 3, 0, 1)[::-1, ::-1]
  if isinstance(module, layers.NonOverlappingConvTranspose):
    if w.ndim != 4:
      return w
    return w.transpose(2, 3, 1, 0) if module.transpose_kernel else w.transpose(2, 3, 0, 1)
  if isinstance(module, layers.BilinearConvTranspose):
    if w.ndim != 4:
      return w
    return _transpose_conv_kernel(w, module.features if module.grouped else 1)
  if w.ndim == 4:  # nn.Conv and any conv-like module with an OIHW weight
    return w.transpose(2, 3, 1, 0)
  return w


def _apply_rename(state_dict, rename: Rename):
  out = {}
  for key, value in state_dict.items():
    if rename is None:
      new = key
    elif callable(rename):
      new = rename(key)
    else:
      new = rename.get(key, key)
    if new is not None:
      out[new] = value
  return out


def _fmt(title, items, limit=25):
  items = sorted(items)
  more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more


def from_torch_state_dict(model: nn.Module, state_dict: Mapping[str, Any], *,
                          sample_input_shape: Sequence[int] = (1, 64, 64, 3),
                          rename: Rename = None,
                          init_kwargs: Optional[dict] = None) -> Dict[str, Any]:
  """Converts a PyTorch state dict into this model's flax variables.

  Args:
    model: an unbound flax module, e.g. ``jaxseg.models.build(...)``.
    state_dict: mapping of torch parameter names to arrays (``t.numpy()``; numpy
      or anything ``np.asarray`` accepts). torch itself is never imported.
    sample_input_shape: an input shape the model accepts; it is only traced
      abstractly (``jax.eval_shape``), so a small one is enough.
    rename: dict or function mapping torch names to flax-side dotted names
      (``module.sub.weight``); None from the function drops the entry.
    init_kwargs: keyword arguments for ``model.init`` (default ``{"train": False}``).

  Returns:
    ``{"params": ..., "batch_stats": ...}`` (only the collections the model
    has), ready for ``model.apply``.

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped entry.
  """
  init_kwargs = {"train": False} if init_kwargs is None else init_kwargs
  shapes, modules = _record_modules(model, tuple(sample_input_shape), init_kwargs)
  sd = _apply_rename(dict(state_dict), rename)
  sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
  used, missing, misshaped = set(), [], []
  flat_out = {}
  for path, spec in traverse_util.flatten_dict(jax.tree.map(lambda x: x, dict(shapes))).items():
    collection, *module_path, leaf = path
    module = modules.get(tuple(module_path))
    torch_leaf = _torch_leaf(module, collection, leaf)
    key = ".".join(module_path + [torch_leaf or leaf])
    if key not in sd:
      missing.append(key)
      continue
    used.add(key)
    value = _convert(module, leaf, np.asarray(sd[key], dtype=np.float32))
    if value.shape != tuple(spec.shape):
      misshaped.append(f"{key}: torch {tuple(np.shape(sd[key]))} -> {value.shape}, "
                       f"expected {tuple(spec.shape)}")
      continue
    flat_out[path] = jnp.asarray(value, spec.dtype)

  # Frozen bilinear upsampling layers hold no parameter; a checkpoint may still
  # carry their (bilinear) weights, which are checked rather than loaded.
  for mpath, module in modules.items():
    if isinstance(module, layers.BilinearConvTranspose) and not module.trainable:
      key = ".".join(mpath + ("weight",))
      if key in sd:
        used.add(key)
        expected = np.asarray(layers.bilinear_kernel(module.kernel_size, module.features,
                                                     grouped=module.grouped))
        got = _convert(module, "kernel", np.asarray(sd[key], np.float32))
        if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-6):
          misshaped.append(f"{key}: layer is frozen bilinear (trainable=False) but the "
                           "checkpoint holds other weights; build it trainable to load them")

  unexpected = [k for k in sd if k not in used]
  if missing or unexpected or misshaped:
    parts = [f"from_torch_state_dict: state dict does not match {type(model).__name__}"]
    if missing:
      parts.append(_fmt("missing", missing))
    if unexpected:
      parts.append(_fmt("unexpected", unexpected))
    if misshaped:
      parts.append(_fmt("mis-shaped", misshaped))
    raise ValueError("\n".join(parts))
  return traverse_util.unflatten_dict(flat_out)


def vgg16_state_dict(state_dict: Mapping[str, Any], *, prefix: str = "backbone",
                     batch_norm: bool = False, fc: Optional[Tuple[str, str]] = None,
                     fc6_kernel: int = 7) -> Dict[str, np.ndarray]:
  """Renames a torchvision ``vgg16``/``vgg16_bn`` state dict to jaxseg's VGG16 names.

  ``features.{i}`` become ``{prefix}.conv{s}_{j}`` (and ``{prefix}.conv{s}_{j}_bn``
  for vgg16_bn). With ``fc=("fc6", "fc7")`` the classifier's first two Linear
  layers are convolutionalised as in FCN: ``classifier.0`` [4096, 512*7*7] (an NCHW
  flatten) becomes a 7x7 conv weight [4096, 512, 7, 7] and ``classifier.3`` a 1x1
  conv; otherwise the classifier is dropped. The result is still in torch layout
  and goes to ``from_torch_state_dict``.
  """
  step = 3 if batch_norm else 2  # conv, [bn], relu; then a pool after each stage
  out, index, idx_to_name = {}, 0, {}
  for stage, depth in enumerate(vgg.VGG16_DEPTHS, 1):
    for j in range(1, depth + 1):
      idx_to_name[index] = f"conv{stage}_{j}"
      if batch_norm:
        idx_to_name[index + 1] = f"conv{stage}_{j}_bn"
      index += step
    index += 1
  pattern = re.compile(r"features\.(\d+)\.(\w+)$")
  for key, value in state_dict.items():
    m = pattern.match(key)
    if m and int(m.group(1)) in idx_to_name:
      name = f"{idx_to_name[int(m.group(1))]}.{m.group(2)}"
      out[f"{prefix}.{name}" if prefix else name] = np.asarray(value)
    elif key.startswith("classifier.") and fc is not None:
      layer, leaf = key.split(".")[1:3]
      value = np.asarray(value)
      if layer == "0":
        if leaf == "weight":
          value = value.reshape(value.shape[0], -1, fc6_kernel, fc6_kernel)
        out[f"{fc[0]}.{leaf}"] = value
      elif layer == "3":
        if leaf == "weight":
          value = value[:, :, None, None]
        out[f"{fc[1]}.{leaf}"] = value
    elif not key.startswith("classifier."):
      out[key] = np.asarray(value)  # left for from_torch_state_dict to report
  return out
