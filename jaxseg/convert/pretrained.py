"""Pretrained backbone weights for segmentation models (``config.pretrained``).

``load_backbone(model, variables, pretrained)`` converts an ImageNet classifier file
(torchvision layout) into the backbone of ``model`` and returns ``variables`` with the
backbone's parameters and BatchNorm statistics replaced; the heads keep their
initialisation. ``pretrained`` is a name the fetch command knows (``mobilenet_v2``,
resolved to the verified file in the cache) or a path to a ``.pth`` file; nothing is
downloaded here.
"""
import os
from typing import Any, Dict, Mapping, Union

import flax
import numpy as np

from jaxseg.convert import weights
from jaxseg.convert.torch import from_torch_state_dict
from jaxseg.convert.torch_file import load_torch_file
from jaxseg.models.backbones import MobileNetV2, ResNet

# The ImageNet classifier entries that a feature extractor does not have.
_CLASSIFIER_PREFIXES = {ResNet: ("fc.",), MobileNetV2: ("classifier.", "features.18.")}


def resolve(pretrained: str) -> str:
  """A known weights name -> its cached file (see ``weights.path``); a path -> itself."""
  if pretrained in weights.KNOWN:
    return weights.path(pretrained)
  path = os.path.expanduser(pretrained)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"pretrained weights {pretrained!r}: no such file, and not a known name "
        f"({', '.join(weights.KNOWN)}; fetch with `{weights.fetch_command('mobilenet_v2')}`)")
  return path


def backbone_state_dict(backbone, state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Drops the classifier entries of an ImageNet checkpoint for ``backbone``'s type."""
  prefixes = _CLASSIFIER_PREFIXES.get(type(backbone))
  if prefixes is None:
    raise ValueError(f"no ImageNet checkpoint layout is known for {type(backbone).__name__}; "
                     f"supported: {', '.join(t.__name__ for t in _CLASSIFIER_PREFIXES)}")
  return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def load_backbone(model, variables: Mapping[str, Any],
                  pretrained: Union[str, Mapping[str, Any]]) -> Dict[str, Any]:
  """Returns ``variables`` with ``model.backbone`` loaded from ``pretrained``.

  Args:
    model: a module with a ``backbone`` attribute (``SegmentationModel``).
    variables: the model's initialised ``{"params", "batch_stats"}``.
    pretrained: known name, ``.pth`` path, or an already loaded state dict.
  Raises:
    ValueError: the file does not fit the backbone (missing/unexpected/mis-shaped
      entries listed), or the model has no converted-weights backbone.
  """
  backbone = getattr(model, "backbone", None)
  if backbone is None:
    raise ValueError(f"{type(model).__name__} has no `backbone` to load pretrained weights into")
  sd = pretrained
  if isinstance(pretrained, str):
    sd = load_torch_file(resolve(pretrained))
  loaded = from_torch_state_dict(backbone, backbone_state_dict(backbone, sd))
  out = flax.core.unfreeze(variables)
  for collection, tree in loaded.items():
    if "backbone" not in out.get(collection, {}):
      raise ValueError(f"variables have no {collection}/backbone entry to replace")
    old = out[collection]["backbone"]
    shapes_old = flax.traverse_util.flatten_dict(old)
    shapes_new = flax.traverse_util.flatten_dict(tree)
    if {k: v.shape for k, v in shapes_old.items()} != {k: v.shape for k, v in shapes_new.items()}:
      raise ValueError(f"pretrained {collection} do not match the model's backbone layout")
    out[collection]["backbone"] = tree
  return out
