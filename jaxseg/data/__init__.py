"""Datasets (TFDS builders), weak-label synthesis and Grain input pipelines.

::

  from jaxseg import data
  source = data.load("jaxseg_shapes", "train")
  for batch in data.train_batches(source, batch_size=16, crop_size=64):
    ...

Builders: `jaxseg.data.shapes` (embedded procedural default), `jaxseg.data.camvid`,
`jaxseg.data.isbi2012`. Weak labels: `jaxseg.data.weak_labels`. ScribbleSup XML:
`jaxseg.data.scribblesup`.
"""
from jaxseg.data import augment, scribblesup, shapes, weak_labels  # noqa: F401
from jaxseg.data.pipeline import (  # noqa: F401
    LABEL_KINDS, Source, default_data_dir, eval_batches, load, names, palette, train_batches)
