"""Segmentation heads: each takes a backbone's feature dict and picks its inputs by key.

``__call__(feats, *, train) -> logits`` at the resolution of the finest map the head
reads (the wrapper, ``jaxseg.models.segmentation.SegmentationModel``, resizes to the
input). Norm layers are injected (``norm``, default ``layers.batch_norm``).
"""
from jaxseg.models.heads.aspp import ASPP, ASPPSumHead, DeepLabHead, DeepLabV3PlusHead  # noqa: F401
from jaxseg.models.heads.fcn import FCNHead  # noqa: F401
from jaxseg.models.heads.pyramid_pooling import PSPHead, PyramidPooling  # noqa: F401
from jaxseg.models.heads.refinenet import (  # noqa: F401
    ChainedResidualPooling, MultiResolutionFusion, RefineNetBlock, RefineNetHead,
    ResidualConvUnit)
