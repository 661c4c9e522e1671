"""ResNet-18/34/50/101 in torchvision's layout, with dilation for dense prediction.

Torchvision semantics (He et al. 2016, "v1.5"): a 7x7 stride-2 stem conv, BN, ReLU
and a 3x3 stride-2 max pool (padded with -inf), then four stages ``layer1..layer4``
of Basic (18/34) or Bottleneck (50/101) blocks. A Bottleneck puts the stride on its
3x3 conv; the first block of a stage with a stride or a width change projects the
shortcut with a 1x1 conv + BN (``downsample``). Flax module names equal torchvision's
state-dict names (``layer3.0.downsample.1``...), so ``jaxseg.convert`` maps
torchvision weights structurally.

Dense prediction replaces strides by dilation (``output_stride`` 16: layer4; 8:
layer3 and layer4). As torchvision's ``replace_stride_with_dilation``, the first
block of a dilated stage keeps the previous dilation (layer3 = 1, 2, 2, ...; layer4 =
2, 4, 4 at OS8) unless ``dilate_first_block`` (hszhao/semseg's PSPNet, DeepLab v2:
every block of the stage at the new rate). ``multi_grid`` (DeepLab v3) multiplies the
last stage's per-block rates: (1, 2, 4) at OS16 gives 2, 4, 8. ``deep_stem`` is the
ResNet-C stem of PSPNet (three 3x3 convs 64, 64, 128 named conv1..3 / bn1..3).

``remat=True`` wraps every residual block in ``flax.linen.remat`` (``jax.checkpoint`` with
its default policy: nothing inside a block is saved for the backward pass; only the block's
input is kept and the block is recomputed while differentiating). It trades one extra
forward pass of the blocks for activation memory, for large inputs; parameter names, values
and results are those of ``remat=False`` (the blocks keep their ``name``).
"""
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers

conv = layers.conv2d

STAGE_SIZES = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
}
BLOCKS = {"resnet18": "basic", "resnet34": "basic", "resnet50": "bottleneck",
          "resnet101": "bottleneck"}
OUTPUT_STRIDES = (8, 16, 32)


def stage_dilations(output_stride: int) -> Tuple[Tuple[int, int], ...]:
  """(stride, dilation) of layer1..layer4 for an output stride of 8, 16 or 32."""
  if output_stride not in OUTPUT_STRIDES:
    raise ValueError(f"resnet: output_stride must be one of {OUTPUT_STRIDES}, got "
                     f"{output_stride!r}")
  out, current, dilation = [(1, 1)], 4, 1
  for _ in range(3):
    if current * 2 > output_stride:
      dilation *= 2
      out.append((1, dilation))
    else:
      current *= 2
      out.append((2, dilation))
  return tuple(out)


class Projection(nn.Module):
  """The shortcut projection ``downsample``: 1x1 conv (stride) -> norm (torch names 0, 1)."""
  features: int
  stride: int
  norm: Callable
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv(self.features, 1, self.stride, name="0", dtype=self.dtype)(x)
    return self.norm(name="1")(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34). Dilation applies to both convs."""
  planes: int
  stride: int = 1
  dilation: int = 1
  project: bool = False
  norm: Callable = layers.batch_norm
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = conv(self.planes, 3, self.stride, self.dilation, name="conv1", dtype=self.dtype)(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = conv(self.planes, 3, 1, self.dilation, name="conv2", dtype=self.dtype)(y)
    y = self.norm(name="bn2")(y)
    if self.project:
      x = Projection(self.planes, self.stride, self.norm, self.dtype, name="downsample")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 x4, torchvision's v1.5 bottleneck."""
  planes: int
  stride: int = 1
  dilation: int = 1
  project: bool = False
  norm: Callable = layers.batch_norm
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x):
    y = conv(self.planes, 1, name="conv1", dtype=self.dtype)(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = conv(self.planes, 3, self.stride, self.dilation, name="conv2", dtype=self.dtype)(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = conv(self.planes * 4, 1, name="conv3", dtype=self.dtype)(y)
    y = self.norm(name="bn3")(y)
    if self.project:
      x = Projection(self.planes * 4, self.stride, self.norm, self.dtype, name="downsample")(x)
    return nn.relu(x + y)


@functools.lru_cache(maxsize=None)
def rematted(block: type) -> type:
  """``nn.remat(block)``, made once per block class (the blocks take only ``x``)."""
  return nn.remat(block)


class Stage(nn.Module):
  """One ``layerN``: blocks named 0, 1, ... with the given per-block dilations.

  ``remat``: each block under ``jax.checkpoint`` (see the module docstring).
  """
  block: Any
  planes: int
  stride: int
  dilations: Sequence[int]
  norm: Callable
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = rematted(self.block) if self.remat else self.block
    for i, dilation in enumerate(self.dilations):
      stride = self.stride if i == 0 else 1
      project = i == 0 and (stride != 1 or x.shape[-1] != self.planes * self.block.expansion)
      x = block(self.planes, stride, dilation, project, self.norm, self.dtype, name=str(i))(x)
    return x


class ResNet(nn.Module):
  """ResNet feature extractor (and optionally the ImageNet classifier).

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
    block: "basic" or "bottleneck".
    widths: planes of layer1..layer4 (64, 128, 256, 512; thin variants for tests).
    stem_width: channels of the stem (64; the deep stem ends at twice this).
    deep_stem: three 3x3 stem convs (PSPNet) instead of one 7x7.
    output_stride: 8, 16 or 32 (see the module docstring).
    dilate_first_block: the first block of a dilated stage uses the new rate too.
    multi_grid: per-block rate multipliers of layer4 (DeepLab v3), cycled.
    num_classes: adds global average pooling + ``fc`` and ``feats["logits"]``.
    norm: norm factory taking ``name=`` (``layers.batch_norm``, ``layers.FrozenBatchNorm``);
      ``use_running_average`` is bound from ``train``.
    mean, std: input normalisation (images enter in [0, 1]); ``normalize=False`` skips it.
    dtype: computation dtype (parameters stay float32).
    remat: recompute each residual block in the backward pass (``jax.checkpoint``) instead
      of storing its activations; same parameters and results.

  ``__call__(images [N,H,W,3], *, train) -> {"stem", "c2", "c3", "c4", "c5"[, "logits"]}``:
  stem = after the max pool (stride 4), c2..c5 = layer1..layer4 (strides 4, 8, 16, 32 at
  OS32; channels 64..512 x expansion). Any input size >= 1 works.
  """
  stage_sizes: Sequence[int] = STAGE_SIZES["resnet50"]
  block: str = "bottleneck"
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  deep_stem: bool = False
  output_stride: int = 32
  dilate_first_block: bool = False
  multi_grid: Optional[Sequence[int]] = None
  num_classes: Optional[int] = None
  norm: Callable = layers.batch_norm
  mean: Sequence[float] = layers.IMAGENET_MEAN
  std: Sequence[float] = layers.IMAGENET_STD
  normalize: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool) -> Dict[str, Any]:
    if self.block not in ("basic", "bottleneck"):
      raise ValueError(f"resnet: block must be 'basic' or 'bottleneck', got {self.block!r}")
    if len(self.stage_sizes) != 4 or len(self.widths) != 4:
      raise ValueError("resnet: stage_sizes and widths need 4 entries each, got "
                       f"{self.stage_sizes} / {self.widths}")
    strides = stage_dilations(self.output_stride)
    layers.check_images(images, "resnet")
    norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
    x = images
    if self.normalize:
      x = layers.normalize(images, self.mean, self.std, self.dtype)
    if self.deep_stem:
      for i, (width, stride) in enumerate(((self.stem_width, 2), (self.stem_width, 1),
                                           (2 * self.stem_width, 1)), 1):
        x = conv(width, 3, stride, name=f"conv{i}", dtype=self.dtype)(x)
        x = nn.relu(norm(name=f"bn{i}")(x))
    else:
      x = conv(self.stem_width, 7, 2, name="conv1", dtype=self.dtype)(x)
      x = nn.relu(norm(name="bn1")(x))
    x = layers.max_pool(x, 3, 2, 1)
    feats = {"stem": x}
    block = BasicBlock if self.block == "basic" else Bottleneck
    previous = 1
    for s, (size, width, (stride, dilation)) in enumerate(
        zip(self.stage_sizes, self.widths, strides)):
      rates = [dilation] * size
      if not self.dilate_first_block:
        rates[0] = previous
      if s == 3 and self.multi_grid:
        rates = [dilation * self.multi_grid[i % len(self.multi_grid)] for i in range(size)]
      x = Stage(block, width, stride, tuple(rates), norm, self.dtype, self.remat,
                name=f"layer{s + 1}")(x)
      feats[f"c{s + 2}"] = x
      previous = dilation
    if self.num_classes is not None:
      pooled = jnp.mean(x, axis=(1, 2))
      feats["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="fc",
                                 kernel_init=layers.torch_default_init,
                                 bias_init=layers.torch_bias_init(pooled.shape[-1]))(pooled)
    return feats


def resnet(name: str, **kwargs) -> ResNet:
  """``ResNet`` preset by name (resnet18/34/50/101); kwargs override fields."""
  if name not in STAGE_SIZES:
    raise ValueError(f"unknown resnet {name!r}; valid: {', '.join(STAGE_SIZES)}")
  return ResNet(stage_sizes=STAGE_SIZES[name], block=BLOCKS[name], **kwargs)

