"""A character-level language model on Python standard-library sources (offline), NRS by default.

Launch (about 2-4 minutes per method on 2 CPU cores):

  python -m experiments.main --config experiments/configs/stdlib_lm.py --workdir workdir/stdlib_lm

Hardware: any CPU. The corpus is the ``.py`` sources of a fixed set of packages
of the running Python's standard library (``input_pipeline.STDLIB_PACKAGES``,
read at run time, never committed; test suites left out), split into
train/validation/test by file and cut into byte sequences of ``block_size``
tokens that never cross a file; a file's last sequence is padded, and the
padding is masked out of the loss, the metrics and the NRS penalty (``where``).
The model is a decoder-only transformer (2 pre-LayerNorm blocks of width 64,
4 heads, learned positions, output head tied to the embedding) trained with
AdamW, warmup and cosine decay. ``val_loss``/``test_loss`` are nats per
character: bits per character = loss / ln 2. The corpus depends on the Python
version, so results name it. Compare methods with --config.method=sgd|sam|nrs
(the base optimiser stays AdamW for all of them).
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "stdlib"
  config.block_size = 64
  config.model = "lm"
  config.model_kwargs = dict(dim=64, depth=2, heads=4, mlp_dim=256, dropout=0.0, tied=True)
  config.optimizer = "adamw"
  config.batch_size = 32
  config.learning_rate = 3e-3
  config.weight_decay = 0.01
  config.warmup_steps = 100
  config.num_epochs = 2
  config.eval_every_epochs = 1
  config.train_eval_examples = 2048
  config.compare_methods = ("sgd", "sam", "nrs")
  config.sam.rho = 0.05
  config.hessian.num_iters = 0  # Lanczos on the LM is left to the flatness toolkit
  return config
