"""One wrapper for every backbone + head segmentation network.

``SegmentationModel(backbone, classifier, aux_classifier)``: the backbone normalises
the [0, 1] RGB input and returns its feature dict, the head (``classifier``) maps it to
logits, and the logits are resized bilinearly to the input size. An auxiliary head
(``aux_classifier``) is evaluated when the caller makes ``intermediates`` mutable (the
trainer does in training) and its input-size logits are sown there as ``aux_logits``.
The attribute names are torchvision's (``backbone``, ``classifier``,
``aux_classifier``), so torchvision segmentation state dicts convert structurally.

Mixed precision: the builders give the backbone and every head the same ``dtype``
(:func:`compute_dtype` reads it from the builder's keyword arguments). The head logits are
cast to float32 *before* the final bilinear resize, so the full-resolution interpolation and
everything the loss sees are float32 whatever the computation dtype.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import backbones as backbones_lib
from jaxseg.models import layers
from jaxseg import names as names_lib


class SegmentationModel(nn.Module):
  """images float [N,H,W,3] in [0, 1] -> logits float32 [N,H,W,num_classes].

  Attributes:
    backbone: a module ``(images, *, train) -> {"stem", "c2".."c5"}``.
    classifier: a head ``(feats, *, train) -> logits`` at some stride.
    aux_classifier: optional auxiliary head on the same feature dict.
    align_corners: of the final bilinear resize (torchvision False; the Caffe/TF
      DeepLab, PSPNet and RefineNet code True).
  Any input size >= 1 is accepted (strided convs pad, heads resize between scales).
  """
  backbone: nn.Module
  classifier: nn.Module
  aux_classifier: Optional[nn.Module] = None
  align_corners: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool):
    layers.check_images(images, type(self.classifier).__name__)
    size = images.shape[1:3]
    feats = self.backbone(images, train=train)
    logits = self.classifier(feats, train=train)
    # Initialisation always builds the aux head so its parameters exist for training.
    wanted = self.is_initializing() or self.is_mutable_collection("intermediates")
    if self.aux_classifier is not None and wanted:
      aux = self.aux_classifier(feats, train=train).astype(jnp.float32)
      aux = layers.resize_bilinear(aux, size, align_corners=self.align_corners)
      self.sow("intermediates", "aux_logits", aux)
    # float32 before the resize: interpolating bfloat16 logits would round them at full
    # resolution, and the output is float32 anyway.
    logits = logits.astype(jnp.float32)
    return layers.resize_bilinear(logits, size, align_corners=self.align_corners)


def compute_dtype(kwargs) -> Any:
  """The computation dtype a builder was given (``kwargs["dtype"]``, float32 by default).

  ``jaxseg.models.build`` has already resolved a string to the jnp type; the key stays in
  ``kwargs`` so that it also reaches the backbone.
  """
  return kwargs.get("dtype", jnp.float32)


def make_backbone(model: str, backbone: str, supported: Sequence[str], *,
                  output_stride: int, supported_strides: Sequence[int] = (8, 16, 32),
                  **kwargs) -> nn.Module:
  """``backbones.build_backbone`` after checking the family supports the combination.

  Raises:
    ValueError: naming the supported backbones / output strides of ``model``.
  """
  if backbone not in supported:
    raise ValueError(f"{model}: backbone {backbone!r} is not supported"
                     f"{names_lib.did_you_mean(backbone, supported)}; supported: "
                     f"{', '.join(supported)}")
  if output_stride not in supported_strides:
    raise ValueError(f"{model}: output_stride {output_stride!r} is not supported; supported: "
                     f"{', '.join(map(str, supported_strides))}")
  return backbones_lib.build_backbone(backbone, output_stride=output_stride, **kwargs)


def scaled(channels: int, width_multiplier: float) -> int:
  """A head width scaled like the backbone's channels (thin variants), at least 1."""
  return max(1, int(round(channels * width_multiplier)))

