"""PSPNet (Zhao et al., CVPR 2017), as hszhao/semseg builds it.

A dilated ResNet at output stride 8 with the deep (three 3x3 convs) stem and every
block of layer3/layer4 dilated (2, 4; strides moved off the shortcut projections too),
the pyramid pooling module with bins 1/2/3/6 on c5 (``heads.PSPHead``: 512 per bin,
``align_corners=True`` upsampling, then 3x3 conv 512, Dropout2d 0.1, 1x1 classifier)
and an auxiliary ``FCNHead`` on c4 (1024 -> 256, Dropout2d 0.1), whose loss the recipe
weights by 0.4. Logits are resized to the input with ``align_corners=True``; the
original code prefers sizes with (H - 1) % 8 == 0 (473, 713), any size >= 1 works here.
"""
from jaxseg.models.heads import FCNHead, PSPHead
from jaxseg.models.registry import register
from jaxseg.models.segmentation import SegmentationModel, compute_dtype, make_backbone, scaled

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


@register("pspnet")
def pspnet(*, num_classes: int, backbone: str = "resnet50", output_stride: int = 8,
           deep_stem: bool = True, aux: bool = True, width_multiplier: float = 1.0,
           **kwargs) -> SegmentationModel:
  """PSPNet on a ResNet (``output_stride`` 8 as published, or 16)."""
  bb = make_backbone("pspnet", backbone, BACKBONES, output_stride=output_stride,
                     supported_strides=(8, 16), deep_stem=deep_stem, dilate_first_block=True,
                     width_multiplier=width_multiplier, **kwargs)
  dtype = compute_dtype(kwargs)
  head = PSPHead(num_classes, features=scaled(512, width_multiplier), dtype=dtype)
  aux_head = None
  if aux:
    aux_head = FCNHead(num_classes, in_key="c4", channels=scaled(256, width_multiplier),
                       channel_dropout=True, dtype=dtype)
  return SegmentationModel(backbone=bb, classifier=head, aux_classifier=aux_head,
                           align_corners=True)
