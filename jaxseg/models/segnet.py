"""SegNet (Badrinarayanan, Kendall & Cipolla, PAMI 2017), the SegNet-Tutorial Caffe model.

Encoder: the 13 VGG16 convs, each followed by BatchNorm and ReLU, and five 2x2
stride-2 max pools in Caffe ceil mode that remember their argmax. Decoder:
each stage unpools into the stored pre-pool shape (values at their argmax
positions, zeros elsewhere; CamVid 360x480 goes 180, 90, 45, 23, 12 and back
exactly) and applies conv-BN-ReLU stacks (stage 5: 512,512,512; 4: 512,512,256;
3: 256,256,128; 2: 128,64; 1: 64) and a final 3x3 conv to the classes without
BN. Any input size >= 1 works and the logits have the input's size. Convs use
He (msra) init and BN shifts start at 0.001, as in the tutorial prototxt.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.backbones import vgg
from jaxseg.models.registry import register


class SegNet(nn.Module):
  """SegNet with a VGG16-BN encoder and an argmax-unpooling decoder.

  Attributes:
    num_classes: output channels.
    widths: VGG16 stage widths (``vgg16_widths(m)`` for thin variants).
    mean, std, dtype: input normalisation and computation dtype.
    remat: recompute each encoder stage in the backward pass (``vgg.VGG16``).
  """
  num_classes: int
  widths: Sequence[int] = vgg.VGG16_WIDTHS
  mean: Sequence[float] = layers.IMAGENET_MEAN
  std: Sequence[float] = layers.IMAGENET_STD
  dtype: Any = jnp.float32
  remat: bool = False

  def _decoder_widths(self):
    w1, w2, w3, w4, w5 = self.widths
    return {5: (w5, w5, w4), 4: (w4, w4, w3), 3: (w3, w3, w2), 2: (w2, w1), 1: (w1,)}

  @nn.compact
  def __call__(self, images, *, train: bool):
    """images float [N,H,W,3] in [0,1] -> logits float32 [N,H,W,num_classes]."""
    layers.check_images(images, "segnet")
    x = layers.normalize(images, self.mean, self.std, self.dtype)
    feats = vgg.VGG16(widths=self.widths, norm="batch", norm_bias_init=0.001, pool_type="argmax",
                      dtype=self.dtype, remat=self.remat, name="backbone")(x, train=train)
    x = feats["pool5"]
    for stage in range(5, 0, -1):
      x = layers.max_unpool(x, feats[f"indices{stage}"], feats[f"conv{stage}"].shape[1:3])
      widths = self._decoder_widths()[stage]
      # Caffe names count down: conv5_3_D, conv5_2_D, conv5_1_D, ...
      depth = vgg.VGG16_DEPTHS[stage - 1]
      for j, width in enumerate(widths):
        name = f"conv{stage}_{depth - j}_D"
        x = layers.Conv(width, (3, 3), padding=[(1, 1), (1, 1)], kernel_init=vgg.he_normal,
                    dtype=self.dtype, name=name)(x)
        x = layers.batch_norm(use_running_average=not train,
                              bias_init=nn.initializers.constant(0.001), dtype=self.dtype,
                              name=f"{name}_bn")(x)
        x = nn.relu(x)
    x = layers.Conv(self.num_classes, (3, 3), padding=[(1, 1), (1, 1)], kernel_init=vgg.he_normal,
                dtype=self.dtype, name="conv1_1_D")(x)
    return x.astype(jnp.float32)


@register("segnet")
def segnet(*, num_classes: int, backbone: str = "vgg16", width_multiplier: float = 1.0,
           **kwargs) -> SegNet:
  """SegNet on VGG16-BN; ``width_multiplier`` thins every layer."""
  if backbone != "vgg16":
    raise ValueError(f"segnet: backbone must be 'vgg16', got {backbone!r}")
  return SegNet(num_classes=num_classes, widths=vgg.vgg16_widths(width_multiplier), **kwargs)
