"""Recipes: one ``get_config(arg=None)`` per file, chosen with ``--config path.py[:variant]``."""
import os


def shared_data_dir(name: str) -> str:
  """Where real (research-licensed) datasets live: ``$JAXSEG_SHARED_DATA/<name>``.

  Defaults to ``../shared/data`` next to the repository checkout.
  """
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  root = os.environ.get("JAXSEG_SHARED_DATA", os.path.join(repo, "..", "shared", "data"))
  return os.path.abspath(os.path.join(root, name))
