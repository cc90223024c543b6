"""Entry point: ``python -m experiments.main --config experiments/configs/default.py --workdir DIR``.

``python -m experiments.main --list`` names the configs (with their launch commands and
hardware) and the methods with their hyperparameters (``--config.<method>.<name>``).
"""

import importlib
import pkgutil
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import parallel
from experiments import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("list", False, "List the configs and the methods with their hyperparameters.")
config_flags.DEFINE_config_file(
  "config",
  None,
  "Training configuration file, e.g. experiments/configs/default.py (see --list); "
  "override any field with --config.<field>=<value>.",
  lock_config=True,
)


def configs() -> dict[str, str]:
  """Config name -> its docstring (what it trains, launch command, hardware)."""
  from experiments import configs as package

  out = {}
  for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
    module = importlib.import_module(f"experiments.configs.{info.name}")
    out[info.name] = (module.__doc__ or "").strip()
  return out


def listing() -> str:
  from experiments import steps

  lines = ["Configs (experiments/configs/<name>.py):", ""]
  for name, doc in configs().items():
    lines.append(f"{name}:")
    lines += [f"    {line}" if line else "" for line in doc.splitlines()]
    lines.append("")
  lines += [
    "Methods (--config.method=<name>; hyperparameters --config.<section>.<key>=<value>):",
    "",
  ]
  defaults = steps.method_defaults()
  for name in steps.METHODS:
    section = steps.CONFIG_SECTION[name]
    own = defaults[section] if section else {}
    params = ", ".join(f"{section}.{k}={v!r}" for k, v in own.items()) or "-"
    lines.append(f"  {name:13s} {params}")
  lines += [
    "",
    "Common fields: --config.num_epochs, --config.batch_size, --config.learning_rate,",
    "--config.seed, --config.sharding=replicated|fsdp, --config.distributed=True (see",
    "experiments/configs/default.py for all of them and their defaults).",
  ]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if FLAGS.list:
    print(listing())
    return
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError(
      "--config and --workdir are required, e.g. --config experiments/configs/default.py "
      "--workdir workdir/demo (python -m experiments.main --list names the configs)."
    )
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  parallel.initialize_distributed(config)  # multi-host: before any other JAX call
  if config.get("compare_methods"):
    train.compare(config, FLAGS.workdir)
  else:
    rec = train.train_and_evaluate(config, FLAGS.workdir)
    if parallel.is_lead():
      print({k: v for k, v in rec.items() if not k.startswith("train/")})


if __name__ == "__main__":
  if {"-h", "--help", "-help", "--helpshort"} & set(sys.argv[1:]):  # absl would exit 1
    print(__doc__.strip() + "\n\n" + FLAGS.main_module_help())
    sys.exit(0)
  app.run(main)
