"""CIFAR-100, WideResNet-28-10 (BatchNorm, dropout 0.3), 200 epochs, NRS by default.

Prepare the data once on a machine with network access:

  tfds build cifar100 --data_dir=$DATA

Launch:

  python -m experiments.main --config experiments/configs/cifar100_wrn28_10.py \
    --workdir workdir/cifar100_wrn28_10 --config.data_dir=$DATA

Hardware: one or more GPUs (WRN-28-10 has 36.5M parameters; about 8-10 h per
method for SGD on one A100/H100). Centre and neighbours share one dropout mask.
"""

from experiments.configs import cifar10_resnet18


def get_config():
  config = cifar10_resnet18.get_config()
  config.dataset = "cifar100"
  config.model = "wrn28_10"
  config.model_kwargs = dict(depth=28, widen=10, dropout=0.3)
  config.sam = dict(rho=0.1)
  return config
