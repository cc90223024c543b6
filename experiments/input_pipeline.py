"""Datasets: mnist1d and sklearn digits (offline, in memory) and TFDS image sets.

In-memory datasets give a batch for any step from the step number alone (a
permutation seeded by the epoch), so a resumed run sees exactly the batches an
uninterrupted run would. A validation split is always carved from the training
set; hyperparameters are chosen on it, never on test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

IN_MEMORY = ("mnist1d", "digits")
TFDS = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "imagenet2012": (224, 224, 3)}
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class DataNotFoundError(FileNotFoundError):
  """A TFDS dataset is not prepared in ``data_dir``."""


@dataclass
class Split:
  x: np.ndarray
  y: np.ndarray


@dataclass
class Dataset:
  name: str
  train: Split
  validation: Split
  test: Split
  num_classes: int
  input_shape: tuple
  augment: bool = False

  @property
  def num_train(self) -> int:
    return len(self.train.y)


def default_cache_dir() -> str:
  return os.environ.get("NRS_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nrs_jax"))


def _mnist1d(cache_dir: str, seed: int) -> tuple[Split, Split, int]:
  path = os.path.join(cache_dir, f"mnist1d_seed{seed}.npz")
  if not os.path.exists(path):
    from mnist1d.data import get_dataset_args
    from mnist1d.data import make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)  # generated offline; get_dataset would download
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, x=d["x"], y=d["y"], x_test=d["x_test"], y_test=d["y_test"])
    os.replace(tmp, path)
  d = np.load(path)
  return (
    Split(d["x"].astype(np.float32), d["y"].astype(np.int32)),
    Split(d["x_test"].astype(np.float32), d["y_test"].astype(np.int32)),
    10,
  )


def _digits() -> tuple[Split, Split, int]:
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  perm = np.random.default_rng(0).permutation(len(y))
  x, y = x[perm], y[perm].astype(np.int32)
  n_test = 360
  return Split(x[n_test:], y[n_test:]), Split(x[:n_test], y[:n_test]), 10


def _carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
  n = len(train.y)
  n_val = int(round(n * fraction))
  perm = np.random.default_rng(seed + 1).permutation(n)
  val, tr = perm[:n_val], perm[n_val:]
  return Split(train.x[tr], train.y[tr]), Split(train.x[val], train.y[val])


def flip_labels(split: Split, fraction: float, num_classes: int, seed: int) -> Split:
  """Replaces a fraction of labels with a different random class (label noise)."""
  rng = np.random.default_rng(seed + 7)
  y = split.y.copy()
  idx = rng.choice(len(y), int(round(fraction * len(y))), replace=False)
  y[idx] = (y[idx] + rng.integers(1, num_classes, len(idx))) % num_classes
  return Split(split.x, y)


def load(
  name: str,
  *,
  validation_fraction: float = 0.1,
  seed: int = 0,
  data_dir: Optional[str] = None,
  label_noise: float = 0.0,
  max_examples: Optional[int] = None,
) -> Dataset:
  """Loads a dataset by name: ``mnist1d``, ``digits`` or a TFDS image set."""
  if name in TFDS:
    return _load_tfds(name, validation_fraction, seed, data_dir, max_examples)
  if name == "mnist1d":
    train, test, nc = _mnist1d(data_dir or default_cache_dir(), 42)
  elif name == "digits":
    train, test, nc = _digits()
  else:
    raise ValueError(f"dataset={name!r} is not known: choose one of {sorted((*IN_MEMORY, *TFDS))}.")
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1).")
  train, val = _carve_validation(train, validation_fraction, seed)
  if label_noise:
    train = flip_labels(train, label_noise, nc, seed)
  if max_examples:
    train = Split(train.x[:max_examples], train.y[:max_examples])
  return Dataset(name, train, val, test, nc, tuple(train.x.shape[1:]))


def train_batch(
  ds: Dataset,
  step: int,
  batch_size: int,
  seed: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> dict:
  """This process's rows of the global batch of a step: a function of (seed, step).

  The global batch (``batch_size`` rows) is the same whatever the number of
  processes; process ``i`` of ``n`` gets its contiguous ``batch_size / n`` rows
  (the rows of its devices on a ``data`` mesh ordered by process) and reads and
  augments only those.
  """
  n = ds.num_train
  steps_per_epoch = n // batch_size
  epoch, i = divmod(step, steps_per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  per = batch_size // process_count
  lo = i * batch_size + process_index * per
  idx = perm[lo : lo + per]
  x, y = ds.train.x[idx], ds.train.y[idx]
  if ds.augment:
    rng = np.random.default_rng([seed, step, 1])
    x = augment_images(x, rng, rows=(process_index * per, batch_size))
  return {"x": x, "y": y}


def augment_images(
  x: np.ndarray, rng: np.random.Generator, pad: int = 4, rows: Optional[tuple] = None
) -> np.ndarray:
  """Random crop with zero padding and horizontal flip (NHWC).

  ``rows=(offset, total)``: ``x`` holds rows ``offset...`` of a batch of ``total``
  whose random draws are made for the whole batch, so a process augmenting its
  own rows gets what a single process would have given them.
  """
  n, h, w, _ = x.shape
  offset, total = rows or (0, n)
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, total)[offset : offset + n]
  dx = rng.integers(0, 2 * pad + 1, total)[offset : offset + n]
  flip = (rng.random(total) < 0.5)[offset : offset + n]
  out = np.empty_like(x)
  for j in range(n):
    crop = padded[j, dy[j] : dy[j] + h, dx[j] : dx[j] + w]
    out[j] = crop[:, ::-1] if flip[j] else crop
  return out


def eval_batches(split: Split, batch_size: int):
  for i in range(0, len(split.y), batch_size):
    yield {"x": split.x[i : i + batch_size], "y": split.y[i : i + batch_size]}


def _load_tfds(name, validation_fraction, seed, data_dir, max_examples) -> Dataset:
  """Loads a TFDS image dataset into memory (CIFAR) with a validation carve.

  ImageNet does not fit in memory on a laptop: for it this loads at most
  ``max_examples`` per split (the mock-data smoke test), and a full run needs a
  streaming pipeline on a large host (see configs/imagenet_resnet50.py).
  """
  import tensorflow as tf
  import tensorflow_datasets as tfds

  shape = TFDS[name]
  builder = None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    splits = {}
    for split in ("train", "test" if name != "imagenet2012" else "validation"):
      spec = split if not max_examples else f"{split}[:{max_examples}]"
      ds = tfds.load(name, split=spec, data_dir=data_dir, download=False)
      # Images of varying size (ImageNet) are resized one by one before batching.
      ds = ds.map(lambda d: {"image": tf.image.resize(d["image"], shape[:2]), "label": d["label"]})
      parts = list(tfds.as_numpy(ds.batch(1024)))
      splits[split] = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}
  except Exception as e:  # tfds raises several types for missing data
    msg = str(e).lower()
    if (
      isinstance(e, (AssertionError, FileNotFoundError))
      or "not found" in msg
      or "could not find" in msg
    ):
      where = data_dir or (builder.data_dir if builder is not None else "the default TFDS dir")
      raise DataNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data_dir={where!r}. "
        f"Prepare it on a machine with network access with `tfds build {name} "
        f"--data_dir=DIR` (ImageNet needs the manual download, see the TFDS catalogue), "
        f"then pass --config.data_dir=DIR."
      ) from None
    raise
  tr, te = splits["train"], splits.get("test", splits.get("validation"))
  mean, std = (IMAGENET_MEAN, IMAGENET_STD) if name == "imagenet2012" else (CIFAR_MEAN, CIFAR_STD)

  def prep(d):
    x = (np.asarray(d["image"], np.float32) / 255.0 - mean) / std
    return Split(x, np.asarray(d["label"], np.int32))

  train, test = prep(tr), prep(te)
  train, val = _carve_validation(train, validation_fraction, seed)
  nc = builder.info.features["label"].num_classes
  return Dataset(name, train, val, test, nc, shape, augment=True)
