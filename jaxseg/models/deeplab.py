"""DeepLab family (Chen et al.): v1 LargeFOV and v2 ASPP-L on VGG16.

Shared VGG16 geometry (DeepLab Caffe prototxts): pool1-3 are 3x3 stride-2
pad-1 max pools in ceil mode, pool4 and pool5 are 3x3 stride-1 pad-1, conv5 is
dilated by 2 (padding 2). Output stride 8 (321 -> 41). Logits are resized to
the input size with ``align_corners=True`` bilinear interpolation (Caffe
``Interp``), which maps input pixel 8k to score k exactly for sizes 8n + 1; any
input size >= 1 is accepted.

* v1 LargeFOV: pool5a (3x3 s1 p1 average pool, padding counted), then one
  branch fc6 (3x3, dilation 12, 1024) -> fc7 (1x1, 1024) -> fc8 (1x1, C), ReLU and
  dropout 0.5 after fc6 and fc7, fc8 initialised N(0, 0.01).
* v2 ASPP-L: four such branches on pool5 with dilations 6, 12, 18, 24, whose
  class scores are **summed** (``ASPPSum``).

The dense-CRF post-processing of the papers is not part of the network; see
``jaxseg.losses.crf`` for the pairwise term.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.backbones import vgg
from jaxseg.models.heads import ASPPSumHead, DeepLabHead, DeepLabV3PlusHead, FCNHead
from jaxseg.models.registry import register
from jaxseg.models.segmentation import SegmentationModel, compute_dtype, make_backbone, scaled

DEEPLAB_VGG_POOLS = ((3, 2, 1),) * 3 + ((3, 1, 1),) * 2
OUTPUT_STRIDE = 8


class DilatedFCBranch(nn.Module):
  """fc6 (3x3 dilated) -> ReLU -> dropout -> fc7 (1x1) -> ReLU -> dropout -> fc8 (1x1 to C)."""
  num_classes: int
  rate: int
  features: int = 1024
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    r = self.rate
    x = layers.Conv(self.features, (3, 3), padding=[(r, r), (r, r)], kernel_dilation=(r, r),
                kernel_init=vgg.he_normal, dtype=self.dtype, name="fc6")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    x = layers.Conv(self.features, (1, 1), kernel_init=vgg.he_normal, dtype=self.dtype,
                name="fc7")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    return layers.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.01),
                   dtype=self.dtype, name="fc8")(x)


class ASPPSum(nn.Module):
  """DeepLab v2 atrous spatial pyramid pooling: one branch per rate, scores summed.

  (DeepLab v3's ASPP concatenates 256-channel branches and projects instead; it
  is a different module.)
  """
  num_classes: int
  rates: Sequence[int] = (6, 12, 18, 24)
  features: int = 1024
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    out = 0.0
    for i, rate in enumerate(self.rates):
      out = out + DilatedFCBranch(self.num_classes, rate, self.features, self.dropout,
                                  dtype=self.dtype, name=f"branch{i + 1}")(x, train=train)
    return out


class DeepLabVGG(nn.Module):
  """DeepLab v1 (``rates=(12,)``, ``pool5a=True``) or v2 (``rates=(6,12,18,24)``) on VGG16.

  Attributes:
    num_classes: output channels.
    rates: fc6 dilation of each branch; branch scores are summed.
    pool5a: 3x3 stride-1 average pool after pool5 (v1 LargeFOV).
    widths: VGG16 stage widths (``vgg16_widths(m)`` for thin variants).
    fc_features: channels of fc6/fc7 (1024).
    dropout: rate after fc6 and fc7 (rng stream "dropout").
    mean, std, dtype: input normalisation and computation dtype.
    remat: recompute each VGG stage in the backward pass (``vgg.VGG16``).
  """
  num_classes: int
  rates: Sequence[int] = (12,)
  pool5a: bool = True
  widths: Sequence[int] = vgg.VGG16_WIDTHS
  fc_features: int = 1024
  dropout: float = 0.5
  mean: Sequence[float] = layers.IMAGENET_MEAN
  std: Sequence[float] = layers.IMAGENET_STD
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool):
    """images float [N,H,W,3] in [0,1] -> logits float32 [N,H,W,num_classes]."""
    if not self.rates:
      raise ValueError("deeplab: rates must name at least one dilation rate")
    layers.check_images(images, "deeplab")
    _, h, w, _ = images.shape
    x = layers.normalize(images, self.mean, self.std, self.dtype)
    feats = vgg.VGG16(widths=self.widths, conv5_dilation=2, pools=DEEPLAB_VGG_POOLS,
                      ceil_mode=True, dtype=self.dtype, remat=self.remat,
                      name="backbone")(x, train=train)
    x = feats["pool5"]
    if self.pool5a:
      x = nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)
    x = ASPPSum(self.num_classes, tuple(self.rates), self.fc_features, self.dropout,
                dtype=self.dtype, name="aspp")(x, train=train)
    return layers.resize_bilinear(x, (h, w), align_corners=True).astype(jnp.float32)


def _vgg_deeplab(name, num_classes, backbone, width_multiplier, fc_features, **kwargs):
  if backbone != "vgg16":
    raise ValueError(f"{name}: backbone must be 'vgg16', got {backbone!r}")
  if fc_features is None:
    fc_features = max(1, int(round(1024 * width_multiplier)))
  return DeepLabVGG(num_classes=num_classes, widths=vgg.vgg16_widths(width_multiplier),
                    fc_features=fc_features, **kwargs)


@register("deeplabv1")
def deeplabv1(*, num_classes: int, backbone: str = "vgg16", width_multiplier: float = 1.0,
              fc_features: Optional[int] = None, **kwargs) -> DeepLabVGG:
  """DeepLab v1 LargeFOV on VGG16 (fc6 dilation 12, 1024 channels)."""
  kwargs.setdefault("rates", (12,))
  kwargs.setdefault("pool5a", True)
  return _vgg_deeplab("deeplabv1", num_classes, backbone, width_multiplier, fc_features, **kwargs)


@register("deeplabv2")
def deeplabv2(*, num_classes: int, backbone: str = "vgg16", width_multiplier: float = 1.0,
              fc_features: Optional[int] = None, **kwargs) -> nn.Module:
  """DeepLab v2 ASPP-L, rates 6, 12, 18, 24, branch scores summed.

  ``backbone="vgg16"``: four fc6-fc8 branches on pool5 (Caffe geometry, ``DeepLabVGG``).
  ``backbone="resnet101"`` (or resnet50): ResNet at output stride 8 with every block of
  layer3/layer4 dilated (2, 4), one dilated 3x3 conv to the classes per rate
  (``ASPPSumHead``); logits resized with align_corners=True.
  """
  if backbone in ("resnet50", "resnet101"):
    if fc_features is not None:
      raise ValueError("deeplabv2: fc_features applies to the vgg16 backbone only")
    rates = tuple(kwargs.pop("rates", (6, 12, 18, 24)))
    bb = make_backbone("deeplabv2", backbone, ("vgg16", "resnet50", "resnet101"),
                       output_stride=8, dilate_first_block=True,
                       width_multiplier=width_multiplier, **kwargs)
    return SegmentationModel(backbone=bb, align_corners=True,
                             classifier=ASPPSumHead(num_classes, rates=rates,
                                                    dtype=compute_dtype(kwargs)))
  if backbone != "vgg16":
    raise ValueError(f"deeplabv2: backbone {backbone!r} is not supported; supported: vgg16, "
                     "resnet50, resnet101")
  kwargs.setdefault("rates", (6, 12, 18, 24))
  kwargs.setdefault("pool5a", False)
  return _vgg_deeplab("deeplabv2", num_classes, backbone, width_multiplier, fc_features, **kwargs)


# ----------------------------------------------------------------------------
# DeepLab on ResNet / MobileNetV2 (v2 ASPP-L, v3, v3+) and torchvision's v3
# ----------------------------------------------------------------------------

MODERN_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def _torchvision_deeplabv3(depth):
  def builder(*, num_classes: int, aux: bool = True, width_multiplier: float = 1.0,
              backbone: str = f"resnet{depth}", output_stride: int = 8,
              **kwargs) -> SegmentationModel:
    backbone = make_backbone(f"deeplabv3_resnet{depth}", backbone, (f"resnet{depth}",),
                             output_stride=output_stride, supported_strides=(8,),
                             width_multiplier=width_multiplier, **kwargs)
    dtype = compute_dtype(kwargs)
    head = DeepLabHead(num_classes, rates=(12, 24, 36), features=scaled(256, width_multiplier),
                       pool_first=False, dropout=0.5, extra_conv=True, dtype=dtype)
    return SegmentationModel(
        backbone=backbone, classifier=head,
        aux_classifier=FCNHead(num_classes, in_key="c4", dtype=dtype) if aux else None)
  builder.__name__ = f"deeplabv3_resnet{depth}"
  builder.__doc__ = (
      f"torchvision ``deeplabv3_resnet{depth}``: ResNet-{depth} at output stride 8, "
      "``DeepLabHead`` (ASPP rates 12/24/36 with image pooling last, projection dropout "
      "0.5, an extra 3x3 conv-BN-ReLU), ``FCNHead`` aux on c4 when ``aux``; state-dict "
      f"compatible with ``torchvision.models.segmentation.deeplabv3_resnet{depth}``.")
  return builder


deeplabv3_resnet50 = register("deeplabv3_resnet50")(_torchvision_deeplabv3(50))
deeplabv3_resnet101 = register("deeplabv3_resnet101")(_torchvision_deeplabv3(101))


@register("deeplabv3")
def deeplabv3(*, num_classes: int, backbone: str = "resnet101", output_stride: int = 16,
              multi_grid: Optional[Sequence[int]] = (1, 2, 4), aux: bool = False,
              width_multiplier: float = 1.0, **kwargs) -> SegmentationModel:
  """DeepLab v3 as in the paper / TF code: ASPP with image pooling first (rates 6/12/18
  at OS16, 12/24/36 at OS8), 1x1 projection, dropout 0.1, 1x1 classifier; multi-grid
  (1, 2, 4) on a ResNet's layer4; logits resized with align_corners=True. ``aux`` adds
  an ``FCNHead`` on c4.
  """
  if backbone == "mobilenet_v2":
    multi_grid = None
  else:
    kwargs["multi_grid"] = multi_grid
  bb = make_backbone("deeplabv3", backbone, MODERN_BACKBONES, output_stride=output_stride,
                     supported_strides=(8, 16), width_multiplier=width_multiplier, **kwargs)
  dtype = compute_dtype(kwargs)
  head = DeepLabHead(num_classes, rates=ASPP_RATES[output_stride],
                     features=scaled(256, width_multiplier), pool_first=True, dropout=0.1,
                     dtype=dtype)
  return SegmentationModel(
      backbone=bb, classifier=head, align_corners=True,
      aux_classifier=FCNHead(num_classes, in_key="c4", dtype=dtype) if aux else None)


@register("deeplabv3plus")
def deeplabv3plus(*, num_classes: int, backbone: str = "resnet101", output_stride: int = 16,
                  multi_grid: Optional[Sequence[int]] = None, aux: bool = False,
                  width_multiplier: float = 1.0, **kwargs) -> SegmentationModel:
  """DeepLab v3+: the v3 ASPP on c5 (OS16 rates 6/12/18, OS8 12/24/36) and the decoder on
  the stride-4 c2 (48-channel reduction, two 3x3 convs of 256); logits at stride 4
  resized with align_corners=True (TF). Any input size works.
  """
  if multi_grid is not None and backbone != "mobilenet_v2":
    kwargs["multi_grid"] = multi_grid
  bb = make_backbone("deeplabv3plus", backbone, MODERN_BACKBONES, output_stride=output_stride,
                     supported_strides=(8, 16), width_multiplier=width_multiplier, **kwargs)
  dtype = compute_dtype(kwargs)
  head = DeepLabV3PlusHead(num_classes, rates=ASPP_RATES[output_stride],
                           features=scaled(256, width_multiplier),
                           skip_features=scaled(48, width_multiplier), dtype=dtype)
  return SegmentationModel(
      backbone=bb, classifier=head, align_corners=True,
      aux_classifier=FCNHead(num_classes, in_key="c4", dtype=dtype) if aux else None)
