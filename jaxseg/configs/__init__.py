"""Recipes: one ``get_config(arg=None)`` per file, chosen with ``--config path.py[:variant]``."""
import os
import re

import ml_collections
from ml_collections.config_dict import placeholder


def unknown_variant(recipe: str, arg, valid) -> ValueError:
  """The error of ``--config <recipe>.py:<arg>`` naming the recipe's variants."""
  from jaxseg import names
  return names.unknown(f"variant of {recipe} (--config {recipe}.py:VARIANT)", arg, valid)


def explain_flag_error(error: BaseException) -> str:
  """One line for a failure to load ``--config`` or apply a ``--config.key=value`` override.

  ``ml_collections.config_flags`` wraps the cause (a typo'd key with its "did you mean", the
  recipe's own ValueError for an unknown variant, a missing file) in tracebacks and generic
  flag errors; this digs the cause's own message out.
  """
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in chain:  # a typo'd key: ConfigDict's KeyError says "Did you mean" when it can
    text = str(e)
    m = re.search(r'Did you mean \\?"([^"\\]+)\\?" instead of \\?"([^"\\]+)', text)
    if m:
      return (f"the config has no entry {m.group(2)!r} (did you mean {m.group(1)!r}?); "
              "check the --config.key=value overrides")
  for e in chain:
    if isinstance(e, KeyError) and e.args:
      key = str(e.args[0]).strip("'\"\\")
      return f"the config has no entry {key!r}; check the --config.key=value overrides"
  for e in chain:  # an exception raised inside the recipe file, printed as a traceback
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    for line in reversed(lines):
      if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line):
        return line.split(": ", 1)[1]
  return str(chain[0]).splitlines()[0] if chain and str(chain[0]) else repr(chain[0])


def check_config_argument(argv) -> None:
  """Raise FileNotFoundError naming the recipes when ``--config PATH[:VARIANT]`` is no file."""
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    if value is None:
      continue
    path = value.partition(":")[0]
    if not os.path.isfile(path):
      here = os.path.dirname(os.path.abspath(__file__))
      recipes = sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and f[0] != "_")
      raise FileNotFoundError(
          f"config file {path} not found; the recipes are jaxseg/configs/<name>.py[:variant] "
          f"with <name> one of: {', '.join(recipes)}")


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
