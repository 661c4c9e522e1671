"""VGG16 convolutional body with the pooling variants the Caffe-era models use.

One module covers the FCN (ceil-mode pools, conv1_1 padded by 100), SegNet (BN
after every conv, argmax pools), Dilation (unpadded convs, no pool4/pool5,
dilated conv5) and DeepLab v1/v2 (3x3 pools, stride-1 pool4/pool5, dilated
conv5) encoders. Layers keep the Caffe names ``conv{stage}_{i}`` (and
``conv{stage}_{i}_bn``) so converted checkpoints and papers read the same.

``remat=True`` puts the convolutions of each stage (conv-[BN]-ReLU x 2 or 3, not the pool)
under ``flax.linen.remat`` (``jax.checkpoint``, default policy: the stage input is stored,
its inner activations are recomputed in the backward pass). The stage is a lifted function
of the VGG module itself, so the layers keep their names (``conv3_2``, not ``stage3/...``)
and parameters and results equal those of ``remat=False``.
"""
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers

VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_DEPTHS = (2, 2, 3, 3, 3)
# (window, stride, padding) of the 2x2 stride-2 pools of the original network.
DEFAULT_POOLS = ((2, 2, 0),) * 5

he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def vgg16_widths(width_multiplier: float = 1.0) -> Tuple[int, ...]:
  """Stage widths scaled by ``width_multiplier`` (at least 1 channel each)."""
  if width_multiplier <= 0:
    raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")
  return tuple(max(1, int(round(w * width_multiplier))) for w in VGG16_WIDTHS)


class VGG16(nn.Module):
  """VGG16 features: 13 3x3 convs in 5 stages, each stage optionally pooled.

  Attributes:
    widths: output channels of the 5 stages (``vgg16_widths(m)`` for thin ones).
    conv1_padding: padding of conv1_1 (FCN: 100).
    padded: False makes every other conv unpadded (Dilation front-end).
    conv5_dilation: dilation of the conv5 block (padding = dilation when padded).
    pools: per stage (window, stride, padding) or None for no pooling.
    ceil_mode: Caffe/torch ceil-mode output size for the pools.
    pool_type: "max" or "argmax" (2x2 s2 pools that also return indices, SegNet).
    norm: None or "batch" (BatchNorm after every conv, as torchvision vgg16_bn / SegNet).
    norm_bias_init: initial BN shift (SegNet: 0.001).
    kernel_init: conv kernel initializer (default He normal, fan-in).
    dtype: computation dtype.
    remat: recompute each stage's convolutions in the backward pass (module docstring).

  Returns from ``__call__``: a dict with, for every stage s in 1..5,
  ``conv{s}`` (the last ReLU output of the stage, before pooling) and
  ``pool{s}`` (after pooling; the same array when the stage has no pool),
  plus ``indices{s}`` for argmax pools.
  """
  widths: Sequence[int] = VGG16_WIDTHS
  conv1_padding: int = 1
  padded: bool = True
  conv5_dilation: int = 1
  pools: Sequence[Optional[Tuple[int, int, int]]] = DEFAULT_POOLS
  ceil_mode: bool = True
  pool_type: str = "max"
  norm: Optional[str] = None
  norm_bias_init: float = 0.0
  kernel_init: Callable = he_normal
  dtype: Any = jnp.float32
  remat: bool = False

  def _stage_convs(self, x, stage: int, width: int, depth: int, train: bool):
    """The conv-[BN]-ReLU layers of one stage, created in this module's scope."""
    dilation = self.conv5_dilation if stage == 5 else 1
    for i in range(1, depth + 1):
      if stage == 1 and i == 1:
        pad = self.conv1_padding
      else:
        pad = dilation if self.padded else 0
      name = f"conv{stage}_{i}"
      x = layers.Conv(width, (3, 3), padding=[(pad, pad), (pad, pad)],
                      kernel_dilation=(dilation, dilation), use_bias=True,
                      kernel_init=self.kernel_init, dtype=self.dtype, name=name)(x)
      if self.norm == "batch":
        x = layers.batch_norm(use_running_average=not train,
                              bias_init=nn.initializers.constant(self.norm_bias_init),
                              dtype=self.dtype, name=f"{name}_bn")(x)
      x = nn.relu(x)
    return x

  @nn.compact
  def __call__(self, x, *, train: bool) -> Dict[str, Any]:
    if len(self.widths) != 5 or len(self.pools) != 5:
      raise ValueError(f"VGG16 needs 5 widths and 5 pool specs, got {self.widths} / {self.pools}")
    if self.pool_type not in ("max", "argmax"):
      raise ValueError(f"VGG16: pool_type must be 'max' or 'argmax', got {self.pool_type!r}")
    if self.norm not in (None, "batch"):
      raise ValueError(f"VGG16: norm must be None or 'batch', got {self.norm!r}")
    out = {}
    for stage, (width, depth, pool) in enumerate(zip(self.widths, VGG16_DEPTHS, self.pools), 1):
      # A lifted function of this module (not a submodule), so the names stay conv{s}_{i}.
      convs = functools.partial(VGG16._stage_convs, stage=stage, width=width, depth=depth,
                                train=train)
      x = (nn.remat(convs) if self.remat else convs)(self, x)
      out[f"conv{stage}"] = x
      if pool is not None:
        window, stride, padding = pool
        if self.pool_type == "argmax":
          if (window, stride, padding) != (2, 2, 0) or not self.ceil_mode:
            raise ValueError("VGG16: argmax pooling is 2x2 stride 2 ceil mode only, got "
                             f"{pool} ceil_mode={self.ceil_mode}")
          x, out[f"indices{stage}"] = layers.argmax_pool(x)
        else:
          if x.shape[1] + 2 * padding < window or x.shape[2] + 2 * padding < window:
            raise ValueError(f"VGG16: stage {stage} map {x.shape[1]}x{x.shape[2]} is smaller "
                             f"than its {window}x{window} pool; the input is too small")
          x = layers.max_pool(x, window, stride, padding, ceil_mode=self.ceil_mode)
      out[f"pool{stage}"] = x
    return out


class VGG16Backbone(nn.Module):
  """VGG16 under the backbone contract (torchvision ``vgg16`` geometry, floor-mode pools).

  ``__call__(images [N,H,W,3] in [0,1], *, train)`` normalises and returns
  ``{"stem": pool1, "c2": pool2, "c3": pool3, "c4": pool4, "c5": pool5}`` (strides 2..32).
  ``output_stride`` 16 makes pool5 a 3x3 stride-1 pool; 8 does the same to pool4 and
  dilates conv5 by 2 (the DeepLab v1 recipe). ``norm="batch"`` is vgg16_bn; ``remat``
  recomputes each stage in the backward pass (``VGG16``). VGG has no
  ImageNet classifier here (convert torchvision's with ``convert.vgg16_state_dict``).
  """
  widths: Sequence[int] = VGG16_WIDTHS
  output_stride: int = 32
  norm: Optional[str] = None
  mean: Sequence[float] = layers.IMAGENET_MEAN
  std: Sequence[float] = layers.IMAGENET_STD
  normalize: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool) -> Dict[str, Any]:
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f"vgg16: output_stride must be one of (8, 16, 32), got "
                       f"{self.output_stride!r}")
    layers.check_images(images, "vgg16")
    x = images
    if self.normalize:
      x = layers.normalize(images, self.mean, self.std, self.dtype)
    dense = (3, 1, 1)
    pools = {32: DEFAULT_POOLS, 16: DEFAULT_POOLS[:4] + (dense,),
             8: DEFAULT_POOLS[:3] + (dense, dense)}[self.output_stride]
    out = VGG16(widths=self.widths, conv5_dilation=2 if self.output_stride == 8 else 1,
                pools=pools, ceil_mode=False, norm=self.norm, dtype=self.dtype,
                remat=self.remat, name="features")(x, train=train)
    return {"stem": out["pool1"], "c2": out["pool2"], "c3": out["pool3"], "c4": out["pool4"],
            "c5": out["pool5"]}
