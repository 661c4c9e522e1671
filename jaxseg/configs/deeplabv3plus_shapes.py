"""DeepLab v3+ (MobileNetV2, output stride 16) on the embedded shapes from ImageNet features.

The weak-label recipe that needs pretrained features: image-level tags (CCNN starts from
ImageNet features; from scratch it learns a constant). Same data, crop and batch as
``unet_shapes.py``.
``pretrained="mobilenet_v2"`` is torchvision's ImageNet file
(``python -m jaxseg.convert.weights fetch mobilenet_v2``); ``--config.pretrained=`` trains
from scratch.

Variants: ``:smoke`` for tests (tiny, from scratch).
"""
import ml_collections

from jaxseg.configs import default_inference
from jaxseg import configs


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = "jaxseg_shapes"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.builder_kwargs = ml_collections.ConfigDict()
  config.train_split = "train"
  config.eval_split = "validation"
  config.crop_size = (64, 64)
  config.augment = dict(scale_range=(0.75, 1.5), hflip=True)
  config.label_kinds = ml_collections.config_dict.placeholder(tuple)
  config.batch_size = 16
  config.eval_batch_size = 50

  config.model = "deeplabv3plus"
  config.model_kwargs = dict(backbone="mobilenet_v2", output_stride=16, remat=False)
  # "bfloat16": mixed precision (params, BatchNorm statistics and loss stay float32);
  # model_kwargs.remat=True: jax.checkpoint per block (less activation memory, ~1 more forward).
  config.dtype = "float32"
  config.pretrained = "mobilenet_v2"
  config.loss = "cross_entropy"
  config.loss_kwargs = ml_collections.ConfigDict()
  config.aux_weight = 0.0
  config.parallel = "jit"
  config.optimizer = dict(name="adamw", learning_rate=1e-3, weight_decay=1e-4,
                          schedule="cosine", warmup_steps=30)
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
    config.model_kwargs = dict(backbone="mobilenet_v2", output_stride=16, width_multiplier=0.25,
                               remat=False)
    config.pretrained = ""
    config.batch_size = 8
    config.eval_batch_size = 16
    config.num_steps = 6
    config.log_every = 3
    config.eval_every = 6
    config.checkpoint_every = 6
  elif arg:
    raise configs.unknown_variant("deeplabv3plus_shapes", arg, ('smoke',))
  return config
