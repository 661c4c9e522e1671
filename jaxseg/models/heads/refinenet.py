"""RefineNet (Lin et al. 2017) blocks and the RefineNet-4 cascade.

Following the paper and the released code (DrSleep's port, best-of-acrv/refinenet):
* ``ResidualConvUnit`` (RCU): ReLU -> 3x3 conv (bias) -> ReLU -> 3x3 conv (no bias) + x.
* ``MultiResolutionFusion``: a 3x3 conv (no bias) on each path to the finest path's
  width, the coarser paths bilinearly upsampled (``align_corners=True``) to the finest
  size, summed.
* ``ChainedResidualPooling`` (CRP): after a ReLU, ``top = conv3x3(maxpool5x5 s1 p2(top))``
  repeated ``stages`` times (4 in the code, 2 in the paper figure), each added to x.
* ``RefineNetBlock``: 2 RCUs on its backbone path -> fusion with the previous block's
  output (if any) -> CRP -> output RCUs (3 in the code, 1 in the paper). As in the
  released code, the previous block's output enters the fusion through its 3x3 conv
  only (the paper's figure draws RCUs on every input).
* ``RefineNetHead``: dropout 0.5 on c4 and c5; input 3x3 convs (no bias) 2048 -> 512 for
  RefineNet-4 and 1024/512/256 -> 256 for RefineNet-3..1; the cascade 4 -> 1, each block
  fusing its own path with the previous block's output; dropout and a 3x3 classifier
  (bias) at stride 4.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers


def _conv3x3(features, name, use_bias=False, dtype=jnp.float32):
  return layers.conv2d(features, 3, name=name, use_bias=use_bias, dtype=dtype,
                       kernel_init=nn.initializers.normal(0.01))


class ResidualConvUnit(nn.Module):
  """x + conv(ReLU(conv(ReLU(x)))) with 3x3 convs at x's width."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    y = _conv3x3(c, "conv1", use_bias=True, dtype=self.dtype)(nn.relu(x))
    y = _conv3x3(c, "conv2", dtype=self.dtype)(nn.relu(y))
    return x + y


class MultiResolutionFusion(nn.Module):
  """Paths (finest first) -> 3x3 conv each to ``features`` -> upsample -> sum."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, paths: Sequence[Any]):
    size = paths[0].shape[1:3]
    out = 0.0
    for i, x in enumerate(paths):
      y = _conv3x3(self.features, f"conv{i + 1}", dtype=self.dtype)(x)
      out = out + layers.resize_bilinear(y, size, align_corners=True)
    return out


class ChainedResidualPooling(nn.Module):
  """ReLU, then ``stages`` times: top = conv3x3(maxpool 5x5 s1 p2(top)); x += top."""
  stages: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(x)
    top = x
    for i in range(self.stages):
      top = layers.max_pool(top, 5, 1, 2)
      top = _conv3x3(x.shape[-1], f"conv{i + 1}", dtype=self.dtype)(top)
      x = x + top
    return x


class RefineNetBlock(nn.Module):
  """One RefineNet: RCUs on the backbone path, fusion, CRP, output RCUs.

  ``__call__(paths)``: ``paths[0]`` is the (reduced) backbone feature map, ``paths[1:]``
  coarser outputs of earlier blocks; the output has ``paths[0]``'s size and
  ``features`` channels.
  """
  features: int
  input_rcus: int = 2
  crp_stages: int = 4
  output_rcus: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, paths: Sequence[Any]):
    x = paths[0]
    for r in range(self.input_rcus):
      x = ResidualConvUnit(self.dtype, name=f"rcu{r + 1}")(x)
    if len(paths) > 1:
      x = MultiResolutionFusion(self.features, self.dtype, name="fusion")([x, *paths[1:]])
    x = ChainedResidualPooling(self.crp_stages, self.dtype, name="crp")(x)
    for r in range(self.output_rcus):
      x = ResidualConvUnit(self.dtype, name=f"out_rcu{r + 1}")(x)
    return x


class RefineNetHead(nn.Module):
  """The RefineNet-4 cascade on c2..c5 -> logits at c2's size.

  Attributes:
    features: width of RefineNet-3..1 (256); RefineNet-4 runs at ``2 * features``.
    crp_stages, output_rcus: 4 and 3 as released (the paper's figure: 2 and 1).
    dropout: on c4, c5 and before the classifier (0.5).
  """
  num_classes: int
  features: int = 256
  crp_stages: int = 4
  output_rcus: int = 3
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, *, train: bool):
    drop = nn.Dropout(self.dropout, deterministic=not train)
    levels = [feats["c5"], feats["c4"], feats["c3"], feats["c2"]]
    levels[0], levels[1] = drop(levels[0]), drop(levels[1])
    x = None
    for i, level in enumerate(levels):
      width = 2 * self.features if i == 0 else self.features
      y = _conv3x3(width, f"reduce{4 - i}", dtype=self.dtype)(level)
      paths = [y] if x is None else [y, x]
      x = RefineNetBlock(width, 2, self.crp_stages, self.output_rcus, self.dtype,
                         name=f"refinenet{4 - i}")(paths)
    x = drop(x)
    return _conv3x3(self.num_classes, "classifier", use_bias=True, dtype=self.dtype)(x)
