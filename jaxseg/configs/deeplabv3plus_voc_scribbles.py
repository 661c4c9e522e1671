"""DeepLab v3+ (MobileNetV2, output stride 16) on PASCAL VOC 2012 from ScribbleSup's scribbles,
with the DenseCRF loss: rloss' PyTorch setting (Tang et al., ECCV'18; 65.8 -> 69.4 val mIoU
without / with the CRF loss, 72.1 with full masks).

Data: ``$JAXSEG_SHARED_DATA/voc2012`` in VOC's layout (see `jaxseg.data.voc2012`) with SBD's
``SegmentationClassAug`` (the 10,582-image ``train_aug`` split) and ScribbleSup's
``pascal_2012/*.xml``, drawn 3 pixels wide like rloss' scribble PNGs. Without SBD use
``--config.train_split=train``; without ScribbleSup the scribbles are synthesised from the masks
(a different experiment). Evaluated on ``val`` (1,449 images) with the full masks.

As in rloss: crop 513, batch 12, SGD momentum 0.9, weight decay 5e-4, poly lr 0.007 (power 0.9)
for 60 epochs (60 x 881 steps), random scale 0.5-2 and flips, pCE + DenseCRF loss trained
jointly from the start, CRF loss at half resolution (``scale=0.5``), sigma_rgb 15, sigma_xy 100,
dense kernel (rloss' permutohedral lattice; here the bilateral grid). The CRF weight is
`jaxseg.losses.scribble_loss`'s default (gradient-balanced), not rloss' raw lambda 2e-9, which is
calibrated to its lattice's gain (see `jaxseg.losses.crf_pairwise`). Backbone from torchvision's
ImageNet MobileNetV2 (``python -m jaxseg.convert.weights fetch mobilenet_v2``;
``--config.pretrained=`` trains from scratch). Differences left: rloss' head learns at 10x the
backbone's rate and its scale jitter resizes the short side to 0.5-2 x 513 pixels; here one lr
and a relative scale.

VOC images differ in size, so evaluation runs one image per batch (``eval_batch_size=1``;
each new size compiles once). Examples are decoded per read (``cache=False``): the cache would
hold ~12 GB for train_aug.

Variants: ``:smoke`` for tests (tiny, from scratch, 2 steps).
"""
import ml_collections

from jaxseg.configs import default_inference, shared_data_dir
from jaxseg import configs

TRAIN_AUG_IMAGES = 10582


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = "voc2012"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.builder_kwargs = dict(manual_dir=shared_data_dir("voc2012"), scribble_width=3,
                               cache=False)
  config.train_split = "train_aug"
  config.eval_split = "validation"
  config.crop_size = (513, 513)
  config.augment = dict(scale_range=(0.5, 2.0), hflip=True)
  config.label_kinds = ("scribble",)
  config.batch_size = 12
  config.eval_batch_size = 1

  config.model = "deeplabv3plus"
  config.model_kwargs = dict(backbone="mobilenet_v2", output_stride=16, remat=False)
  # "bfloat16": mixed precision (params, BatchNorm statistics and loss stay float32);
  # model_kwargs.remat=True: jax.checkpoint per block (less activation memory, ~1 more forward).
  config.dtype = "float32"
  config.pretrained = "mobilenet_v2"
  config.loss = "scribble_loss"
  config.loss_kwargs = dict(kernel="dense", sigma_rgb=15.0, sigma_xy=100.0, scale=0.5)
  config.aux_weight = 0.0
  config.parallel = "jit"
  config.optimizer = dict(name="sgd", learning_rate=0.007, momentum=0.9, weight_decay=5e-4,
                          schedule="poly", poly_power=0.9, warmup_steps=0)
  config.num_steps = 60 * (TRAIN_AUG_IMAGES // 12)  # 60 epochs; the pipeline drops remainders
  config.log_every = 50
  config.eval_every = 10000
  config.checkpoint_every = 2000
  config.keep_checkpoints = 3
  config.num_overlays = 8
  config.crf = dict(enabled=False)
  config.inference = default_inference()

  if arg == "smoke":
    config.builder_kwargs = dict(manual_dir=shared_data_dir("voc2012"), scribble_width=3)
    config.crop_size = (32, 32)
    config.model_kwargs = dict(backbone="mobilenet_v2", output_stride=16, width_multiplier=0.25,
                               remat=False)
    config.pretrained = ""
    config.batch_size = 2
    config.optimizer = dict(name="adamw", learning_rate=3e-3, schedule="constant")
    config.num_steps = 2
    config.log_every = 1
    config.eval_every = 2
    config.checkpoint_every = 2
    config.num_overlays = 1
  elif arg:
    raise configs.unknown_variant("deeplabv3plus_voc_scribbles", arg, ('smoke',))
  return config
