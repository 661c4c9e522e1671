"""Mask R-CNN (ResNet-18-FPN, from scratch) on the embedded shapes: every object an instance.

The CPU-sized instance-segmentation recipe: 64x64 canvases, anchors scaled to the objects
(8-128 px instead of torchvision's 32-512 px for 800-px images), slimmer FPN and heads, fewer
proposals and RoIs per image; the matching, sampling and loss rules are torchvision's.
Scored by COCO box and mask AP on the validation split.

  python train.py --config jaxseg/configs/maskrcnn_shapes.py
  python eval.py --workdir runs/maskrcnn_shapes

Variants: ``:smoke`` for tests (tiny, seconds); ``:boxes`` trains the mask head from boxes
only (``mask_supervision="boxes"``: BoxInst's projection + pairwise terms on the 28x28 RoI
masks, ``loss_kwargs.mask_loss="boxinst"``).
"""
import ml_collections
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
  config.augment = dict(scale_range=(0.75, 1.25), hflip=True)
  config.label_kinds = ("boxes", "instance_masks")
  config.batch_size = 8
  config.eval_batch_size = 50

  config.model = "maskrcnn"
  config.model_kwargs = dict(
      backbone="resnet18", fpn_channels=64, representation_size=256, mask_head_channels=32,
      anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
      rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
      rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
      box_batch_size_per_image=128, box_detections_per_img=20, box_candidates=400,
      remat=False)
  # "bfloat16": mixed precision (params, BatchNorm statistics and loss stay float32);
  # model_kwargs.remat=True: jax.checkpoint per block (less activation memory, ~1 more forward).
  config.dtype = "float32"
  config.pretrained = ""
  config.loss = "maskrcnn_loss"
  config.loss_kwargs = ml_collections.ConfigDict()
  config.aux_weight = 0.0
  config.parallel = "jit"
  config.optimizer = dict(name="adamw", learning_rate=1e-3, weight_decay=1e-4,
                          schedule="cosine", warmup_steps=50)
  config.num_steps = 1200
  config.log_every = 20
  config.eval_every = 400
  config.checkpoint_every = 250
  config.keep_checkpoints = 3
  config.num_overlays = 8

  if arg == "smoke":
    config.builder_kwargs = dict(num_train=32, num_validation=8)
    config.model_kwargs.update(width_multiplier=0.25, fpn_channels=16, representation_size=32,
                               mask_head_channels=8, rpn_pre_nms_top_n_train=200,
                               rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
                               rpn_post_nms_top_n_test=20, box_batch_size_per_image=32,
                               box_detections_per_img=10, box_candidates=100)
    config.batch_size = 4
    config.eval_batch_size = 8
    config.num_steps = 4
    config.log_every = 2
    config.eval_every = 4
    config.checkpoint_every = 4
    config.optimizer.warmup_steps = 0
    config.num_overlays = 2
  elif arg == "boxes":
    config.label_kinds = ("boxes",)
    config.model_kwargs.mask_supervision = "boxes"
    config.loss_kwargs = dict(mask_loss="boxinst", warmup_steps=config.num_steps // 4)
  elif arg:
    raise configs.unknown_variant("maskrcnn_shapes", arg, ('smoke', 'boxes'))
  return config
