"""Evaluate the latest checkpoint of a training workdir on any split.

  python eval.py --workdir runs/unet_shapes [--split validation] [--step N]

Prints the per-class IoU table and writes eval_<split>_metrics.json and
eval_<split>_overlays.png into the workdir. ``--config.key=value`` overrides entries of the
run's saved config (e.g. ``--config.crf.enabled=True`` for dense-CRF post-processing, or
``--config.inference.mode=slide --config.inference.window=(256,256)
--config.inference.stride=(128,128)`` for sliding-window inference; see
``jaxseg.evaluation.inference``).
"""
from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "Training workdir holding config.json and checkpoints/.",
                    required=True)
flags.DEFINE_string("split", None, "Split to score (default: the config's eval_split).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
FLAGS = flags.FLAGS
_OVERRIDES = []


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
  loop.evaluate_workdir(FLAGS.workdir, FLAGS.split, config=config, step=FLAGS.step)


if __name__ == "__main__":
  import sys
  # ``--config.a.b=value`` edits the saved config, like train.py's flags edit a config file.
  _OVERRIDES.extend(a[len("--config."):] for a in sys.argv[1:] if a.startswith("--config."))
  app.run(main, argv=[a for a in sys.argv if not a.startswith("--config.")])
