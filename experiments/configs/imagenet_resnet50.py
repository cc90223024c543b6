"""ImageNet (ILSVRC-2012), ResNet-50, 90 epochs, NRS by default.

Prepare the data (manual download of the ILSVRC-2012 archives into
$DATA/downloads/manual, then):

  tfds build imagenet2012 --data_dir=$DATA

Launch:

  python -m experiments.main --config experiments/configs/imagenet_resnet50.py \
    --workdir workdir/imagenet_resnet50 --config.data_dir=$DATA

Hardware: a TPU pod slice or a multi-GPU node (about 1.3 M training images;
batch 1024, 5 warm-up epochs). TFDS data is streamed with tf.data, each
process reading its own part of every split (add --config.distributed=True
--config.sharding=fsdp on a pod). Smoke-tested here under
tfds.testing.mock_data only.
"""

from experiments.configs import cifar10_resnet18


def get_config():
  config = cifar10_resnet18.get_config()
  config.dataset = "imagenet2012"
  config.model = "resnet50"
  config.model_kwargs = dict()
  config.batch_size = 1024
  config.learning_rate = 0.4
  config.weight_decay = 1e-4
  config.num_epochs = 90
  config.warmup_steps = 5 * 1251
  config.validation_fraction = 0.01
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 1000
  config.nrs = dict(alpha=1.0, radius=0.005, num_neighbors=1, noise="gaussian", scale="filter")
  config.sam = dict(rho=0.05)
  return config
