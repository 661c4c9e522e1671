"""Atrous spatial pyramid pooling heads (DeepLab v2, v3, v3+).

* ``ASPP`` (v3): parallel 1x1 and three dilated 3x3 convs (256 each, norm, ReLU) and an
  image-pooling branch (global mean -> 1x1 -> norm -> ReLU -> broadcast), concatenated
  and projected by a 1x1 conv (norm, ReLU, dropout). The paper/TF form lists image
  pooling first and drops 0.1; torchvision lists it last and drops 0.5.
* ``DeepLabHead``: ASPP -> [torchvision's extra 3x3 conv-norm-ReLU] -> 1x1 classifier.
* ``DeepLabV3PlusHead``: ASPP on ``c5``, upsampled to the stride-4 ``c2`` skip, which is
  reduced to 48 channels; concat -> two 3x3 convs (256) -> 1x1 classifier.
* ``ASPPSumHead`` (v2 on ResNet): one dilated 3x3 conv to the classes per rate,
  **summed** (the VGG form with fc6-fc8 branches is ``deeplab.ASPPSum``).

Module names follow torchvision's ``DeepLabHead`` (``0.convs.{i}.{0,1}``,
``0.project.{0,1}``, ``1``, ``2``, ``4``), so its weights convert structurally.
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers


class _ConvNormReLU(nn.Module):
  """conv "0" -> norm "1" -> ReLU (a torchvision ``Sequential`` of three)."""
  features: int
  kernel: int = 1
  dilation: int = 1
  norm: Callable = layers.batch_norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.conv2d(self.features, self.kernel, 1, self.dilation, name="0", dtype=self.dtype)(x)
    return nn.relu(self.norm(name="1")(x))


class _ImagePooling(nn.Module):
  """Global average pool -> 1x1 conv "1" -> norm "2" -> ReLU -> broadcast back."""
  features: int
  norm: Callable = layers.batch_norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    y = layers.conv2d(self.features, 1, name="1", dtype=self.dtype)(pooled)
    y = nn.relu(self.norm(name="2")(y))
    # Bilinear resize of a 1x1 map is a broadcast for either align_corners setting.
    return jnp.broadcast_to(y, x.shape[:3] + (self.features,))


class _Branches(nn.Module):
  """The ``convs`` ModuleList: branch i named ``str(i)`` in concatenation order."""
  features: int
  rates: Sequence[int]
  pool_first: bool
  norm: Callable
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    specs = [("conv", 1, 1)] + [("conv", 3, r) for r in self.rates]
    specs = [("pool", 0, 0)] + specs if self.pool_first else specs + [("pool", 0, 0)]
    outs = []
    for i, (kind, kernel, rate) in enumerate(specs):
      if kind == "pool":
        outs.append(_ImagePooling(self.features, self.norm, self.dtype, name=str(i))(x))
      else:
        outs.append(_ConvNormReLU(self.features, kernel, rate, self.norm, self.dtype,
                                  name=str(i))(x))
    return jnp.concatenate(outs, axis=-1)


class ASPP(nn.Module):
  """DeepLab v3 ASPP: [N,h,w,C_in] -> [N,h,w,features].

  Attributes:
    rates: dilation of the three 3x3 branches ((6,12,18) at OS16, (12,24,36) at OS8).
    features: channels of every branch and of the projection (256).
    pool_first: image pooling is the first branch (TF/paper) or the last (torchvision).
    dropout: after the projection (paper 0.1, torchvision 0.5).
  In training, the image-pooling norm sees one value per image and channel; batch
  statistics over a batch of 1 are degenerate (PyTorch raises), so that is refused.
  """
  rates: Sequence[int] = (6, 12, 18)
  features: int = 256
  pool_first: bool = True
  dropout: float = 0.1
  norm: Callable = layers.batch_norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if train and x.shape[0] == 1 and self.norm is layers.batch_norm:
      raise ValueError("ASPP: training-mode BatchNorm on the image-pooling branch needs a "
                       "batch of at least 2 images (its statistics are over N x 1 x 1)")
    norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
    x = _Branches(self.features, tuple(self.rates), self.pool_first, norm, self.dtype,
                  name="convs")(x)
    x = _ConvNormReLU(self.features, 1, 1, norm, self.dtype, name="project")(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class DeepLabHead(nn.Module):
  """DeepLab v3 head: ASPP on ``in_key`` then the classifier.

  ``extra_conv=True`` is torchvision's ``DeepLabHead`` (a 3x3 conv-norm-ReLU after the
  ASPP; module names ``0``, ``1``, ``2``, ``4``); ``False`` the paper's (ASPP ``0`` ->
  1x1 classifier ``1``).
  """
  num_classes: int
  rates: Sequence[int] = (6, 12, 18)
  in_key: str = "c5"
  features: int = 256
  pool_first: bool = True
  dropout: float = 0.1
  extra_conv: bool = False
  norm: Callable = layers.batch_norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, *, train: bool):
    x = ASPP(tuple(self.rates), self.features, self.pool_first, self.dropout, self.norm,
             self.dtype, name="0")(feats[self.in_key], train=train)
    name = "1"
    if self.extra_conv:
      x = layers.conv2d(self.features, 3, name="1", dtype=self.dtype)(x)
      x = nn.relu(self.norm(use_running_average=not train, dtype=self.dtype, name="2")(x))
      name = "4"
    return layers.conv2d(self.num_classes, 1, use_bias=True, name=name, dtype=self.dtype,
                         kernel_init=layers.torch_default_init)(x)


class DeepLabV3PlusHead(nn.Module):
  """DeepLab v3+ decoder: ASPP(c5) upsampled x4 onto the reduced stride-4 skip.

  The ASPP output is resized (bilinear, ``align_corners``; TF DeepLab uses True) to the
  size of ``feats[skip_key]``, concatenated after the skip's 1x1 reduction to
  ``skip_features`` (48), then two 3x3 conv-norm-ReLU (256) and a 1x1 classifier.
  Output at the skip's resolution.
  """
  num_classes: int
  rates: Sequence[int] = (6, 12, 18)
  in_key: str = "c5"
  skip_key: str = "c2"
  features: int = 256
  skip_features: int = 48
  dropout: float = 0.1
  align_corners: bool = True
  norm: Callable = layers.batch_norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, *, train: bool):
    norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
    x = ASPP(tuple(self.rates), self.features, True, self.dropout, self.norm, self.dtype,
             name="aspp")(feats[self.in_key], train=train)
    skip = _ConvNormReLU(self.skip_features, 1, 1, norm, self.dtype,
                         name="skip_reduce")(feats[self.skip_key])
    x = layers.resize_bilinear(x, skip.shape[1:3], align_corners=self.align_corners)
    x = jnp.concatenate([x, skip], axis=-1)
    for i in range(2):
      x = _ConvNormReLU(self.features, 3, 1, norm, self.dtype, name=f"fuse{i + 1}")(x)
    return layers.conv2d(self.num_classes, 1, use_bias=True, name="classifier",
                         dtype=self.dtype, kernel_init=nn.initializers.normal(0.01))(x)


class ASPPSumHead(nn.Module):
  """DeepLab v2 ASPP-L on ResNet: sum over rates of a dilated 3x3 conv to the classes."""
  num_classes: int
  rates: Sequence[int] = (6, 12, 18, 24)
  in_key: str = "c5"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, *, train: bool):
    del train
    x = feats[self.in_key]
    out = 0.0
    for i, rate in enumerate(self.rates):
      out = out + layers.conv2d(self.num_classes, 3, 1, rate, use_bias=True,
                                name=f"branch{i + 1}", dtype=self.dtype,
                                kernel_init=nn.initializers.normal(0.01))(x)
    return out
