"""MobileNetV2 (Sandler et al. 2018) in torchvision's layout, with dilation.

``features.0`` is a 3x3 stride-2 conv-BN-ReLU6 (32 channels); ``features.1..17`` are
inverted residual blocks (expand 1x1 -> depthwise 3x3 -> linear 1x1, identity
shortcut when the stride is 1 and the width unchanged) with (t, c, n, s) =
(1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1);
``features.18`` is a 1x1 conv to 1280, and the classifier is dropout 0.2 + ``classifier.1``
(Linear). Flax module names equal torchvision's state-dict names, so its ImageNet file
converts structurally (``jaxseg.convert``).

For dense prediction (``output_stride`` 8 or 16) the strided depthwise convs past the
output stride keep stride 1 and later blocks dilate: like ResNet's rule and TF
DeepLab's MobileNet, the block that would have strided uses the previous rate and
the blocks after it the doubled one.

``remat=True`` puts every inverted residual block (``features.1..17``) under
``flax.linen.remat`` (``jax.checkpoint``, default policy: only a block's input is stored,
its expanded 6x-wide activations are recomputed in the backward pass); parameters and
results are those of ``remat=False``.
"""
import functools
from typing import Any, Callable, Dict, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers

# (expand ratio t, channels c, repeats n, first stride s)
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# The last features index of each nominal stride: c2 (4) .. c5 (32); stem = stride 2.
FEATURE_INDICES = {"stem": 1, "c2": 3, "c3": 6, "c4": 13, "c5": 17}
OUTPUT_STRIDES = (8, 16, 32)


def make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision's ``_make_divisible``: round to a multiple of 8, never down by > 10%."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class ConvNormReLU6(nn.Module):
  """torchvision ``Conv2dNormActivation``: conv (no bias) "0" -> norm "1" -> ReLU6."""
  features: int
  kernel: int = 3
  stride: int = 1
  dilation: int = 1
  groups: int = 1
  norm: Callable = layers.batch_norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.groups == 1:
      x = layers.conv2d(self.features, self.kernel, self.stride, self.dilation, name="0",
                        dtype=self.dtype)(x)
    elif self.groups == x.shape[-1] == self.features:
      x = layers.DepthwiseConv(self.kernel, self.stride, self.dilation, dtype=self.dtype,
                               name="0")(x)
    else:
      raise ValueError(f"mobilenet_v2: groups must be 1 or the channel count, got {self.groups}")
    return nn.relu6(self.norm(name="1")(x))


class InvertedResidualLayers(nn.Module):
  """The ``conv`` Sequential of an inverted residual block (torch indices as names)."""
  hidden: int
  features: int
  stride: int
  dilation: int
  expand: bool
  norm: Callable
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    i = 0
    if self.expand:
      x = ConvNormReLU6(self.hidden, 1, norm=self.norm, dtype=self.dtype, name="0")(x)
      i = 1
    x = ConvNormReLU6(self.hidden, 3, self.stride, self.dilation, groups=self.hidden,
                      norm=self.norm, dtype=self.dtype, name=str(i))(x)
    x = layers.Conv(self.features, (1, 1), use_bias=False, kernel_init=layers.kaiming_fan_out,
                dtype=self.dtype, name=str(i + 1))(x)
    return self.norm(name=str(i + 2))(x)


class InvertedResidual(nn.Module):
  """Expand (1x1, t x) -> depthwise 3x3 -> project (1x1, linear) [+ identity]."""
  features: int
  stride: int
  expand_ratio: int
  dilation: int = 1
  norm: Callable = layers.batch_norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = int(round(x.shape[-1] * self.expand_ratio))
    y = InvertedResidualLayers(hidden, self.features, self.stride, self.dilation,
                               self.expand_ratio != 1, self.norm, self.dtype, name="conv")(x)
    if self.stride == 1 and x.shape[-1] == self.features:
      return x + y
    return y


# Made once: nn.remat builds a new Module class per call.
RematInvertedResidual = nn.remat(InvertedResidual)


class Features(nn.Module):
  """torchvision's ``features`` Sequential; returns every block's output in order."""
  width_multiplier: float
  output_stride: int
  norm: Callable
  last_conv: bool
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = RematInvertedResidual if self.remat else InvertedResidual
    outs = []
    x = ConvNormReLU6(make_divisible(32 * self.width_multiplier), 3, 2, norm=self.norm,
                      dtype=self.dtype, name="0")(x)
    outs.append(x)
    current, dilation, index = 2, 1, 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
      width = make_divisible(c * self.width_multiplier)
      for i in range(n):
        stride = s if i == 0 else 1
        block_dilation = dilation
        if stride > 1 and current * stride > self.output_stride:
          # Past the output stride: keep the resolution, dilate the blocks after this one.
          dilation *= stride
          stride = 1
        elif stride > 1:
          current *= stride
        x = block(width, stride, t, block_dilation, self.norm, self.dtype, name=str(index))(x)
        outs.append(x)
        index += 1
    if self.last_conv:
      last = make_divisible(1280 * max(1.0, self.width_multiplier))
      outs.append(ConvNormReLU6(last, 1, norm=self.norm, dtype=self.dtype,
                                name=str(index))(x))
    return outs


class MobileNetV2(nn.Module):
  """MobileNetV2 feature extractor (and optionally the ImageNet classifier).

  Attributes:
    width_multiplier: torchvision's ``width_mult`` (channels rounded to multiples of 8).
    output_stride: 8, 16 or 32.
    num_classes: adds ``features.18`` (1x1 conv to 1280), global average pooling,
      dropout 0.2 and ``classifier.1``, returned as ``feats["logits"]`` [N, num_classes].
    dropout: classifier dropout rate (rng stream "dropout").
    norm: norm factory taking ``name=`` (``use_running_average`` bound from ``train``).
    mean, std, normalize, dtype: as ``ResNet``.
    remat: recompute each inverted residual block in the backward pass (module docstring).

  ``__call__(images [N,H,W,3], *, train) -> {"stem", "c2".."c5"[, "logits"]}``: stem is
  ``features.1`` (16 ch, stride 2), c2 ``features.3`` (24, 4), c3 ``features.6`` (32, 8),
  c4 ``features.13`` (96, 16), c5 ``features.17`` (320, 32) at width 1.
  """
  width_multiplier: float = 1.0
  output_stride: int = 32
  num_classes: Optional[int] = None
  dropout: float = 0.2
  norm: Callable = layers.batch_norm
  mean: Sequence[float] = layers.IMAGENET_MEAN
  std: Sequence[float] = layers.IMAGENET_STD
  normalize: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool) -> Dict[str, Any]:
    if self.output_stride not in OUTPUT_STRIDES:
      raise ValueError(f"mobilenet_v2: output_stride must be one of {OUTPUT_STRIDES}, got "
                       f"{self.output_stride!r}")
    if self.width_multiplier <= 0:
      raise ValueError(f"mobilenet_v2: width_multiplier must be positive, got "
                       f"{self.width_multiplier}")
    layers.check_images(images, "mobilenet_v2")
    norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
    x = images
    if self.normalize:
      x = layers.normalize(images, self.mean, self.std, self.dtype)
    outs = Features(self.width_multiplier, self.output_stride, norm,
                    self.num_classes is not None, self.dtype, self.remat, name="features")(x)
    feats = {key: outs[i] for key, i in FEATURE_INDICES.items()}
    if self.num_classes is not None:
      feats["logits"] = Classifier(self.num_classes, self.dropout, self.dtype,
                                   name="classifier")(outs[-1], train=train)
    return feats


class Classifier(nn.Module):
  """Global average pool -> dropout "0" -> Linear "1" (torchvision's ``classifier``)."""
  num_classes: int
  dropout: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Dropout(self.dropout, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                    dtype=self.dtype, name="1")(x)

