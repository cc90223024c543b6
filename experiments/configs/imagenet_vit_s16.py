"""ImageNet (ILSVRC-2012), ViT-S/16 from scratch, AdamW, 90 epochs, NRS by default.

Prepare the data (manual download of the ILSVRC-2012 archives into
$DATA/downloads/manual, then):

  tfds build imagenet2012 --data_dir=$DATA

Launch (every process runs the same command):

  python -m experiments.main --config experiments/configs/imagenet_vit_s16.py \
    --workdir gs://BUCKET/imagenet_vit_s16 --config.data_dir=$DATA \
    --config.distributed=True --config.sharding=fsdp

Hardware: a TPU pod slice or a multi-GPU node. The recipe follows big_vision's
ViT-S/16 from scratch (Beyer et al., 2022: batch 1024, AdamW with b2 0.999 and
decoupled weight decay, 10k warm-up steps then cosine, 90 epochs, mean pooling) with
the augmentation the harness has (random crop, flip) instead of Inception crop,
RandAugment and mixup, and with label smoothing 0.1 on the task loss. TFDS data is streamed with
tf.data, each process reading its own part of every split. Smoke-tested here under
tfds.testing.mock_data only.
"""

from experiments.configs import imagenet_resnet50


def get_config():
  config = imagenet_resnet50.get_config()
  config.model = "vit"
  config.model_kwargs = dict(patch=(16, 16), size="S", dropout=0.0, pool="mean")
  config.optimizer = "adamw"
  config.adam_b2 = 0.999
  config.batch_size = 1024
  config.learning_rate = 1e-3
  config.weight_decay = 1e-4
  config.warmup_steps = 10_000
  config.label_smoothing = 0.1
  config.nrs = dict(alpha=1.0, radius=0.005, num_neighbors=1, noise="gaussian", scale="filter")
  config.sam = dict(rho=0.05)
  return config
