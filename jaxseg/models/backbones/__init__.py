"""Feature extractors shared by the segmentation heads.

Every backbone maps images [N,H,W,3] (RGB in [0, 1]; it normalises internally) to a
dict of named feature maps: ``stem`` and ``c2``..``c5`` at nominal strides 4, 8, 16, 32
(torchvision's layer1..layer4 for ResNets; see each module for ``stem``). ``output_stride``
8 or 16 replaces the last strides by dilation. Heads pick their inputs by key, so any
head works on any backbone.
"""
from typing import Optional

import flax.linen as nn

from jaxseg.models.backbones import mobilenet, resnet, vgg  # noqa: F401
from jaxseg.models.backbones.mobilenet import MobileNetV2  # noqa: F401
from jaxseg.models.backbones.resnet import ResNet  # noqa: F401
from jaxseg.models.backbones.vgg import VGG16, VGG16Backbone, vgg16_widths  # noqa: F401

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "vgg16")


def build_backbone(name: str, *, output_stride: int = 32, num_classes: Optional[int] = None,
                   width_multiplier: float = 1.0, **kwargs) -> nn.Module:
  """Builds a backbone by name.

  Args:
    name: one of ``BACKBONES``.
    output_stride: 8, 16 or 32.
    num_classes: resnet*/mobilenet_v2 only: also return ImageNet-style classifier
      ``logits`` [N, num_classes] (to check pretrained weights).
    width_multiplier: scales every channel count (thin variants for tests; MobileNetV2's
      ``width_mult``).
    **kwargs: module fields (``norm``, ``deep_stem``, ``multi_grid``, ``dtype``...).

  Raises:
    ValueError: unknown name, unsupported output stride or option.
  """
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
  if output_stride not in (8, 16, 32):
    raise ValueError(f"{name}: output_stride must be one of (8, 16, 32), got {output_stride!r}")
  if name.startswith("resnet"):
    widths = tuple(max(1, int(round(w * width_multiplier))) for w in (64, 128, 256, 512))
    kwargs.setdefault("stem_width", widths[0])
    return resnet.resnet(name, widths=widths, output_stride=output_stride,
                         num_classes=num_classes, **kwargs)
  if name == "mobilenet_v2":
    return MobileNetV2(width_multiplier=width_multiplier, output_stride=output_stride,
                       num_classes=num_classes, **kwargs)
  if num_classes is not None:
    raise ValueError("vgg16: no ImageNet classifier head; num_classes is for resnet* and "
                     "mobilenet_v2")
  return VGG16Backbone(widths=vgg16_widths(width_multiplier), output_stride=output_stride,
                       **kwargs)

