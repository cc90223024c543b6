"""CIFAR-10, a ViT-S-shaped transformer with 4x4 patches, from scratch, AdamW, NRS by default.

Prepare the data once on a machine with network access:

  tfds build cifar10 --data_dir=$DATA

Launch:

  python -m experiments.main --config experiments/configs/cifar10_vit.py \
    --workdir workdir/cifar10_vit --config.data_dir=$DATA --config.method=nrs

Hardware: one GPU (ViT-S on 64 tokens, 300 epochs: hours on an A100/H100). A recipe in
the style of big_vision's ViT-S/16 from scratch: AdamW (b2 0.999, weight decay 1e-4 as
optax.adamw applies it, scaled by the learning rate), warmup then cosine, batch 512, dropout 0.1,
mean pooling, and the augmentation the harness has (random crop, horizontal flip). The
harness has label smoothing (0.1 here) but no RandAugment/mixup: expect less than
big_vision's numbers. Smoke-tested here under tfds.testing.mock_data only.
"""

from experiments.configs import cifar10_resnet18


def get_config():
  config = cifar10_resnet18.get_config()
  config.model = "vit"
  config.model_kwargs = dict(patch=(4, 4), size="S", dropout=0.1, pool="mean")
  config.optimizer = "adamw"
  config.adam_b2 = 0.999
  config.batch_size = 512
  config.learning_rate = 1e-3
  config.weight_decay = 1e-4
  config.num_epochs = 300
  config.warmup_steps = 10 * 98
  config.label_smoothing = 0.1
  config.nrs = dict(alpha=1.0, radius=0.01, num_neighbors=1, noise="gaussian", scale="filter")
  config.sam = dict(rho=0.05)
  return config
