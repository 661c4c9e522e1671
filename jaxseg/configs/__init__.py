"""Recipes: one ``get_config(arg=None)`` per file, chosen with ``--config path.py[:variant]``."""
import os

import ml_collections
from ml_collections.config_dict import placeholder


def shared_data_dir(name: str) -> str:
  """Where real (research-licensed) datasets live: ``$JAXSEG_SHARED_DATA/<name>``.

  Defaults to ``../shared/data`` next to the repository checkout.
  """
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  root = os.environ.get("JAXSEG_SHARED_DATA", os.path.join(repo, "..", "shared", "data"))
  return os.path.abspath(os.path.join(root, name))


def default_inference() -> ml_collections.ConfigDict:
  """``config.inference``: how eval logits are computed (``jaxseg.evaluation.inference``).

  ``mode="whole"`` by default; every option is a typed placeholder so that
  ``--config.inference.mode=slide --config.inference.window='(256,256)'
  --config.inference.stride='(170,170)'`` (or ``mode=multiscale``, ``scales``, ``flip``)
  works on ``train.py``'s locked config as well as on ``eval.py``.
  """
  return ml_collections.ConfigDict(dict(
      mode="whole", window=placeholder(tuple), stride=placeholder(tuple),
      blend=placeholder(str), batch_windows=placeholder(int), scales=placeholder(tuple),
      flip=placeholder(bool), base_size=placeholder(int)))
