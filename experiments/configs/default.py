"""The embedded demo: SGD vs SAM vs NRS on mnist1d with an MLP (no download).

Launch (what `make demo` runs; about one minute on 2 CPU cores, 54 s measured on an AMD
EPYC, after the first `make`'s install of .venv):

  python -m experiments.main --config experiments/configs/default.py --workdir workdir/demo

Hardware: any CPU. One seed per method: a single run each, not a verdict (the study,
python -m experiments.study, compares methods over paired seeds). Writes
<workdir>/summary.json, accuracy.png, hessian.png and one sub-directory per method
(metrics.jsonl, checkpoints, final_state.npz), and prints where; a rerun on the same
workdir reads the finished runs back and says "resumed from <workdir>/<method>".
"""

import ml_collections

from experiments.steps import method_defaults


def get_config():
  config = ml_collections.ConfigDict()
  config.dataset = "mnist1d"
  config.data_dir = ""
  config.validation_fraction = 0.1
  config.label_noise = 0.0
  # Semi-supervised: the share of training examples that keep their labels (balanced per
  # class); nrs_unlabeled, vat and pi_model also draw unlabeled_batch_size unlabeled inputs.
  config.labeled_fraction = 1.0
  config.unlabeled_batch_size = 0
  config.max_examples = 0
  config.model = "mlp"
  config.model_kwargs = dict(hidden=(256, 256))
  config.method = "nrs"
  config.compare_methods = ("sgd", "sam", "nrs")
  config.seed = 0
  config.batch_size = 128
  config.num_epochs = 200
  config.num_steps = 0  # > 0 overrides num_epochs
  config.optimizer = "sgd"  # or "adamw" (config.adam_b1, adam_b2; decoupled weight decay)
  config.learning_rate = 0.2
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.warmup_steps = 0
  config.label_smoothing = 0.0  # > 0 smooths the one-hot targets of the task loss
  for name, d in method_defaults().items():
    setattr(config, name, d)
  config.eval_every_epochs = 20
  config.train_eval_examples = 0  # train metrics on the first N examples (0: all)
  config.checkpoint_every_steps = 1000
  config.progress = True
  # Devices: "none" (default device), "replicated" (batch sharded over a `data`
  # mesh of all devices, params replicated) or "fsdp" (params sharded too).
  config.sharding = "none"
  # Multi-host: True calls jax.distributed.initialize() first. Address, process count
  # and id are for clusters JAX does not detect (TPU pods, SLURM, Open MPI and
  # Kubernetes are detected): "host:port", N, i (the last two together).
  config.distributed = False
  config.coordinator_address = ""
  config.num_processes = 0
  config.process_id = -1
  config.distributed_timeout_s = 300
  config.hessian = dict(
    num_examples=1024, batch_size=512, num_iters=30, num_samples=30, every_evals=2
  )
  return config
