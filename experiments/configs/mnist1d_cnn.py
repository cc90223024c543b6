"""mnist1d with a 1-D CNN (offline data), NRS by default.

Launch (about 10-20 minutes on 2 CPU cores per method):

  python -m experiments.main --config experiments/configs/mnist1d_cnn.py --workdir workdir/mnist1d_cnn

Hardware: any CPU. On CPU the NRS neighbours of a conv net run as an unrolled
loop (strategy='auto'), since vmap over conv kernels is slow there.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.model = "cnn1d"
  config.model_kwargs = dict(channels=(32, 32, 32))
  config.compare_methods = ()
  config.method = "nrs"
  config.learning_rate = 0.1
  config.num_epochs = 100
  return config
