"""CIFAR-10, ResNet-18 (CIFAR stem, BatchNorm), 200 epochs, NRS by default.

Prepare the data once on a machine with network access:

  tfds build cifar10 --data_dir=$DATA

Launch:

  python -m experiments.main --config experiments/configs/cifar10_resnet18.py \
    --workdir workdir/cifar10_resnet18 --config.data_dir=$DATA --config.method=nrs

Hardware: one GPU (about 2-3 h per method on an A100/H100 for SGD; NRS with
K neighbours costs about (1+K)/2 SAM steps). On CPU it runs but takes days.
Standard recipe: batch 128, lr 0.1 cosine, momentum 0.9, weight decay 5e-4,
random crop (pad 4) + horizontal flip.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "cifar10"
  config.model = "resnet18"
  config.model_kwargs = dict()
  config.compare_methods = ()
  config.method = "nrs"
  config.batch_size = 128
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.num_epochs = 200
  config.eval_every_epochs = 5
  config.checkpoint_every_steps = 2000
  config.nrs = dict(alpha=1.0, radius=0.01, num_neighbors=1, noise="gaussian", scale="filter")
  config.sam = dict(rho=0.05)
  config.asam = dict(rho=2.0, eta=0.01)
  config.hessian = dict(
    num_examples=2048, batch_size=256, num_iters=20, num_samples=20, every_evals=8
  )
  return config
