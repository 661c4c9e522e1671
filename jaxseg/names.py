"""Error messages for names a user typed: unknown models, losses, options, variants..."""
import difflib
from typing import Iterable


def did_you_mean(name, valid: Iterable[str]) -> str:
  """`` (did you mean 'x'?)`` naming the closest of ``valid`` to ``name``, or ``""``."""
  close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(kind: str, name, valid: Iterable[str]) -> ValueError:
  """``ValueError("unknown <kind> 'nme' (did you mean 'name'?); valid: a, b, c")``."""
  valid = list(valid)
  return ValueError(f"unknown {kind} {name!r}{did_you_mean(name, valid)}; valid: "
                    f"{', '.join(map(str, valid))}")
