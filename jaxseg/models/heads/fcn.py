"""torchvision's ``FCNHead``: 3x3 conv -> norm -> ReLU -> dropout -> 1x1 conv to classes."""
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers


class FCNHead(nn.Module):
  """The FCN-ResNet head and the auxiliary head of FCN/DeepLab v3/PSPNet.

  Module names are torchvision's Sequential indices (``0`` conv, ``1`` norm, ``4``
  classifier), so torchvision's ``classifier`` / ``aux_classifier`` weights convert.

  Attributes:
    num_classes: output channels.
    in_key: the feature map to read (``c5`` main head, ``c4`` auxiliary head).
    channels: hidden channels; None means in_channels // 4 (torchvision).
    dropout: rate before the classifier (torchvision 0.1).
    channel_dropout: drop whole channels (``Dropout2d``, PSPNet) instead of elements.
  ``__call__(feats, *, train)`` -> [N,h,w,num_classes] at ``feats[in_key]``'s size.
  """
  num_classes: int
  in_key: str = "c5"
  channels: Optional[int] = None
  dropout: float = 0.1
  channel_dropout: bool = False
  norm: Callable = layers.batch_norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, *, train: bool):
    x = feats[self.in_key] if isinstance(feats, dict) else feats
    channels = self.channels or max(1, x.shape[-1] // 4)
    norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
    x = layers.conv2d(channels, 3, name="0", dtype=self.dtype)(x)
    x = nn.relu(norm(name="1")(x))
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2) if self.channel_dropout else (),
                   deterministic=not train)(x)
    return layers.conv2d(self.num_classes, 1, use_bias=True, name="4", dtype=self.dtype,
                         kernel_init=layers.torch_default_init)(x)
