"""RefineNet (Lin et al., CVPR 2017): the RefineNet-4 cascade on a ResNet.

The backbone runs at output stride 32 (no dilation); ``heads.RefineNetHead`` refines
c5 -> c4 -> c3 -> c2 with residual conv units, multi-resolution fusion and chained
residual pooling (see ``jaxseg.models.heads.refinenet``) and classifies at stride 4;
logits are resized to the input with ``align_corners=True`` as in the released code.
Any input size >= 1 works (each fusion upsamples to the finer path's size).
"""
from jaxseg.models.heads import RefineNetHead
from jaxseg.models.registry import register
from jaxseg.models.segmentation import SegmentationModel, compute_dtype, make_backbone, scaled

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


@register("refinenet")
def refinenet(*, num_classes: int, backbone: str = "resnet101", width_multiplier: float = 1.0,
              crp_stages: int = 4, output_rcus: int = 3, **kwargs) -> SegmentationModel:
  """RefineNet-4 cascade (as released: 4 CRP stages, 3 output RCUs) on a ResNet."""
  bb = make_backbone("refinenet", backbone, BACKBONES,
                     output_stride=kwargs.pop("output_stride", 32), supported_strides=(32,),
                     width_multiplier=width_multiplier, **kwargs)
  head = RefineNetHead(num_classes, features=scaled(256, width_multiplier),
                       crp_stages=crp_stages, output_rcus=output_rcus,
                       dtype=compute_dtype(kwargs))
  return SegmentationModel(backbone=bb, classifier=head, align_corners=True)
