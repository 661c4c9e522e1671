"""Fully convolutional networks (Long, Shelhamer & Darrell, CVPR 2015 / PAMI 2016).

The Caffe geometry of shelhamer/fcn.berkeleyvision.org on a VGG16 body:
conv1_1 padded by 100, ceil-mode 2x2 pools, fc6 as a 7x7 unpadded conv and fc7
as a 1x1 conv (4096, ReLU, dropout 0.5), zero-initialised score layers, and
bilinear transposed convs (frozen by default, ``trainable_upsampling=True`` to
learn them) whose outputs are cropped at the paper's fixed offsets:

* FCN-32s: upscore (k64 s32) -> crop 19.
* FCN-16s: upscore2 (k4 s2) + score_pool4 cropped at 5 -> upscore16 (k32 s16) -> crop 27.
* FCN-8s: ... + score_pool3 cropped at 9 -> upscore8 (k16 s8) -> crop 31.

The 100-px padding makes these offsets valid for every input size, so the
logits always have the input's size (any H, W >= 1, odd sizes included).
``at_once=True`` is the all-at-once FCN-8s: pool4 is scaled by 0.01 and pool3
by 1e-4 before their score layers. Images are RGB in [0,1] normalised with
ImageNet statistics (torchvision VGG convention) instead of Caffe's BGR 0-255.
"""
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.backbones import vgg
from jaxseg.models.heads import FCNHead
from jaxseg.models.registry import register
from jaxseg.models.segmentation import SegmentationModel, compute_dtype, make_backbone


class FCN(nn.Module):
  """FCN-32s/16s/8s on VGG16 (Caffe geometry).

  Attributes:
    num_classes: output channels.
    output_stride: 32, 16 or 8 (FCN-32s, FCN-16s, FCN-8s).
    widths: VGG16 stage widths (thin variants for tests via ``vgg16_widths``).
    fc_features: channels of fc6/fc7 (4096).
    dropout: rate after fc6 and fc7 (rng stream "dropout").
    at_once: scale pool4 by 0.01 and pool3 by 1e-4 (all-at-once training).
    trainable_upsampling: learn the bilinear-initialised transposed convs.
    mean, std, dtype: input normalisation and computation dtype.
    remat: recompute each VGG stage in the backward pass (``vgg.VGG16``).
  """
  num_classes: int
  output_stride: int = 8
  widths: Sequence[int] = vgg.VGG16_WIDTHS
  fc_features: int = 4096
  dropout: float = 0.5
  at_once: bool = False
  trainable_upsampling: bool = False
  mean: Sequence[float] = layers.IMAGENET_MEAN
  std: Sequence[float] = layers.IMAGENET_STD
  dtype: Any = jnp.float32
  remat: bool = False

  def _score(self, x, name):
    return layers.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.zeros,
                   dtype=self.dtype, name=name)(x)

  def _up(self, x, k, s, name):
    return layers.BilinearConvTranspose(self.num_classes, k, s, trainable=self.trainable_upsampling,
                                        dtype=self.dtype, name=name)(x)

  @nn.compact
  def __call__(self, images, *, train: bool):
    """images float [N,H,W,3] in [0,1] -> logits float32 [N,H,W,num_classes]."""
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f"fcn: output_stride must be 8, 16 or 32, got {self.output_stride!r}")
    layers.check_images(images, f"fcn{self.output_stride}s")
    _, h, w, _ = images.shape
    x = layers.normalize(images, self.mean, self.std, self.dtype)
    feats = vgg.VGG16(widths=self.widths, conv1_padding=100, ceil_mode=True,
                      dtype=self.dtype, remat=self.remat, name="backbone")(x, train=train)
    x = feats["pool5"]
    # fc6 as shifted matmuls: XLA:CPU's gradient of a 7x7 conv on a small map is very slow.
    x = layers.MatmulConv(self.fc_features, (7, 7), kernel_init=vgg.he_normal, dtype=self.dtype,
                          name="fc6")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    x = layers.Conv(self.fc_features, (1, 1), kernel_init=vgg.he_normal, dtype=self.dtype,
                name="fc7")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    x = self._score(x, "score_fr")

    if self.output_stride == 32:
      x = self._up(x, 64, 32, "upscore")
      offset = 19
    else:
      x = self._up(x, 4, 2, "upscore2")
      pool4 = feats["pool4"] * 0.01 if self.at_once else feats["pool4"]
      x = x + layers.crop_to(self._score(pool4, "score_pool4"), (5, 5), x.shape[1:3])
      if self.output_stride == 16:
        x = self._up(x, 32, 16, "upscore16")
        offset = 27
      else:
        x = self._up(x, 4, 2, "upscore_pool4")
        pool3 = feats["pool3"] * 1e-4 if self.at_once else feats["pool3"]
        x = x + layers.crop_to(self._score(pool3, "score_pool3"), (9, 9), x.shape[1:3])
        x = self._up(x, 16, 8, "upscore8")
        offset = 31
    return layers.crop_to(x, (offset, offset), (h, w)).astype(jnp.float32)


def _fcn_builder(output_stride):
  def builder(*, num_classes: int, backbone: str = "vgg16", width_multiplier: float = 1.0,
              fc_features: Optional[int] = None, **kwargs) -> FCN:
    if backbone != "vgg16":
      raise ValueError(f"fcn{output_stride}s: backbone must be 'vgg16', got {backbone!r} "
                       "(the ResNet FCNs are registered as fcn_resnet50 / fcn_resnet101)")
    if fc_features is None:
      fc_features = max(1, int(round(4096 * width_multiplier)))
    return FCN(num_classes=num_classes, output_stride=output_stride,
               widths=vgg.vgg16_widths(width_multiplier), fc_features=fc_features, **kwargs)
  builder.__name__ = f"fcn{output_stride}s"
  builder.__doc__ = (f"FCN-{output_stride}s on VGG16; ``width_multiplier`` thins every layer "
                     "(fc6/fc7 included) for tests and small experiments.")
  return builder


fcn32s = register("fcn32s")(_fcn_builder(32))
fcn16s = register("fcn16s")(_fcn_builder(16))
fcn8s = register("fcn8s")(_fcn_builder(8))

FCN32s = functools.partial(FCN, output_stride=32)
FCN16s = functools.partial(FCN, output_stride=16)
FCN8s = functools.partial(FCN, output_stride=8)


def _torchvision_fcn(depth):
  def builder(*, num_classes: int, aux: bool = True, width_multiplier: float = 1.0,
              backbone: str = f"resnet{depth}", output_stride: int = 8,
              **kwargs) -> SegmentationModel:
    backbone = make_backbone(f"fcn_resnet{depth}", backbone, (f"resnet{depth}",),
                             output_stride=output_stride, supported_strides=(8,),
                             width_multiplier=width_multiplier, **kwargs)
    dtype = compute_dtype(kwargs)
    return SegmentationModel(
        backbone=backbone,
        classifier=FCNHead(num_classes, in_key="c5", dtype=dtype),
        aux_classifier=FCNHead(num_classes, in_key="c4", dtype=dtype) if aux else None)
  builder.__name__ = f"fcn_resnet{depth}"
  builder.__doc__ = (
      f"torchvision ``fcn_resnet{depth}``: ResNet-{depth} at output stride 8 (layer3/4 "
      "dilated, first block at the previous rate), ``FCNHead`` on c5 and, with ``aux``, on "
      "c4; logits resized with align_corners=False. State-dict compatible with "
      f"``torchvision.models.segmentation.fcn_resnet{depth}(aux_loss=aux)``.")
  return builder


fcn_resnet50 = register("fcn_resnet50")(_torchvision_fcn(50))
fcn_resnet101 = register("fcn_resnet101")(_torchvision_fcn(101))
