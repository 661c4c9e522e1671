"""UNet on the ISBI 2012 EM membrane slices (the UNet paper's data).

Two classes (see ``jaxseg.data.isbi2012`` for which label value is which); the last 5
slices are held back as ``validation``. Read from ``$JAXSEG_SHARED_DATA/isbi2012``.

The recipe uses the padded UNet (depth 4, 64 features, BatchNorm), whose logits match the
input size, with the paper's optimizer (SGD, momentum 0.99, batch of few large tiles). The
paper's unpadded variant (``model_kwargs.padding="valid"``) predicts a smaller centre
region and needs overlap-tile inference, which the trainer does not do yet.
``:cpu`` is the padded UNet at half resolution, sized to train in about a quarter of an
hour on 2 CPU cores; ``:smoke`` is for tests.
"""
import ml_collections

from jaxseg.configs import default_inference, shared_data_dir
from jaxseg import configs


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = "isbi2012"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.builder_kwargs = dict(manual_dir=shared_data_dir("isbi2012"))
  config.train_split = "train"
  config.eval_split = "validation"
  config.crop_size = (256, 256)
  config.augment = dict(scale_range=(0.8, 1.25), hflip=True)
  config.label_kinds = ("mask",)
  config.batch_size = 4
  config.eval_batch_size = 1

  config.model = "unet"
  config.model_kwargs = dict(features=64, depth=4, remat=False)
  # "bfloat16": mixed precision (params, BatchNorm statistics and loss stay float32);
  # model_kwargs.remat=True: jax.checkpoint per block (less activation memory, ~1 more forward).
  config.dtype = "float32"
  config.loss = "cross_entropy"
  config.loss_kwargs = ml_collections.ConfigDict()
  config.aux_weight = 0.0
  config.parallel = "jit"
  config.optimizer = dict(name="sgd", learning_rate=0.01, momentum=0.99, weight_decay=0.0,
                          schedule="poly", poly_power=0.9, warmup_steps=0)
  config.num_steps = 10000
  config.log_every = 50
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.num_overlays = 4
  config.crf = dict(enabled=False)
  config.inference = default_inference()

  if arg == "cpu":
    config.builder_kwargs = dict(manual_dir=shared_data_dir("isbi2012"), image_size=(256, 256))
    config.crop_size = (128, 128)
    config.model_kwargs = dict(features=16, depth=4, remat=False)
    config.batch_size = 8
    config.eval_batch_size = 5
    config.optimizer = dict(name="adamw", learning_rate=2e-3, weight_decay=1e-4,
                            schedule="cosine", warmup_steps=50)
    config.num_steps = 1000
    config.log_every = 25
    config.eval_every = 500
    config.checkpoint_every = 250
  elif arg == "smoke":
    config.builder_kwargs = dict(manual_dir=shared_data_dir("isbi2012"), image_size=(64, 64))
    config.crop_size = (64, 64)
    config.model_kwargs = dict(features=4, depth=2, remat=False)
    config.eval_batch_size = 5
    config.optimizer = dict(name="adamw", learning_rate=3e-3, schedule="constant")
    config.num_steps = 10
    config.log_every = 5
    config.eval_every = 10
    config.checkpoint_every = 10
  elif arg:
    raise configs.unknown_variant("unet_isbi2012", arg, ('cpu', 'smoke'))
  return config
