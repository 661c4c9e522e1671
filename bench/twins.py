"""PyTorch twins of jaxseg's semantic models, for the speed benchmark (``bench/speed.py``).

``twin(name, kwargs, num_classes)`` builds the PyTorch module that computes what
``jaxseg.models.build(name, num_classes=num_classes, **kwargs)`` computes: the same layers
(kernel sizes, strides, dilations, paddings, pools, dropout placement, upsampling), the same
trainable parameter count (BatchNorm running statistics are buffers on both sides, frozen
bilinear deconvolutions are buffers here and constants in jaxseg) and the same auxiliary
heads. ``CASES`` lists the (name, kwargs) the benchmark runs; every one has a twin.

Conventions:

* Input: float32 NCHW, already normalised with the ImageNet statistics (jaxseg normalises
  inside the model; the benchmark normalises for torch).
* Output: logits [N,C,H,W] at the input's size, or, where jaxseg has an auxiliary head, a
  dict ``{"out": logits, "aux": aux_logits}``. As in jaxseg, whose ``SegmentationModel``
  evaluates the auxiliary head only when ``intermediates`` is mutable (training), ``aux``
  is computed only in ``train()`` mode; in ``eval()`` mode the dict holds ``out`` alone
  (torchvision would compute ``aux`` in both). No jaxseg model has several aux heads; the
  contract would return them as a list under ``aux``.
* ResNet and MobileNetV2 backbones are torchvision's (``weights=None``), their fc /
  classifier dropped, strides and dilations patched per block to jaxseg's rule
  (``output_stride``, ``dilate_first_block``, ``multi_grid``); the torchvision segmentation
  models (fcn_resnet*, deeplabv3_resnet*) are used as they are. The VGG-family models,
  UNet and the heads are hand-written with jaxseg's module names (``backbone.conv1_1``,
  ``fc6``, ``score_pool4``, ``down0.conv0``...). In every twin a jaxseg parameter path
  maps to the torch parameter name by ``/`` -> ``.`` and ``kernel``/``scale`` -> ``weight``
  (kernels HWIO -> OIHW; UNet's up-convs [k,k,I,O] -> [I,O,k,k]), which
  tests/bench/test_bench_twins.py uses to check that both compute the same logits.

Not reproduced (the computation is the same function, done differently):

* jaxseg computes FCN/Dilation fc6 (7x7) as 49 shifted matmuls (``layers.MatmulConv``),
  MobileNetV2's depthwise convs as 9 shifted multiply-adds (``layers.DepthwiseConv``),
  UNet's 2x2 stride-2 up-convs as a matmul + depth-to-space
  (``layers.NonOverlappingConvTranspose``) and SegNet's unpooling as a scatter; here
  they are ``nn.Conv2d``, grouped ``nn.Conv2d``, ``nn.ConvTranspose2d`` and
  ``nn.MaxUnpool2d``, the natural PyTorch layers.
* Flax BatchNorm keeps the biased batch variance in its running average, torch the
  unbiased one (buffers only; training-mode outputs are identical).
* Initialisation is PyTorch's default everywhere (jaxseg: He normal, zero FCN score
  layers, identity context module...). It does not change the cost of a step.

``twin`` returns None where no twin exists: a name without one (an instance model, a name
registered later) or options it does not reproduce (any ``width_multiplier`` other than 1
for torchvision-based models, since torchvision builds full width only; ``dtype`` other
than float32; ``remat=True``). The module imports without torch (``CASES`` is needed by
``bench/speed.py --no-torch``); ``twin`` then raises ImportError.
"""
import inspect
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

try:
  import torch
  import torch.nn.functional as F
  import torchvision
  from torch import nn
  _Module = nn.Module
except ImportError:  # CASES stays importable; twin() says torch is missing.
  torch = F = torchvision = nn = None
  _Module = object

# (registered name, builder kwargs) the benchmark runs; every one has a twin.
CASES = [
    ("unet", {}),
    ("segnet", {}),
    ("fcn32s", {}),
    ("fcn16s", {}),
    ("fcn8s", {}),
    ("dilation", {}),
    ("deeplabv1", {}),
    ("deeplabv2", {"backbone": "vgg16"}),
    ("deeplabv2", {"backbone": "resnet101"}),
    ("fcn_resnet50", {}),
    ("fcn_resnet101", {}),
    ("deeplabv3_resnet50", {}),
    ("deeplabv3_resnet101", {}),
    ("deeplabv3", {"backbone": "resnet101"}),
    ("deeplabv3plus", {"backbone": "resnet50"}),
    ("deeplabv3plus", {"backbone": "resnet101"}),
    ("deeplabv3plus", {"backbone": "mobilenet_v2"}),
    ("pspnet", {"backbone": "resnet50"}),
    ("refinenet", {"backbone": "resnet101"}),
]

VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_DEPTHS = (2, 2, 3, 3, 3)
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
MODERN_BACKBONES = RESNETS + ("mobilenet_v2",)
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


# ---------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------

def _scaled(channels: int, width_multiplier: float) -> int:
  return max(1, int(round(channels * width_multiplier)))


def _vgg16_widths(width_multiplier: float):
  if width_multiplier <= 0:
    raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")
  return tuple(_scaled(w, width_multiplier) for w in VGG16_WIDTHS)


def _resize(x, size, align_corners: bool):
  """jaxseg ``layers.resize_bilinear``: identity at the same size, no antialiasing."""
  if tuple(x.shape[2:]) == tuple(size):
    return x
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def bilinear_kernel(k: int, channels: int, grouped: bool = False):
  """Caffe ``upsample_filt`` as a ``conv_transpose2d`` weight.

  Args:
    k: kernel size.
    channels: C (input == output).
    grouped: one filter per channel (weight [C,1,k,k], groups=C) instead of a dense
      [C,C,k,k] weight with the filter on the channel diagonal.
  Returns:
    float32 tensor [C,C,k,k] or [C,1,k,k]. The filter is symmetric, so torch's
    transposed-conv layout and jaxseg's flipped forward layout hold the same numbers.
  """
  factor = (k + 1) // 2
  centre = factor - 1 if k % 2 == 1 else factor - 0.5
  f1 = 1 - (torch.arange(k, dtype=torch.float64) - centre).abs() / factor
  filt = (f1[:, None] * f1[None, :]).float()
  if grouped:
    return filt.expand(channels, 1, k, k).clone()
  w = torch.zeros(channels, channels, k, k)
  w[torch.arange(channels), torch.arange(channels)] = filt
  return w


def reflect_indices(n: int, before: int, after: int):
  """Source indices of numpy/jnp ``pad(mode="reflect")`` along an axis of length ``n``.

  Unlike ``F.pad(mode="reflect")`` (padding < n only), this allows any padding: the
  reflection repeats with period 2 (n - 1), as numpy does (Dilation pads 186 px per side,
  more than a 64 px image has).
  """
  i = torch.arange(-before, n + after)
  if n == 1:
    return torch.zeros_like(i)
  period = 2 * (n - 1)
  i = torch.remainder(i, period)
  return torch.where(i >= n, period - i, i)


def _conv_bn_relu(cin, cout, kernel=1, dilation=1):
  """jaxseg heads' ``_ConvNormReLU``: conv (no bias, pad dilation*(k-1)//2) "0", BN "1", ReLU."""
  return nn.Sequential(
      nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation,
                bias=False),
      nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Named(_Module):
  """A module whose children are registered under given names and run in that order."""

  def __init__(self, items):
    super().__init__()
    for name, module in items:
      self.add_module(name, module)

  def forward(self, x):
    for module in self.children():
      x = module(x)
    return x


# ---------------------------------------------------------------------------
# VGG16 body (jaxseg.models.backbones.vgg.VGG16)
# ---------------------------------------------------------------------------

class VGG16(_Module):
  """The 13 VGG16 convs with the Caffe-era pooling variants; children named ``conv{s}_{i}``
  (and ``conv{s}_{i}_bn``), as in jaxseg.

  ``forward(x) -> dict`` with ``conv{s}`` (before the pool), ``pool{s}`` and, for argmax
  pools, ``indices{s}`` (flat per-plane positions, as ``nn.MaxUnpool2d`` takes them).
  """

  def __init__(self, widths=VGG16_WIDTHS, conv1_padding=1, padded=True, conv5_dilation=1,
               pools=((2, 2, 0),) * 5, ceil_mode=True, norm=False, argmax=False):
    super().__init__()
    self.plan = []
    c = 3
    for stage, (width, depth, pool) in enumerate(zip(widths, VGG16_DEPTHS, pools), 1):
      d = conv5_dilation if stage == 5 else 1
      names = []
      for i in range(1, depth + 1):
        pad = conv1_padding if (stage, i) == (1, 1) else (d if padded else 0)
        name = f"conv{stage}_{i}"
        self.add_module(name, nn.Conv2d(c, width, 3, padding=pad, dilation=d))
        if norm:
          self.add_module(f"{name}_bn", nn.BatchNorm2d(width))
        names.append(name)
        c = width
      if pool is None:
        pool_module = None
      elif argmax:
        pool_module = nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)
      else:
        window, stride, padding = pool
        pool_module = nn.MaxPool2d(window, stride, padding, ceil_mode=ceil_mode)
      self.plan.append((names, pool_module))
    self.norm = norm

  def forward(self, x) -> Dict[str, Any]:
    out = {}
    for stage, (names, pool) in enumerate(self.plan, 1):
      for name in names:
        x = getattr(self, name)(x)
        if self.norm:
          x = getattr(self, f"{name}_bn")(x)
        x = F.relu(x)
      out[f"conv{stage}"] = x
      if isinstance(pool, nn.MaxPool2d) and pool.return_indices:
        x, out[f"indices{stage}"] = pool(x)
      elif pool is not None:
        x = pool(x)
      out[f"pool{stage}"] = x
    return out


# ---------------------------------------------------------------------------
# VGG-family models
# ---------------------------------------------------------------------------

class FCN(_Module):
  """jaxseg ``fcn{32,16,8}s``: VGG16 with conv1_1 padded by 100 and ceil-mode pools, fc6 7x7
  and fc7 1x1 (ReLU, dropout after each), score layers, frozen bilinear deconvolutions
  (buffers ``upscore*``) and the Caffe crops (19 / 5, 27 / 5, 9, 31)."""

  def __init__(self, num_classes, output_stride=8, widths=VGG16_WIDTHS, fc_features=4096,
               dropout=0.5):
    super().__init__()
    if output_stride not in (8, 16, 32):
      raise ValueError(f"fcn: output_stride must be 8, 16 or 32, got {output_stride!r}")
    self.output_stride = output_stride
    self.backbone = VGG16(widths, conv1_padding=100, ceil_mode=True)
    self.fc6 = nn.Conv2d(widths[4], fc_features, 7)
    self.drop6 = nn.Dropout(dropout)
    self.fc7 = nn.Conv2d(fc_features, fc_features, 1)
    self.drop7 = nn.Dropout(dropout)
    self.score_fr = nn.Conv2d(fc_features, num_classes, 1)
    if output_stride == 32:
      self.register_buffer("upscore", bilinear_kernel(64, num_classes))
    else:
      self.register_buffer("upscore2", bilinear_kernel(4, num_classes))
      self.score_pool4 = nn.Conv2d(widths[3], num_classes, 1)
      if output_stride == 16:
        self.register_buffer("upscore16", bilinear_kernel(32, num_classes))
      else:
        self.register_buffer("upscore_pool4", bilinear_kernel(4, num_classes))
        self.score_pool3 = nn.Conv2d(widths[2], num_classes, 1)
        self.register_buffer("upscore8", bilinear_kernel(16, num_classes))

  @staticmethod
  def _crop(x, offset, size):
    return x[:, :, offset:offset + size[0], offset:offset + size[1]]

  def forward(self, x):
    size = x.shape[2:]
    feats = self.backbone(x)
    x = self.drop6(F.relu(self.fc6(feats["pool5"])))
    x = self.drop7(F.relu(self.fc7(x)))
    x = self.score_fr(x)
    if self.output_stride == 32:
      return self._crop(F.conv_transpose2d(x, self.upscore, stride=32), 19, size)
    x = F.conv_transpose2d(x, self.upscore2, stride=2)
    x = x + self._crop(self.score_pool4(feats["pool4"]), 5, x.shape[2:])
    if self.output_stride == 16:
      return self._crop(F.conv_transpose2d(x, self.upscore16, stride=16), 27, size)
    x = F.conv_transpose2d(x, self.upscore_pool4, stride=2)
    x = x + self._crop(self.score_pool3(feats["pool3"]), 9, x.shape[2:])
    return self._crop(F.conv_transpose2d(x, self.upscore8, stride=8), 31, size)


def _context_widths(num_classes, num_layers, kind):
  if kind == "basic":
    return [num_classes] * num_layers
  mult = [min(2**max(i, 1), 32) for i in range(num_layers - 1)]
  return [m * num_classes for m in mult] + [num_classes]


class Dilation(_Module):
  """jaxseg ``dilation``: reflect pad 186 (+ up to a multiple of 8), unpadded VGG16 front-end
  without pool4/pool5 and conv5 dilated by 2, fc6 7x7 dilation 4, fc7, ``final``, the
  context module (3x3 convs padded by their dilation, ReLU after each, 1x1 ``ctx_final``)
  and bilinear (align_corners=False) or frozen grouped-deconv upsampling, cropped."""
  MARGIN = 186

  def __init__(self, num_classes, widths=VGG16_WIDTHS, fc_features=4096, dropout=0.5,
               context="basic", context_dilations=(1, 1, 2, 4, 8, 16, 1),
               upsampling="bilinear"):
    super().__init__()
    if context not in (None, "basic", "large"):
      raise ValueError(f"dilation: context must be None, 'basic' or 'large', got {context!r}")
    if upsampling not in ("bilinear", "deconv"):
      raise ValueError(f"dilation: upsampling must be 'bilinear' or 'deconv', got "
                       f"{upsampling!r}")
    self.upsampling = upsampling
    self.backbone = VGG16(widths, conv1_padding=0, padded=False, conv5_dilation=2,
                          pools=((2, 2, 0),) * 3 + (None, None), ceil_mode=True)
    self.fc6 = nn.Conv2d(widths[4], fc_features, 7, dilation=4)
    self.drop6 = nn.Dropout(dropout)
    self.fc7 = nn.Conv2d(fc_features, fc_features, 1)
    self.drop7 = nn.Dropout(dropout)
    self.final = nn.Conv2d(fc_features, num_classes, 1)
    self.context = None
    if context is not None:
      dil = tuple(context_dilations)
      widths_ctx = _context_widths(num_classes, len(dil) + 1, context)
      items, c = [], num_classes
      for i, (d, w) in enumerate(zip(dil, widths_ctx)):
        name = "ctx_fc1" if i == len(dil) - 1 else f"ctx_conv{i + 1}"
        items += [(name, nn.Conv2d(c, w, 3, padding=d, dilation=d)),
                  (f"{name}_relu", nn.ReLU(inplace=True))]
        c = w
      items.append(("ctx_final", nn.Conv2d(c, num_classes, 1)))
      self.context = _Named(items)
    if upsampling == "deconv":
      self.register_buffer("ctx_upsample", bilinear_kernel(16, num_classes, grouped=True))

  def forward(self, x):
    h, w = x.shape[2:]
    m = self.MARGIN
    rows = reflect_indices(h, m, m + (-h % 8)).to(x.device)
    cols = reflect_indices(w, m, m + (-w % 8)).to(x.device)
    x = x.index_select(2, rows).index_select(3, cols)
    x = self.backbone(x)["pool5"]
    x = self.drop6(F.relu(self.fc6(x)))
    x = self.drop7(F.relu(self.fc7(x)))
    x = self.final(x)
    if self.context is not None:
      x = self.context(x)
    if self.upsampling == "bilinear":
      x = _resize(x, (8 * x.shape[2], 8 * x.shape[3]), align_corners=False)
    else:
      x = F.conv_transpose2d(x, self.ctx_upsample, stride=8, padding=4, groups=x.shape[1])
    return x[:, :, :h, :w]


class DeepLabVGG(_Module):
  """jaxseg ``deeplabv1`` / ``deeplabv2`` (vgg16): 3x3 pools (s2 p1 for 1-3, s1 p1 for 4-5,
  ceil mode), conv5 dilated by 2, optional pool5a (3x3 s1 p1 average, padding counted),
  one fc6 (3x3 dilated) - fc7 - fc8 branch per rate (ReLU + dropout after fc6/fc7),
  branch scores summed, align_corners=True resize to the input."""

  def __init__(self, num_classes, rates=(12,), pool5a=True, widths=VGG16_WIDTHS,
               fc_features=1024, dropout=0.5):
    super().__init__()
    if not rates:
      raise ValueError("deeplab: rates must name at least one dilation rate")
    self.backbone = VGG16(widths, conv5_dilation=2, pools=((3, 2, 1),) * 3 + ((3, 1, 1),) * 2,
                          ceil_mode=True)
    self.pool5a = nn.AvgPool2d(3, 1, 1, count_include_pad=True) if pool5a else None
    branches = []
    for i, r in enumerate(rates):
      branches.append((f"branch{i + 1}", _Named([
          ("fc6", nn.Conv2d(widths[4], fc_features, 3, padding=r, dilation=r)),
          ("relu6", nn.ReLU(inplace=True)), ("drop6", nn.Dropout(dropout)),
          ("fc7", nn.Conv2d(fc_features, fc_features, 1)),
          ("relu7", nn.ReLU(inplace=True)), ("drop7", nn.Dropout(dropout)),
          ("fc8", nn.Conv2d(fc_features, num_classes, 1))])))
    self.aspp = _Named(branches)

  def forward(self, x):
    size = x.shape[2:]
    x = self.backbone(x)["pool5"]
    if self.pool5a is not None:
      x = self.pool5a(x)
    out = sum(branch(x) for branch in self.aspp.children())
    return _resize(out, size, align_corners=True)


class SegNet(_Module):
  """jaxseg ``segnet``: VGG16-BN encoder with 2x2 ceil-mode argmax pools, unpooling into the
  stored pre-pool size, conv-BN-ReLU decoder stacks and a final 3x3 conv (no BN)."""

  def __init__(self, num_classes, widths=VGG16_WIDTHS):
    super().__init__()
    self.backbone = VGG16(widths, norm=True, argmax=True)
    w1, w2, w3, w4, w5 = widths
    plan = {5: (w5, w5, w4), 4: (w4, w4, w3), 3: (w3, w3, w2), 2: (w2, w1), 1: (w1,)}
    self.stages = []
    for stage in range(5, 0, -1):
      c, names = widths[stage - 1], []
      for j, width in enumerate(plan[stage]):
        name = f"conv{stage}_{VGG16_DEPTHS[stage - 1] - j}_D"
        self.add_module(name, nn.Conv2d(c, width, 3, padding=1))
        self.add_module(f"{name}_bn", nn.BatchNorm2d(width))
        names.append(name)
        c = width
      self.stages.append((stage, names))
    self.conv1_1_D = nn.Conv2d(w1, num_classes, 3, padding=1)
    self.unpool = nn.MaxUnpool2d(2, 2)

  def forward(self, x):
    feats = self.backbone(x)
    x = feats["pool5"]
    for stage, names in self.stages:
      x = self.unpool(x, feats[f"indices{stage}"], output_size=feats[f"conv{stage}"].shape[2:])
      for name in names:
        x = F.relu(getattr(self, f"{name}_bn")(getattr(self, name)(x)))
    return self.conv1_1_D(x)


def _unet_block(cin, cout):
  return _Named([("conv0", nn.Conv2d(cin, cout, 3, padding=1, bias=False)),
                 ("bn0", nn.BatchNorm2d(cout)), ("relu0", nn.ReLU(inplace=True)),
                 ("conv1", nn.Conv2d(cout, cout, 3, padding=1, bias=False)),
                 ("bn1", nn.BatchNorm2d(cout)), ("relu1", nn.ReLU(inplace=True))])


class UNet(_Module):
  """jaxseg ``unet`` (padding="same", BatchNorm, 2x2 stride-2 up-convs): zero pad (in
  normalised units) to a multiple of 2**depth, crop back; skip concatenated first."""

  def __init__(self, num_classes, depth=4, features=64, dropout=0.0):
    super().__init__()
    if not isinstance(depth, int) or depth < 1:
      raise ValueError(f"unet: depth must be a positive int, got {depth!r}")
    if not isinstance(features, int) or features < 1:
      raise ValueError(f"unet: features must be a positive int, got {features!r}")
    self.depth = depth
    f = features
    for level in range(depth):
      self.add_module(f"down{level}", _unet_block(3 if level == 0 else f * 2**(level - 1),
                                                  f * 2**level))
    self.bottleneck = _unet_block(f * 2**(depth - 1), f * 2**depth)
    self.dropout = nn.Dropout(dropout) if dropout else None
    for level in reversed(range(depth)):
      self.add_module(f"upconv{level}", nn.ConvTranspose2d(f * 2**(level + 1), f * 2**level,
                                                           2, 2))
      self.add_module(f"up{level}", _unet_block(f * 2**(level + 1), f * 2**level))
    self.head = nn.Conv2d(f, num_classes, 1)

  def forward(self, x):
    h, w = x.shape[2:]
    step = 2**self.depth
    ph, pw = -h % step, -w % step
    if ph or pw:
      x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    skips = []
    for level in range(self.depth):
      x = getattr(self, f"down{level}")(x)
      skips.append(x)
      x = F.max_pool2d(x, 2, 2)
    x = self.bottleneck(x)
    if self.dropout is not None:
      x = self.dropout(x)
    for level in reversed(range(self.depth)):
      x = getattr(self, f"upconv{level}")(x)
      x = getattr(self, f"up{level}")(torch.cat([skips[level], x], 1))
    x = self.head(x)
    return x[:, :, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]


# ---------------------------------------------------------------------------
# Backbones (torchvision modules, jaxseg's strides and dilations)
# ---------------------------------------------------------------------------

def _stage_dilations(output_stride):
  """jaxseg ``resnet.stage_dilations``: (stride, dilation) of layer1..layer4."""
  out, current, dilation = [(1, 1)], 4, 1
  for _ in range(3):
    if current * 2 > output_stride:
      dilation *= 2
      out.append((1, dilation))
    else:
      current *= 2
      out.append((2, dilation))
  return out


def _set_conv(conv, stride=None, dilation=None):
  if stride is not None:
    conv.stride = (stride, stride)
  if dilation is not None:
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation * (conv.kernel_size[0] - 1) // 2,) * 2


class ResNetBody(_Module):
  """torchvision ResNet without avgpool/fc; ``forward(x) -> {"stem", "c2".."c5"}``.

  Rather than ``replace_stride_with_dilation`` (first block of a dilated stage at the
  previous rate only, and no dilation for Basic blocks), every block's stride and
  dilation is set to jaxseg's: ``output_stride`` 8/16/32, ``dilate_first_block``
  (PSPNet, DeepLab v2), ``multi_grid`` on layer4 (DeepLab v3). ``deep_stem`` is PSPNet's
  three 3x3 convs (64, 64, 128) with layer1's first block widened to take 128 channels.
  """

  def __init__(self, name="resnet50", output_stride=32, dilate_first_block=False,
               multi_grid=None, deep_stem=False):
    super().__init__()
    if name not in RESNETS:
      raise ValueError(f"unknown resnet {name!r}; valid: {', '.join(RESNETS)}")
    if output_stride not in (8, 16, 32):
      raise ValueError(f"{name}: output_stride must be 8, 16 or 32, got {output_stride!r}")
    net = getattr(torchvision.models, name)(weights=None)
    bottleneck = isinstance(net.layer1[0], torchvision.models.resnet.Bottleneck)
    expansion = 4 if bottleneck else 1
    # Stem modules keep jaxseg's (= torchvision's) names: conv1, bn1[, conv2, bn2, conv3, bn3].
    self.stem_names = ("conv1", "bn1")
    if deep_stem:
      self.stem_names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
      for i, (cin, cout, stride) in enumerate(((3, 64, 2), (64, 64, 1), (64, 128, 1)), 1):
        self.add_module(f"conv{i}", nn.Conv2d(cin, cout, 3, stride, 1, bias=False))
        self.add_module(f"bn{i}", nn.BatchNorm2d(cout))
      first = net.layer1[0]
      old = first.conv1
      first.conv1 = nn.Conv2d(128, old.out_channels, old.kernel_size, old.stride, old.padding,
                              bias=False)
      # 128 -> 64 * expansion: jaxseg projects the shortcut (Basic blocks included).
      first.downsample = nn.Sequential(nn.Conv2d(128, 64 * expansion, 1, bias=False),
                                       nn.BatchNorm2d(64 * expansion))
    else:
      self.conv1, self.bn1 = net.conv1, net.bn1
    self.maxpool = net.maxpool
    previous = 1
    for s, (stride, dilation) in enumerate(_stage_dilations(output_stride)):
      layer = getattr(net, f"layer{s + 1}")
      rates = [dilation] * len(layer)
      if not dilate_first_block:
        rates[0] = previous
      if s == 3 and multi_grid:
        rates = [dilation * multi_grid[i % len(multi_grid)] for i in range(len(layer))]
      for i, (block, rate) in enumerate(zip(layer, rates)):
        block_stride = stride if i == 0 else 1
        if bottleneck:
          _set_conv(block.conv2, block_stride, rate)
        else:
          _set_conv(block.conv1, block_stride, rate)
          _set_conv(block.conv2, None, rate)
        if block.downsample is not None:
          _set_conv(block.downsample[0], block_stride)
        block.stride = block_stride
      self.add_module(f"layer{s + 1}", layer)
      previous = dilation
    self.channels = {"stem": 128 if deep_stem else 64, "c2": 64 * expansion,
                     "c3": 128 * expansion, "c4": 256 * expansion, "c5": 512 * expansion}

  def forward(self, x):
    for i in range(0, len(self.stem_names), 2):
      conv, bn = self.stem_names[i:i + 2]
      x = F.relu(getattr(self, bn)(getattr(self, conv)(x)))
    x = self.maxpool(x)
    feats = {"stem": x}
    for s in range(4):
      x = getattr(self, f"layer{s + 1}")(x)
      feats[f"c{s + 2}"] = x
    return feats


class MobileNetV2Body(_Module):
  """torchvision ``mobilenet_v2().features[:18]`` (no 1280 conv, no classifier) with
  jaxseg's dense-prediction rule: the depthwise conv that would stride past
  ``output_stride`` keeps stride 1 at the current rate, later blocks dilate.
  ``forward(x) -> {"stem", "c2".."c5"}`` = features 1, 3, 6, 13, 17."""
  FEATURE_INDICES = {"stem": 1, "c2": 3, "c3": 6, "c4": 13, "c5": 17}
  SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))

  def __init__(self, output_stride=32):
    super().__init__()
    if output_stride not in (8, 16, 32):
      raise ValueError(f"mobilenet_v2: output_stride must be 8, 16 or 32, got "
                       f"{output_stride!r}")
    self.features = torchvision.models.mobilenet_v2(weights=None).features[:18]
    current, dilation, index = 2, 1, 1
    for t, _, n, s in self.SETTING:
      for i in range(n):
        stride = s if i == 0 else 1
        block_dilation = dilation
        if stride > 1 and current * stride > output_stride:
          dilation *= stride
          stride = 1
        elif stride > 1:
          current *= stride
        block = self.features[index]
        depthwise = block.conv[0][0] if t == 1 else block.conv[1][0]
        _set_conv(depthwise, stride, block_dilation)
        block.stride = stride
        index += 1
    self.channels = {"stem": 16, "c2": 24, "c3": 32, "c4": 96, "c5": 320}

  def forward(self, x):
    feats = {}
    keys = {i: k for k, i in self.FEATURE_INDICES.items()}
    for i, block in enumerate(self.features):
      x = block(x)
      if i in keys:
        feats[keys[i]] = x
    return feats


def _backbone(name, output_stride, **kwargs):
  if name == "mobilenet_v2":
    return MobileNetV2Body(output_stride)
  return ResNetBody(name, output_stride, **kwargs)


# ---------------------------------------------------------------------------
# Heads (jaxseg.models.heads) and the SegmentationModel wrapper
# ---------------------------------------------------------------------------

class ImagePooling(_Module):
  """Global mean -> 1x1 conv "1" (no bias) -> BN "2" -> ReLU -> broadcast back."""

  def __init__(self, cin, features):
    super().__init__()
    self.add_module("1", nn.Conv2d(cin, features, 1, bias=False))
    self.add_module("2", nn.BatchNorm2d(features))

  def forward(self, x):
    y = x.mean(dim=(2, 3), keepdim=True)
    y = F.relu(getattr(self, "2")(getattr(self, "1")(y)))
    return y.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(_Module):
  """DeepLab v3 ASPP: 1x1 and dilated 3x3 conv-BN-ReLU branches and image pooling (first
  or last), concatenated, 1x1 projection conv-BN-ReLU, dropout."""

  def __init__(self, cin, rates, features=256, pool_first=True, dropout=0.1):
    super().__init__()
    specs = [(1, 1)] + [(3, r) for r in rates]
    specs = [None] + specs if pool_first else specs + [None]
    self.convs = nn.ModuleList(
        ImagePooling(cin, features) if spec is None else _conv_bn_relu(cin, features, *spec)
        for spec in specs)
    self.project = _conv_bn_relu(len(specs) * features, features)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x):
    x = torch.cat([branch(x) for branch in self.convs], 1)
    return self.dropout(self.project(x))


class DeepLabHead(_Module):
  """The paper/TF DeepLab v3 head: ASPP (image pooling first) -> 1x1 classifier (bias)."""

  def __init__(self, cin, num_classes, rates, features=256, dropout=0.1):
    super().__init__()
    self.add_module("0", ASPP(cin, rates, features, True, dropout))
    self.add_module("1", nn.Conv2d(features, num_classes, 1))
    self.in_key = "c5"

  def forward(self, feats):
    return getattr(self, "1")(getattr(self, "0")(feats[self.in_key]))


class DeepLabV3PlusHead(_Module):
  """ASPP(c5) resized (align_corners=True) to c2, concat with c2 reduced to 48 channels,
  two 3x3 conv-BN-ReLU, 1x1 classifier (bias)."""

  def __init__(self, cin, skip_in, num_classes, rates, features=256, skip_features=48,
               dropout=0.1):
    super().__init__()
    self.aspp = ASPP(cin, rates, features, True, dropout)
    self.skip_reduce = _conv_bn_relu(skip_in, skip_features)
    self.fuse1 = _conv_bn_relu(features + skip_features, features, 3)
    self.fuse2 = _conv_bn_relu(features, features, 3)
    self.classifier = nn.Conv2d(features, num_classes, 1)

  def forward(self, feats):
    x = self.aspp(feats["c5"])
    skip = self.skip_reduce(feats["c2"])
    x = _resize(x, skip.shape[2:], align_corners=True)
    x = torch.cat([x, skip], 1)
    return self.classifier(self.fuse2(self.fuse1(x)))


class ASPPSumHead(_Module):
  """DeepLab v2 on ResNet: one dilated 3x3 conv (bias) to the classes per rate, summed."""

  def __init__(self, cin, num_classes, rates=(6, 12, 18, 24)):
    super().__init__()
    for i, r in enumerate(rates):
      self.add_module(f"branch{i + 1}", nn.Conv2d(cin, num_classes, 3, padding=r, dilation=r))

  def forward(self, feats):
    x = feats["c5"]
    return sum(branch(x) for branch in self.children())


class FCNHead(_Module):
  """torchvision's FCNHead: 3x3 conv (no bias) -> BN -> ReLU -> dropout (element-wise, or
  whole channels with ``channel_dropout`` as PSPNet's Dropout2d) -> 1x1 conv (bias)."""

  def __init__(self, cin, num_classes, in_key="c5", channels=None, dropout=0.1,
               channel_dropout=False):
    super().__init__()
    channels = channels or max(1, cin // 4)
    self.in_key = in_key
    self.add_module("0", nn.Conv2d(cin, channels, 3, padding=1, bias=False))
    self.add_module("1", nn.BatchNorm2d(channels))
    self.add_module("2", nn.ReLU(inplace=True))
    self.add_module("3", (nn.Dropout2d if channel_dropout else nn.Dropout)(dropout))
    self.add_module("4", nn.Conv2d(channels, num_classes, 1))

  def forward(self, feats):
    x = feats[self.in_key] if isinstance(feats, dict) else feats
    for module in self.children():
      x = module(x)
    return x


class PSPHead(_Module):
  """Pyramid pooling (adaptive average pools 1, 2, 3, 6 -> 1x1 conv-BN-ReLU -> resize with
  align_corners=True; concatenated after the input) then the ``cls`` FCNHead (3x3 conv to
  512, BN, ReLU, Dropout2d 0.1, 1x1 classifier)."""

  def __init__(self, cin, num_classes, bins=(1, 2, 3, 6), features=512, dropout=0.1):
    super().__init__()
    self.bins = tuple(bins)
    # jaxseg's names: pyramid_pooling.bin{b}_conv / bin{b}_norm.
    layers = {}
    for b in self.bins:
      layers[f"bin{b}_conv"] = nn.Conv2d(cin, features, 1, bias=False)
      layers[f"bin{b}_norm"] = nn.BatchNorm2d(features)
    self.pyramid_pooling = nn.ModuleDict(layers)
    self.cls = FCNHead(cin + len(self.bins) * features, num_classes, channels=features,
                       dropout=dropout, channel_dropout=True)

  def forward(self, feats):
    x = feats["c5"]
    outs = [x]
    for b in self.bins:
      y = self.pyramid_pooling[f"bin{b}_conv"](F.adaptive_avg_pool2d(x, b))
      y = F.relu(self.pyramid_pooling[f"bin{b}_norm"](y))
      outs.append(_resize(y, x.shape[2:], align_corners=True))
    return self.cls(torch.cat(outs, 1))


def _conv3x3(cin, cout, bias=False):
  return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class ResidualConvUnit(_Module):
  """x + conv2(ReLU(conv1(ReLU(x)))); conv1 with bias, conv2 without."""

  def __init__(self, c):
    super().__init__()
    self.conv1 = _conv3x3(c, c, bias=True)
    self.conv2 = _conv3x3(c, c)

  def forward(self, x):
    return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class RefineNetBlock(_Module):
  """2 RCUs on the path, fusion (3x3 conv per path, coarser ones resized with
  align_corners=True, summed) with the previous block's output, CRP (ReLU, then
  ``stages`` x [5x5 s1 p2 max pool, 3x3 conv], each added), output RCUs."""

  def __init__(self, features, prev_features=None, crp_stages=4, output_rcus=3):
    super().__init__()
    self.rcu1, self.rcu2 = ResidualConvUnit(features), ResidualConvUnit(features)
    self.fusion = None
    if prev_features is not None:
      self.fusion = nn.ModuleDict({"conv1": _conv3x3(features, features),
                                   "conv2": _conv3x3(prev_features, features)})
    self.crp = nn.ModuleDict({f"conv{i + 1}": _conv3x3(features, features)
                              for i in range(crp_stages)})
    self.output_rcus = output_rcus
    for r in range(output_rcus):
      self.add_module(f"out_rcu{r + 1}", ResidualConvUnit(features))

  def forward(self, x, prev=None):
    x = self.rcu2(self.rcu1(x))
    if self.fusion is not None:
      up = _resize(self.fusion["conv2"](prev), x.shape[2:], align_corners=True)
      x = self.fusion["conv1"](x) + up
    x = F.relu(x)
    top = x
    for conv in self.crp.values():
      top = conv(F.max_pool2d(top, 5, 1, 2))
      x = x + top
    for r in range(self.output_rcus):
      x = getattr(self, f"out_rcu{r + 1}")(x)
    return x


class RefineNetHead(_Module):
  """RefineNet-4 cascade: dropout 0.5 on c5 and c4, 3x3 reductions (no bias) to 512 / 256,
  RefineNet-4..1, dropout and a 3x3 classifier (bias) at c2's stride."""

  def __init__(self, channels, num_classes, features=256, crp_stages=4, output_rcus=3,
               dropout=0.5):
    super().__init__()
    self.drop = nn.Dropout(dropout)
    prev = None
    for i, key in enumerate(("c5", "c4", "c3", "c2")):
      width = 2 * features if i == 0 else features
      self.add_module(f"reduce{4 - i}", _conv3x3(channels[key], width))
      self.add_module(f"refinenet{4 - i}", RefineNetBlock(width, prev, crp_stages, output_rcus))
      prev = width
    self.classifier = _conv3x3(features, num_classes, bias=True)

  def forward(self, feats):
    levels = [self.drop(feats["c5"]), self.drop(feats["c4"]), feats["c3"], feats["c2"]]
    x = None
    for i, level in enumerate(levels):
      y = getattr(self, f"reduce{4 - i}")(level)
      x = getattr(self, f"refinenet{4 - i}")(y, x)
    return self.classifier(self.drop(x))


class SegmentationModel(_Module):
  """jaxseg ``SegmentationModel``: backbone -> head -> bilinear resize to the input; the aux
  head runs in training mode only (jaxseg sows it when ``intermediates`` is mutable)."""

  def __init__(self, backbone, classifier, aux_classifier=None, align_corners=False):
    super().__init__()
    self.backbone = backbone
    self.classifier = classifier
    self.aux_classifier = aux_classifier
    self.align_corners = align_corners

  def forward(self, x):
    size = x.shape[2:]
    feats = self.backbone(x)
    out = _resize(self.classifier(feats), size, self.align_corners)
    if self.aux_classifier is None:
      return out
    result = {"out": out}
    if self.training:
      result["aux"] = _resize(self.aux_classifier(feats), size, self.align_corners)
    return result


class TorchvisionSegmentation(SegmentationModel):
  """A torchvision ``fcn_resnet*`` / ``deeplabv3_resnet*`` (its own modules and state-dict
  names) with jaxseg's aux rule: ``{"out"}`` in eval mode, ``{"out", "aux"}`` in training."""

  def __init__(self, model):
    super().__init__(model.backbone, model.classifier, model.aux_classifier)

  def forward(self, x):
    size = x.shape[2:]
    feats = self.backbone(x)
    out = _resize(self.classifier(feats["out"]), size, False)
    if self.aux_classifier is None:
      return out
    result = {"out": out}
    if self.training:
      result["aux"] = _resize(self.aux_classifier(feats["aux"]), size, False)
    return result


# ---------------------------------------------------------------------------
# Builders: same keyword arguments and defaults as jaxseg's; None = no twin for that option
# ---------------------------------------------------------------------------

def _unet(num_classes, features=64, depth=4):
  return UNet(num_classes, depth=depth, features=features)


def _segnet(num_classes, backbone="vgg16", width_multiplier=1.0):
  if backbone != "vgg16":
    return None
  return SegNet(num_classes, _vgg16_widths(width_multiplier))


def _fcn(output_stride):
  def builder(num_classes, backbone="vgg16", width_multiplier=1.0, fc_features=None):
    if backbone != "vgg16":
      return None
    fc = fc_features or _scaled(4096, width_multiplier)
    return FCN(num_classes, output_stride, _vgg16_widths(width_multiplier), fc)
  return builder


def _dilation(num_classes, backbone="vgg16", width_multiplier=1.0, fc_features=None,
              context="basic", context_dilations=(1, 1, 2, 4, 8, 16, 1),
              upsampling="bilinear"):
  if backbone != "vgg16":
    return None
  fc = fc_features or _scaled(4096, width_multiplier)
  return Dilation(num_classes, _vgg16_widths(width_multiplier), fc, context=context,
                  context_dilations=context_dilations, upsampling=upsampling)


def _deeplabv1(num_classes, backbone="vgg16", width_multiplier=1.0, fc_features=None,
               rates=(12,), pool5a=True):
  if backbone != "vgg16":
    return None
  fc = fc_features or _scaled(1024, width_multiplier)
  return DeepLabVGG(num_classes, tuple(rates), pool5a, _vgg16_widths(width_multiplier), fc)


def _deeplabv2(num_classes, backbone="vgg16", width_multiplier=1.0, fc_features=None,
               rates=(6, 12, 18, 24), pool5a=False):
  if backbone == "vgg16":
    return _deeplabv1(num_classes, backbone, width_multiplier, fc_features, rates, pool5a)
  if backbone not in ("resnet50", "resnet101") or width_multiplier != 1.0 or fc_features:
    return None
  body = ResNetBody(backbone, 8, dilate_first_block=True)
  return SegmentationModel(body, ASPPSumHead(body.channels["c5"], num_classes, tuple(rates)),
                           align_corners=True)


def _torchvision(name):
  depth = int(name.rsplit("resnet", 1)[1])

  def builder(num_classes, aux=True, width_multiplier=1.0, backbone=f"resnet{depth}",
              output_stride=8):
    if width_multiplier != 1.0 or backbone != f"resnet{depth}" or output_stride != 8:
      return None
    make = getattr(torchvision.models.segmentation, name)
    return TorchvisionSegmentation(make(weights=None, weights_backbone=None,
                                        num_classes=num_classes, aux_loss=bool(aux)))
  return builder


def _aux_head(body, num_classes, aux):
  return FCNHead(body.channels["c4"], num_classes, in_key="c4") if aux else None


def _deeplabv3(num_classes, backbone="resnet101", output_stride=16, multi_grid=(1, 2, 4),
               aux=False, width_multiplier=1.0):
  if backbone not in MODERN_BACKBONES or output_stride not in (8, 16) or width_multiplier != 1:
    return None
  if backbone == "mobilenet_v2":
    body = _backbone(backbone, output_stride)
  else:
    body = _backbone(backbone, output_stride, multi_grid=multi_grid)
  head = DeepLabHead(body.channels["c5"], num_classes, ASPP_RATES[output_stride])
  return SegmentationModel(body, head, _aux_head(body, num_classes, aux), align_corners=True)


def _deeplabv3plus(num_classes, backbone="resnet101", output_stride=16, multi_grid=None,
                   aux=False, width_multiplier=1.0):
  if backbone not in MODERN_BACKBONES or output_stride not in (8, 16) or width_multiplier != 1:
    return None
  if backbone == "mobilenet_v2":
    body = _backbone(backbone, output_stride)
  else:
    body = _backbone(backbone, output_stride, multi_grid=multi_grid)
  head = DeepLabV3PlusHead(body.channels["c5"], body.channels["c2"], num_classes,
                           ASPP_RATES[output_stride])
  return SegmentationModel(body, head, _aux_head(body, num_classes, aux), align_corners=True)


def _pspnet(num_classes, backbone="resnet50", output_stride=8, deep_stem=True, aux=True,
            width_multiplier=1.0):
  if backbone not in RESNETS or output_stride not in (8, 16) or width_multiplier != 1.0:
    return None
  body = ResNetBody(backbone, output_stride, dilate_first_block=True, deep_stem=deep_stem)
  aux_head = None
  if aux:
    aux_head = FCNHead(body.channels["c4"], num_classes, in_key="c4", channels=256,
                       channel_dropout=True)
  return SegmentationModel(body, PSPHead(body.channels["c5"], num_classes), aux_head,
                           align_corners=True)


def _refinenet(num_classes, backbone="resnet101", width_multiplier=1.0, crp_stages=4,
               output_rcus=3):
  if backbone not in RESNETS or width_multiplier != 1.0:
    return None
  body = ResNetBody(backbone, 32)
  head = RefineNetHead(body.channels, num_classes, crp_stages=crp_stages,
                       output_rcus=output_rcus)
  return SegmentationModel(body, head, align_corners=True)


_BUILDERS = {
    "unet": _unet,
    "segnet": _segnet,
    "fcn32s": _fcn(32),
    "fcn16s": _fcn(16),
    "fcn8s": _fcn(8),
    "dilation": _dilation,
    "deeplabv1": _deeplabv1,
    "deeplabv2": _deeplabv2,
    "fcn_resnet50": _torchvision("fcn_resnet50"),
    "fcn_resnet101": _torchvision("fcn_resnet101"),
    "deeplabv3_resnet50": _torchvision("deeplabv3_resnet50"),
    "deeplabv3_resnet101": _torchvision("deeplabv3_resnet101"),
    "deeplabv3": _deeplabv3,
    "deeplabv3plus": _deeplabv3plus,
    "pspnet": _pspnet,
    "refinenet": _refinenet,
}


def _is_float32(dtype) -> bool:
  if dtype is None:
    return True
  try:
    return np.dtype(dtype).name == "float32"
  except TypeError:  # "bfloat16" is no NumPy dtype name
    return False


def names() -> Sequence[str]:
  """Sorted model names that have a twin (for some kwargs)."""
  return sorted(_BUILDERS)


def twin(name: str, kwargs: Optional[Mapping[str, Any]],
         num_classes: int) -> "Optional[nn.Module]":
  """A freshly built PyTorch twin of ``jaxseg.models.build(name, num_classes=..., **kwargs)``.

  Args:
    name: a jaxseg model name.
    kwargs: the builder keyword arguments (None or {} for the defaults).
    num_classes: output channels C.
  Returns:
    An ``nn.Module`` (train mode) mapping normalised float32 images [N,3,H,W] to logits
    [N,C,H,W], or to ``{"out": [N,C,H,W], "aux": [N,C,H,W]}`` (``aux`` in train mode only)
    where jaxseg has an auxiliary head; None when ``name`` has no twin or ``kwargs`` ask
    for an option the twin does not reproduce.
  Raises:
    ImportError: torch/torchvision are not installed.
    TypeError: ``name`` is not a string or ``kwargs`` not a mapping.
    ValueError: ``num_classes`` is not a positive int, or an option value is invalid.
  """
  if torch is None:
    raise ImportError("bench/twins.py: twin() needs torch and torchvision "
                      "(pip install -r requirements-dev.txt)")
  if not isinstance(name, str):
    raise TypeError(f"twin: name must be a string, got {type(name).__name__}")
  if kwargs is None:
    kwargs = {}
  if not isinstance(kwargs, Mapping):
    raise TypeError(f"twin: kwargs must be a mapping of builder options, got "
                    f"{type(kwargs).__name__}")
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"twin: num_classes must be a positive int, got {num_classes!r}")
  builder = _BUILDERS.get(name)
  if builder is None:
    return None
  kwargs = dict(kwargs)
  # Options every jaxseg model takes. bfloat16 compute with float32 parameters would be
  # torch.autocast, not a twin; remat (recompute in the backward pass) torch.utils.checkpoint.
  if not _is_float32(kwargs.pop("dtype", None)) or kwargs.pop("remat", False):
    return None
  accepted = inspect.signature(builder).parameters
  if any(key not in accepted or key == "num_classes" for key in kwargs):
    return None
  return builder(num_classes, **kwargs)
