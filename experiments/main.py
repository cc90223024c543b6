"""Entry point: ``python -m experiments.main --config experiments/configs/default.py --workdir DIR``."""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  train.initialize_distributed(config)  # multi-host: before any other JAX call
  if config.get("compare_methods"):
    train.compare(config, FLAGS.workdir)
  else:
    rec = train.train_and_evaluate(config, FLAGS.workdir)
    if train.is_lead():
      print({k: v for k, v in rec.items() if not k.startswith("train/")})


if __name__ == "__main__":
  app.run(main)
