"""Name -> builder registry behind ``jaxseg.models.build``.

Each model family registers small builder functions (``@register("fcn8s")``) that
take ``num_classes`` plus family-specific keyword arguments and return an
unbound ``flax.linen.Module``. Builders live next to the module they build, so
importing ``jaxseg.models`` is what fills the registry.

Mixed precision: ``build(..., dtype="bfloat16")`` (or ``jnp.bfloat16``) makes every
registered model compute its convolutions, matmuls and activations in bfloat16 while its
parameters stay float32 (flax's ``param_dtype``; each layer casts the float32 weights to
``dtype`` where it uses them, so gradients and optimizer state are float32 too). BatchNorm
(flax's, with ``dtype=bfloat16``) promotes its input to float32 for the batch mean and
variance, keeps the running statistics in float32 and normalises in float32 before casting
back; logits and every floating model output are returned as float32. ``dtype`` is resolved
here once (:func:`resolve_dtype`), so builders see a NumPy dtype, never a string.
"""
from typing import Any, Callable, Dict, List

import flax.linen as nn
import jax.numpy as jnp
from jaxseg import names as names_lib

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


# Computation dtypes a model can be built with. float16 is left out on purpose: without loss
# scaling its gradients underflow, and bfloat16 has float32's exponent range.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype: Any):
  """The computation dtype named by ``dtype``: "float32" / "bfloat16" or the jnp/NumPy type.

  Args:
    dtype: a name from ``COMPUTE_DTYPES``, ``jnp.float32``/``jnp.bfloat16`` or an equivalent
      ``numpy.dtype``; None means float32.

  Returns:
    ``jnp.float32`` or ``jnp.bfloat16``.

  Raises:
    ValueError: any other value (``"float16x"``, ``"int8"``...), naming the valid ones.
  """
  valid = ", ".join(repr(k) for k in COMPUTE_DTYPES)
  if dtype is None:
    return jnp.float32
  if isinstance(dtype, str):
    if dtype not in COMPUTE_DTYPES:
      raise ValueError(f"dtype must be one of {valid} (or the jnp types), got {dtype!r}")
    return COMPUTE_DTYPES[dtype]
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"dtype must be one of {valid} (or the jnp types), got {dtype!r}")
  return COMPUTE_DTYPES[name]


def names() -> List[str]:
  """Sorted list of every registered model name."""
  return sorted(_BUILDERS)


def build(name: str, *, num_classes: int, **kwargs) -> nn.Module:
  """Builds the registered model ``name``.

  Args:
    name: a registered name, see ``names()``.
    num_classes: number of output channels of the logits.
    **kwargs: family-specific options, forwarded to the builder. Every model takes
      ``dtype`` ("float32", "bfloat16" or the jnp type; see the module docstring), resolved
      by :func:`resolve_dtype` before the builder sees it.

  Returns:
    An unbound ``flax.linen.Module``; ``module.init(rng, images, train=False)``.

  Raises:
    ValueError: unknown name, invalid ``num_classes`` or ``dtype``.
  """
  if name not in _BUILDERS:
    raise names_lib.unknown("model", name, names())
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  if "dtype" in kwargs:
    kwargs["dtype"] = resolve_dtype(kwargs["dtype"])
  return _BUILDERS[name](num_classes=num_classes, **kwargs)
