"""PSPNet's pyramid pooling module (Zhao et al. 2017; hszhao/semseg).

For each bin size b in (1, 2, 3, 6): adaptive average pooling to b x b (PyTorch's bin
boundaries ``floor(i*H/b)`` .. ``ceil((i+1)*H/b)``), 1x1 conv (no bias) to
``features`` (512), norm, ReLU, bilinear upsampling back with ``align_corners=True``;
the input and the four branches are concatenated in that order ([x, 1, 2, 3, 6]).
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxseg.models import layers
from jaxseg.models.heads.fcn import FCNHead


class PyramidPooling(nn.Module):
  """[N,h,w,C] -> [N,h,w,C + len(bins) * features]."""
  bins: Sequence[int] = (1, 2, 3, 6)
  features: int = 512
  norm: Callable = layers.batch_norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
    outs = [x]
    for b in self.bins:
      y = layers.adaptive_avg_pool(x, b)
      y = layers.conv2d(self.features, 1, name=f"bin{b}_conv", dtype=self.dtype)(y)
      y = nn.relu(norm(name=f"bin{b}_norm")(y))
      outs.append(layers.resize_bilinear(y, x.shape[1:3], align_corners=True))
    return jnp.concatenate(outs, axis=-1)


class PSPHead(nn.Module):
  """Pyramid pooling on ``in_key`` then the ``cls`` block: 3x3 conv (512), norm, ReLU,
  Dropout2d(0.1), 1x1 conv to the classes."""
  num_classes: int
  in_key: str = "c5"
  bins: Sequence[int] = (1, 2, 3, 6)
  features: int = 512
  dropout: float = 0.1
  norm: Callable = layers.batch_norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, *, train: bool):
    x = PyramidPooling(tuple(self.bins), self.features, self.norm, self.dtype,
                       name="pyramid_pooling")(feats[self.in_key], train=train)
    return FCNHead(self.num_classes, channels=self.features, dropout=self.dropout,
                   channel_dropout=True, norm=self.norm, dtype=self.dtype,
                   name="cls")(x, train=train)
