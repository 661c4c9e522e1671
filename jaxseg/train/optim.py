"""Optimizers and learning-rate schedules built from a config."""
import ml_collections
import optax
from jaxseg import names as names_lib


def make_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """``poly`` (DeepLab: lr·(1 - t/T)^power), ``cosine`` (linear warmup then cosine) or ``constant``."""
  lr = config.learning_rate
  warmup = config.get("warmup_steps", 0)
  kind = config.get("schedule", "poly")
  if kind == "poly":
    sched = optax.polynomial_schedule(lr, 0.0, config.get("poly_power", 0.9),
                                      max(num_steps - warmup, 1))
  elif kind == "cosine":
    sched = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1))
  elif kind == "constant":
    sched = optax.constant_schedule(lr)
  else:
    raise names_lib.unknown("schedule", kind, ("poly", "cosine", "constant"))
  if warmup:
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
  return sched


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """``sgd`` (momentum, L2 weight decay as in the DeepLab recipe) or ``adamw`` (decoupled)."""
  sched = make_schedule(config, num_steps)
  kind = config.get("name", "adamw")
  wd = config.get("weight_decay", 0.0)
  if kind == "sgd":
    tx = optax.sgd(sched, momentum=config.get("momentum", 0.9), nesterov=config.get("nesterov", False))
    if wd:
      tx = optax.chain(optax.add_decayed_weights(wd), tx)
  elif kind == "adamw":
    tx = optax.adamw(sched, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999), weight_decay=wd)
  else:
    raise names_lib.unknown("optimizer", kind, ("sgd", "adamw"))
  if config.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
