"""Name -> builder registry behind ``jaxseg.models.build``.

Each model family registers small builder functions (``@register("fcn8s")``) that
take ``num_classes`` plus family-specific keyword arguments and return an
unbound ``flax.linen.Module``. Builders live next to the module they build, so
importing ``jaxseg.models`` is what fills the registry.
"""
from typing import Callable, Dict, List

import flax.linen as nn

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  """Decorator registering ``builder(*, num_classes, **kwargs) -> nn.Module``."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"model name must be a non-empty string, got {name!r}")

  def decorator(builder):
    if name in _BUILDERS and _BUILDERS[name] is not builder:
      raise ValueError(f"model name {name!r} is already registered "
                       f"(by {_BUILDERS[name].__module__}.{_BUILDERS[name].__name__})")
    _BUILDERS[name] = builder
    return builder

  return decorator


def names() -> List[str]:
  """Sorted list of every registered model name."""
  return sorted(_BUILDERS)


def build(name: str, *, num_classes: int, **kwargs) -> nn.Module:
  """Builds the registered model ``name``.

  Args:
    name: a registered name, see ``names()``.
    num_classes: number of output channels of the logits.
    **kwargs: family-specific options, forwarded to the builder.

  Returns:
    An unbound ``flax.linen.Module``; ``module.init(rng, images, train=False)``.

  Raises:
    ValueError: unknown name or invalid ``num_classes``.
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(names())}")
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  return _BUILDERS[name](num_classes=num_classes, **kwargs)
