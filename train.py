"""Train a jaxseg model from a config file.

  python train.py                                   # UNet on the embedded shapes dataset
  python train.py --config jaxseg/configs/unet_shapes.py:smoke --workdir /tmp/run
  python train.py --config.num_steps=2000 --config.loss=partial_cross_entropy

A workdir that holds checkpoints is resumed exactly where it stopped.
"""
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "jaxseg", "configs", "unet_shapes.py")

try:  # the default recipe is loaded here, with any --config.key=value overrides applied
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                  "Config file (path.py or path.py:variant).", lock_config=True)
except Exception as e:  # noqa: BLE001 - a typo'd override: one line, not a traceback
  from jaxseg import configs
  sys.exit(f"train.py: error: {configs.explain_flag_error(e)}")
flags.DEFINE_string("workdir", None, "Output folder (default: runs/<recipe>).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
FLAGS = flags.FLAGS


def recipe_name(config_arg: str) -> str:
  """``jaxseg/configs/unet_shapes.py:smoke`` -> ``unet_shapes_smoke``."""
  path, _, variant = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return f"{name}_{variant}" if variant else name


def parse_flags(argv):
  """absl's flag parsing, with a config that fails to load (a missing file, an unknown
  variant, a typo'd --config.key) reported as one line instead of a traceback."""
  from jaxseg import configs
  try:
    configs.check_config_argument(argv)
    rest = FLAGS(argv)
    FLAGS.config  # noqa: B018 - loads the file and applies the overrides now
    return rest
  except Exception as e:  # noqa: BLE001 - config_flags wraps every cause differently
    sys.exit(f"train.py: error: {configs.explain_flag_error(e)}")


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax
  from jaxseg.train import runtime
  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  # Before any device is touched: data parallel over the CPU cores, persistent compile cache.
  runtime.configure(FLAGS.config, num_processes=FLAGS.num_processes or 1)
  from jaxseg.train import loop

  def preempted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")

  # A preempted job gets SIGTERM: treat it like Ctrl-C, which checkpoints the last step.
  signal.signal(signal.SIGTERM, preempted)
  config_arg = config_flags.get_config_filename(FLAGS["config"])
  workdir = FLAGS.workdir or os.path.join("runs", recipe_name(config_arg))
  if jax.process_index() == 0:
    print(f"jaxseg: {FLAGS.config.model} on {FLAGS.config.dataset}, {jax.device_count()} "
          f"device(s), {jax.process_count()} process(es); workdir {workdir}", flush=True)
  loop.train_and_evaluate(FLAGS.config, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
