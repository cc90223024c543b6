"""mnist1d with a tiny ViT (1-D patches of 4 samples) and AdamW (offline data), NRS by default.

Launch (a few minutes per method on 2 CPU cores):

  python -m experiments.main --config experiments/configs/mnist1d_vit.py --workdir workdir/mnist1d_vit

Hardware: any CPU. The 40-sample signals are cut into 10 patches of 4, embedded to
64 dims, with 4 pre-LayerNorm blocks of 4 heads, mean pooling and dropout 0.1; AdamW
with warmup and cosine decay. Compare methods with --config.method=sgd|sam|nrs (the
base optimiser stays AdamW for all of them).
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.model = "vit"
  config.model_kwargs = dict(
    patch=(4,), dim=64, depth=4, heads=4, mlp_dim=128, dropout=0.1, pool="mean"
  )
  config.optimizer = "adamw"
  config.learning_rate = 1e-3
  config.weight_decay = 0.05
  config.warmup_steps = 200
  config.num_epochs = 100
  config.compare_methods = ("sgd", "sam", "nrs")
  config.sam.rho = 0.05
  return config
