"""The prediction heads of torchvision's Mask R-CNN, NHWC.

Module and parameter names are the Flax paths of the Mask R-CNN contract (``rpn/conv``,
``box_head/fc6``, ``mask_predictor/conv5_mask``...); ``jaxseg.convert`` maps torchvision's
state dict onto them. Deltas are always (dy, dx, dh, dw) (torchvision: (dx, dy, dw, dh)).
"""
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers

# torchvision RPNHead: normal(std=0.01) weights, zero bias.
rpn_init = nn.initializers.normal(0.01)
zeros = nn.initializers.zeros


class RPNHead(nn.Module):
  """Shared over the pyramid: 3x3 conv + ReLU, then objectness and box deltas per anchor.

  ``__call__(features: sequence of [N,h,w,C]) -> (logits [N,A_total], deltas [N,A_total,4])``
  with levels concatenated in order, each flattened in (y, x, anchor) order (torchvision's
  ``concat_box_prediction_layers``). ``bbox_pred`` channel ``a * 4 + k`` is delta k of anchor a.
  """
  num_anchors: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Any]) -> Tuple[Any, Any]:
    conv = layers.Conv(features[0].shape[-1], (3, 3), padding=[(1, 1), (1, 1)], kernel_init=rpn_init,
                   bias_init=zeros, dtype=self.dtype, name="conv")
    cls = layers.Conv(self.num_anchors, (1, 1), kernel_init=rpn_init, bias_init=zeros,
                  dtype=self.dtype, name="cls_logits")
    box = layers.Conv(4 * self.num_anchors, (1, 1), kernel_init=rpn_init, bias_init=zeros,
                  dtype=self.dtype, name="bbox_pred")
    logits, deltas = [], []
    for f in features:
      t = nn.relu(conv(f))
      n = f.shape[0]
      logits.append(cls(t).reshape(n, -1))
      deltas.append(box(t).reshape(n, -1, 4))
    return (jnp.concatenate(logits, 1).astype(jnp.float32),
            jnp.concatenate(deltas, 1).astype(jnp.float32))


class TwoMLPHead(nn.Module):
  """fc6 -> ReLU -> fc7 -> ReLU on RoI features [..., 7, 7, C] (flattened NHWC)."""
  representation_size: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[:-3] + (-1,))
    for name in ("fc6", "fc7"):
      x = nn.relu(nn.Dense(self.representation_size, kernel_init=layers.torch_default_init,
                           bias_init=layers.torch_bias_init(x.shape[-1]), dtype=self.dtype,
                           name=name)(x))
    return x


class FastRCNNPredictor(nn.Module):
  """``cls_score`` [..., C] and class-specific ``bbox_pred`` [..., C, 4] (dy, dx, dh, dw)."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]

    def dense(n, name):
      return nn.Dense(n, kernel_init=layers.torch_default_init,
                      bias_init=layers.torch_bias_init(fan_in), dtype=self.dtype, name=name)

    scores = dense(self.num_classes, "cls_score")(x)
    deltas = dense(4 * self.num_classes, "bbox_pred")(x)
    return (scores.astype(jnp.float32),
            deltas.reshape(x.shape[:-1] + (self.num_classes, 4)).astype(jnp.float32))


class MaskRCNNHeads(nn.Module):
  """``mask_fcn1..4``: 3x3 conv (pad 1, bias) + ReLU each, on [B,14,14,C] RoI features."""
  channels: Sequence[int] = (256, 256, 256, 256)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, c in enumerate(self.channels, 1):
      x = nn.relu(layers.Conv(c, (3, 3), padding=[(1, 1), (1, 1)], kernel_init=layers.kaiming_fan_out,
                          bias_init=zeros, dtype=self.dtype, name=f"mask_fcn{i}")(x))
    return x


class MaskRCNNPredictor(nn.Module):
  """``conv5_mask`` (2x2 stride-2 transposed conv) -> ReLU -> ``mask_fcn_logits`` (1x1).

  [B,14,14,C] -> mask logits [B,28,28,num_classes].
  """
  num_classes: int
  channels: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # transpose_kernel=True keeps torch's [kh,kw,O,I] layout: its "fan_out" (I * 4) is
    # torch's fan_out for a ConvTranspose2d weight [I,O,kh,kw], so the init matches. One
    # matmul + depth-to-space: XLA:CPU's strided transposed convolution is 10-25x slower.
    x = layers.NonOverlappingConvTranspose(
        self.channels, 2, transpose_kernel=True, kernel_init=layers.kaiming_fan_out,
        bias_init=zeros, dtype=self.dtype, name="conv5_mask")(x)
    x = nn.relu(x)
    x = layers.Conv(self.num_classes, (1, 1), kernel_init=layers.kaiming_fan_out, bias_init=zeros,
                dtype=self.dtype, name="mask_fcn_logits")(x)
    return x.astype(jnp.float32)
