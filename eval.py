"""Evaluate the latest checkpoint of a training workdir on any split, or segment image files.

  python eval.py --workdir runs/unet_shapes [--split validation] [--step N]
  python eval.py --workdir runs/unet_shapes --images photos/ --out segmented/

Prints the per-class IoU table and writes eval_<split>_metrics.json and
eval_<split>_overlays.png into the workdir. ``--config.key=value`` overrides entries of the
run's saved config (e.g. ``--config.crf.enabled=True`` for dense-CRF post-processing, or
``--config.inference.mode=slide --config.inference.window=(256,256)
--config.inference.stride=(128,128)`` for sliding-window inference; see
``jaxseg.evaluation.inference``).

With ``--images DIR_OR_GLOB --out DIR`` the run segments JPEG/PNG files of any size instead of
scoring a split: ``<stem>.png`` (paletted with the dataset's colours: pixel values are
class ids) and ``<stem>_overlay.png`` (image | overlay) go to ``--out``. Images larger than the window (the
training ``crop_size``, or ``--config.inference.window`` with ``mode=slide``, or ``--window``)
are segmented with a sliding window; ``--window=whole`` runs every image in one pass.
"""
from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "Training workdir holding config.json and checkpoints/.",
                    required=True)
flags.DEFINE_string("split", None, "Split to score (default: the config's eval_split).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_string("images", None, "Segment these images instead of scoring a split: a folder "
                    "(its *.jpg/*.jpeg/*.png), a quoted glob ('photos/**/*.png') or one file. "
                    "Needs --out.")
flags.DEFINE_string("out", None, "With --images: output folder for <stem>.png label maps and "
                    "<stem>_overlay.png (created; must not be the images' folder).")
flags.DEFINE_string("window", None, "With --images: sliding-window size 'H,W' (or 'S'), or "
                    "'whole' for one pass per image (default: --config.inference.window when "
                    "mode=slide, else the training crop_size).")
FLAGS = flags.FLAGS
_OVERRIDES = []


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (FLAGS.images is None) != (FLAGS.out is None):
    raise app.UsageError("--images and --out go together: --images names the files to segment, "
                         "--out the folder for the label maps and overlays")
  if FLAGS.images is not None and FLAGS.split is not None:
    raise app.UsageError("--split scores a dataset split; --images segments files: pass one")
  if FLAGS.window is not None and FLAGS.images is None:
    raise app.UsageError("--window applies to --images only (for a split, use "
                         "--config.inference.mode=slide --config.inference.window=...)")
  from jaxseg.train import loop, runtime
  config = loop.load_config(FLAGS.workdir)
  runtime.configure(config)  # host devices and compile cache, as train.py
  if "inference" not in config:
    # Runs saved before the key existed: give --config.inference.* overrides a node to edit.
    with config.unlocked():
      config.inference = dict(mode="whole")
  for ov in _OVERRIDES:
    key, sep, value = ov.partition("=")
    if not sep:
      raise app.UsageError(f"override --config.{ov} must look like --config.key=value")
    loop.apply_override(config, key, value)
  if FLAGS.images is None:
    loop.evaluate_workdir(FLAGS.workdir, FLAGS.split, config=config, step=FLAGS.step)
  else:
    segment_images(config)


def _parse_window(text: str):
  """``'H,W'`` or ``'S'`` -> (H, W); ``'whole'`` -> None."""
  if text.strip().lower() == "whole":
    return None
  try:
    sides = tuple(int(v) for v in text.replace("x", ",").split(","))
  except ValueError:
    sides = ()
  if len(sides) not in (1, 2) or min(sides) <= 0:
    raise app.UsageError(f"--window must be 'H,W', a single size or 'whole'; got {text!r}")
  return sides * 2 if len(sides) == 1 else sides


def _window_options(config):
  """``predict`` keyword arguments for the window: --window, else the inference config's slide
  options, else the training crop."""
  from jaxseg.evaluation import inference
  try:
    mode, opts = inference.parse_config(config.get("inference", None))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if FLAGS.window is not None:
    return dict(window=_parse_window(FLAGS.window))
  if mode == "slide":
    return {k: opts[k] for k in ("window", "stride", "blend", "batch_windows")}
  if mode == "multiscale":
    raise app.UsageError("--images supports inference modes whole and slide, not multiscale")
  crop = config.get("crop_size", None)
  return dict(window=tuple(crop) if crop else None)


def segment_images(config):
  """--images/--out: restore the run and write label PNGs and overlays for the files."""
  from jaxseg.train import loop
  from jaxseg.evaluation import segment as predict_lib
  try:  # every check that needs no checkpoint first: restoring takes a while
    paths = predict_lib.list_images(FLAGS.images)
    predict_lib.check_outputs(paths, FLAGS.out)
  except (OSError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  window = _window_options(config)
  # Building the module (no parameters) is instant; the class count does not matter here.
  if loop.is_instance_model(loop.build_model(config, 2)):
    raise app.UsageError(f"{config.model} is an instance segmentation model: --images only "
                         "supports semantic segmentation models so far (score it with "
                         "--split, whose overlays draw the detections)")
  run = loop.restore_run(FLAGS.workdir, config=config, step=FLAGS.step)
  if config.get("crf", None) and config.crf.get("enabled", False):
    logging.warning("config.crf.enabled: the dense CRF is not applied to --images")
  print(f"Segmenting {len(paths)} file(s) with checkpoint step {run.step} of {FLAGS.workdir}, "
        + ("whole images" if window["window"] is None else
           f"window {tuple(window['window'])}"), flush=True)
  from jaxseg import data
  predict_lib.predict_files(paths, FLAGS.out, variables=run.variables, model=run.model,
                            class_names=run.class_names, palette=data.palette(config.dataset),
                            **window)
  print("Label PNG values are class ids: "
        + ", ".join(f"{i} {name}" for i, name in enumerate(run.class_names)), flush=True)


if __name__ == "__main__":
  import sys
  # ``--config.a.b=value`` edits the saved config, like train.py's flags edit a config file.
  _OVERRIDES.extend(a[len("--config."):] for a in sys.argv[1:] if a.startswith("--config."))
  app.run(main, argv=[a for a in sys.argv if not a.startswith("--config.")])
