"""sklearn digits (8x8, offline) with a BatchNorm MLP, NRS by default.

Launch (about a minute on 2 CPU cores):

  python -m experiments.main --config experiments/configs/digits.py --workdir workdir/digits

Hardware: any CPU.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "digits"
  config.model = "bn_mlp"
  config.model_kwargs = dict(hidden=(128, 128))
  config.compare_methods = ()
  config.method = "nrs"
  config.batch_size = 64
  config.learning_rate = 0.05
  config.num_epochs = 50
  config.eval_every_epochs = 10
  config.hessian.every_evals = 0
  return config
