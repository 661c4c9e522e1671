"""ResNet + feature pyramid network, torchvision's ``resnet_fpn_backbone``.

``ResNetFPN`` holds the ResNet as ``body`` (frozen BatchNorm, torchvision's layer names) and
the ``FPN`` as ``fpn``: a 1x1 lateral conv ``inner_i`` and a 3x3 output conv ``layer_i`` per
level C2..C5 (i = 0..3), a nearest-neighbour top-down path, and P6 = P5 subsampled by 2
(``LastLevelMaxPool``: ``max_pool2d(P5, 1, 2)``).
"""
import functools
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.backbones import resnet

# torchvision FPN init: kaiming_uniform_(a=1) (gain 1, bound sqrt(3 / fan_in)), bias 0.
fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def upsample_nearest(x, size: Tuple[int, int]):
  """``F.interpolate(x, size, mode="nearest")`` on NHWC: source index floor(dst * in / out)."""
  h, w = x.shape[1:3]
  oh, ow = size
  if (oh, ow) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = jnp.asarray([min(i * h // oh, h - 1) for i in range(oh)])
  cols = jnp.asarray([min(j * w // ow, w - 1) for j in range(ow)])
  return x[:, rows][:, :, cols]


class FPN(nn.Module):
  """Feature pyramid on C2..C5: returns (P2, P3, P4, P5, P6), each with ``channels``.

  Attributes:
    channels: output channels of every level (256 in torchvision).
    dtype: computation dtype.
  """
  channels: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[Any]) -> Tuple[Any, ...]:
    def inner(i):
      return layers.Conv(self.channels, (1, 1), kernel_init=fpn_init, bias_init=nn.initializers.zeros,
                     dtype=self.dtype, name=f"inner_{i}")

    def layer(i):
      return layers.Conv(self.channels, (3, 3), padding=[(1, 1), (1, 1)], kernel_init=fpn_init,
                     bias_init=nn.initializers.zeros, dtype=self.dtype, name=f"layer_{i}")

    last = inner(len(feats) - 1)(feats[-1])
    results = [layer(len(feats) - 1)(last)]
    for i in range(len(feats) - 2, -1, -1):
      lateral = inner(i)(feats[i])
      last = lateral + upsample_nearest(last, lateral.shape[1:3])
      results.insert(0, layer(i)(last))
    # LastLevelMaxPool: a 1x1 max pool with stride 2 is plain subsampling.
    results.append(results[-1][:, ::2, ::2])
    return tuple(results)


class ResNetFPN(nn.Module):
  """``body`` (ResNet, frozen BN) -> ``fpn`` (FPN): images [N,H,W,3] in [0,1] -> P2..P6.

  Attributes:
    arch: resnet18, resnet34, resnet50 or resnet101.
    width_multiplier: scales the ResNet widths (thin variants for tests).
    frozen_bn_eps: epsilon of the frozen BatchNorms (1e-5; 0.0 for torchvision's legacy
      ``*_COCO_V1`` detection weights).
    fpn_channels: FPN output channels.
    dtype: computation dtype.
    remat: recompute each residual block in the backward pass (``resnet.ResNet``).
  The ResNet normalises the images with the ImageNet mean/std (torchvision's transform).
  """
  arch: str = "resnet50"
  width_multiplier: float = 1.0
  frozen_bn_eps: float = 1e-5
  fpn_channels: int = 256
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool) -> Tuple[Any, ...]:
    if self.arch not in RESNETS:
      raise ValueError(f"maskrcnn: backbone {self.arch!r} is not supported; "
                       f"supported: {', '.join(RESNETS)}")
    widths = tuple(max(1, int(round(w * self.width_multiplier))) for w in (64, 128, 256, 512))
    norm = functools.partial(layers.FrozenBatchNorm, epsilon=self.frozen_bn_eps)
    body = resnet.ResNet(stage_sizes=resnet.STAGE_SIZES[self.arch],
                         block=resnet.BLOCKS[self.arch], widths=widths,
                         stem_width=widths[0], norm=norm, dtype=self.dtype, remat=self.remat,
                         name="body")
    feats = body(images, train=train)
    return FPN(self.fpn_channels, self.dtype, name="fpn")(
        [feats[k] for k in ("c2", "c3", "c4", "c5")])
