"""jaxseg: semantic and instance segmentation in JAX/Flax.

Sub-packages: ``models`` (flax.linen networks and ``build``), ``losses`` (pure
``loss_fn(logits, batch)`` functions), ``data`` (TFDS builders, Grain pipelines,
weak-label synthesis), ``train`` (state, sharded step, checkpoints, loop),
``evaluation`` (confusion matrix, IoU) and ``convert`` (PyTorch weights).
"""
from jaxseg import convert, data, evaluation, losses, models, train  # noqa: F401
from jaxseg.evaluation.segment import predict  # noqa: F401

__version__ = "0.1.0"
