"""PSPNet (ResNet-101, output stride 8) on Cityscapes fine: hszhao/semseg's
``cityscapes_pspnet101.yaml`` (deep-stem dilated ResNet, pyramid pooling 1/2/3/6, auxiliary head
on c4 weighted 0.4).

Data: ``$JAXSEG_SHARED_DATA/cityscapes`` with ``leftImg8bit/`` and ``gtFine/`` (see
`jaxseg.data.cityscapes`), 19 train ids, 255 ignored; ``train`` (2,975 images) and
``validation`` (500) at the native 1024x2048. ``--config.builder_kwargs.image_size='(512,1024)'``
prepares a half-size copy for small machines (then also lower the crop and the window).

As in semseg: crop 713, batch 16, SGD momentum 0.9, weight decay 1e-4, poly lr 0.01 (power 0.9),
random scale 0.5-2 and flips, cross-entropy + 0.4 x auxiliary cross-entropy, 200 epochs
(200 x 185 = 37,000 steps; the paper quotes 90k iterations), sliding-window evaluation with
713 windows at stride 476 (2/3 overlap). Many reproductions use batch 8
(``--config.batch_size=8``). Differences left: semseg also rotates by +-10 degrees and trains
its head at 10x the backbone's lr; here no rotation and one lr.

No ImageNet ResNet-101 weights ship with the library (and the deep stem has no torchvision
twin), so this trains from scratch unless ``--config.pretrained=/path/to/resnet101.pth`` with
``--config.model_kwargs.deep_stem=False``; expect far below the paper's ~78-80 mIoU from scratch.
Examples are decoded per read (``cache=False``): the cache would hold ~35 GB at native size.

Variants: ``:smoke`` for tests (ResNet-18 at 1/8 width, 2 steps).
"""
import ml_collections

from jaxseg.configs import default_inference, shared_data_dir
from jaxseg import configs

TRAIN_IMAGES = 2975


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = "cityscapes"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  # image_size: None (native 1024x2048) or e.g. (512, 1024), a typed placeholder so that
  # --config.builder_kwargs.image_size='(512,1024)' works on the command line.
  config.builder_kwargs = dict(manual_dir=shared_data_dir("cityscapes"), cache=False,
                               image_size=ml_collections.config_dict.placeholder(tuple))
  config.train_split = "train"
  config.eval_split = "validation"
  config.crop_size = (713, 713)
  config.augment = dict(scale_range=(0.5, 2.0), hflip=True)
  config.label_kinds = ("mask",)
  config.batch_size = 16
  config.eval_batch_size = 8

  config.model = "pspnet"
  config.model_kwargs = dict(backbone="resnet101", output_stride=8, deep_stem=True, remat=False)
  # "bfloat16": mixed precision (params, BatchNorm statistics and loss stay float32);
  # model_kwargs.remat=True: jax.checkpoint per block (less activation memory, ~1 more forward).
  config.dtype = "float32"
  config.pretrained = ""
  config.loss = "cross_entropy"
  config.loss_kwargs = dict()
  config.aux_weight = 0.4
  config.parallel = "jit"
  config.optimizer = dict(name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=1e-4,
                          schedule="poly", poly_power=0.9, warmup_steps=0)
  config.num_steps = 200 * (TRAIN_IMAGES // 16)
  config.log_every = 50
  config.eval_every = 5000
  config.checkpoint_every = 2000
  config.keep_checkpoints = 3
  config.num_overlays = 6
  config.crf = dict(enabled=False)
  config.inference = default_inference()
  config.inference.mode = "slide"
  config.inference.window = (713, 713)
  config.inference.stride = (476, 476)

  if arg == "smoke":
    config.builder_kwargs = dict(manual_dir=shared_data_dir("cityscapes"))
    config.crop_size = (48, 64)
    config.model_kwargs = dict(backbone="resnet18", output_stride=8, width_multiplier=0.125,
                               remat=False)
    config.batch_size = 2
    config.eval_batch_size = 1
    config.optimizer = dict(name="adamw", learning_rate=3e-3, schedule="constant")
    config.num_steps = 2
    config.log_every = 1
    config.eval_every = 2
    config.checkpoint_every = 2
    config.num_overlays = 1
    config.inference = default_inference()
  elif arg:
    raise configs.unknown_variant("pspnet_cityscapes", arg, ('smoke',))
  return config
