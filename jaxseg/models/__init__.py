"""Segmentation networks (flax.linen) and the ``build``/``names`` registry.

Every semantic model maps float32 RGB images [N,H,W,3] in [0,1] to float32 logits
[N,H,W,num_classes]; see each family's module for its input-size rules.
"""
from jaxseg.models import layers  # noqa: F401
from jaxseg.models import backbones  # noqa: F401
# Importing the families registers their builders.
from jaxseg.models import deeplab, dilated, fcn, pspnet, refinenet, segnet, unet  # noqa: F401
from jaxseg.models import maskrcnn  # noqa: F401
from jaxseg.models import heads  # noqa: F401
from jaxseg.models.backbones import build_backbone  # noqa: F401
from jaxseg.models.deeplab import DeepLabVGG  # noqa: F401
from jaxseg.models.dilated import Dilation  # noqa: F401
from jaxseg.models.fcn import FCN  # noqa: F401
from jaxseg.models.maskrcnn import MaskRCNN  # noqa: F401
from jaxseg.models.registry import build, names, register  # noqa: F401
from jaxseg.models.segmentation import SegmentationModel  # noqa: F401
from jaxseg.models.segnet import SegNet  # noqa: F401
from jaxseg.models.unet import UNet  # noqa: F401
