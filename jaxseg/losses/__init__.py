"""Segmentation losses, each ``loss_fn(logits, batch, *, ...) -> scalar``.

``get(name, **kwargs)`` returns a loss by name with its hyperparameters bound, which is
how ``train.py`` turns ``config.loss`` / ``config.loss_kwargs`` into a function.
"""
import functools
from typing import Callable

from jaxseg.losses.box import box_loss
from jaxseg.losses.crf import crf_pairwise, dense_crf
from jaxseg.losses.image_level import constrained_posterior, image_level_loss
from jaxseg.losses.maskrcnn import maskrcnn_loss, maskrcnn_loss_terms
from jaxseg.losses.scribble import scribble_em_loss, scribble_loss, scribble_pseudo_labels
from jaxseg.losses.supervised import cross_entropy, partial_cross_entropy
from jaxseg import names as names_lib

_LOSSES = {
    "cross_entropy": cross_entropy,
    "partial_cross_entropy": partial_cross_entropy,
    "crf_pairwise": crf_pairwise,
    "scribble_loss": scribble_loss,
    "scribble_em_loss": scribble_em_loss,
    "image_level_loss": image_level_loss,
    "box_loss": box_loss,
    "maskrcnn_loss": maskrcnn_loss,
}


def names():
  """Names accepted by :func:`get`."""
  return sorted(_LOSSES)


def get(name: str, **kwargs) -> Callable:
  """The loss registered as ``name`` with keyword hyperparameters bound."""
  if name not in _LOSSES:
    raise names_lib.unknown("loss", name, names())
  fn = _LOSSES[name]
  return functools.partial(fn, **kwargs) if kwargs else fn
