"""UNet (padded) on the embedded procedural shapes dataset: the default recipe.

``python train.py`` runs this config; ``--config jaxseg/configs/unet_shapes.py:smoke`` is a
seconds-long variant for tests.
"""
import ml_collections

from jaxseg.configs import default_inference
from jaxseg import configs


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = "jaxseg_shapes"
  config.data_dir = ml_collections.config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.builder_kwargs = ml_collections.ConfigDict()
  config.train_split = "train"
  config.eval_split = "validation"
  config.crop_size = (64, 64)
  config.augment = dict(scale_range=(0.75, 1.5), hflip=True)
  config.label_kinds = ml_collections.config_dict.placeholder(tuple)  # None: every kind
  config.batch_size = 16  # global, split over processes and devices
  config.eval_batch_size = 50

  config.model = "unet"
  config.model_kwargs = dict(features=16, depth=3, remat=False)
  # "bfloat16": mixed precision (params, BatchNorm statistics and loss stay float32);
  # model_kwargs.remat=True: jax.checkpoint per block (less activation memory, ~1 more forward).
  config.dtype = "float32"

  config.loss = "cross_entropy"
  config.loss_kwargs = ml_collections.ConfigDict()
  config.aux_weight = 0.4
  config.parallel = "jit"

  config.optimizer = dict(name="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=30,
                          weight_decay=1e-4)
  config.num_steps = 600
  config.log_every = 20
  config.eval_every = 200
  config.checkpoint_every = 200
  config.keep_checkpoints = 3
  config.num_overlays = 8
  config.crf = dict(enabled=False)
  config.inference = default_inference()

  if arg == "smoke":
    config.builder_kwargs = dict(num_train=64, num_validation=32)
    config.model_kwargs = dict(features=8, depth=2, remat=False)
    config.batch_size = 8
    config.eval_batch_size = 16
    config.num_steps = 30
    config.log_every = 5
    config.eval_every = 15
    config.checkpoint_every = 10
    config.optimizer.warmup_steps = 0
    config.optimizer.learning_rate = 1e-2
  elif arg:
    raise configs.unknown_variant("unet_shapes", arg, ('smoke',))
  return config
