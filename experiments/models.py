"""Flax NNX models (and one Linen model) used by the harness. Every NNX model is called as
``model(x, train=bool, dropout_key=key_or_None)``: ``train`` switches BatchNorm to batch
statistics and enables dropout, whose mask comes from ``dropout_key`` (so the centre and the
NRS neighbours, called with the same key, share it)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any
from typing import Optional

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax import nnx


def _split(key: Optional[jax.Array], n: int) -> list:
  return [None] * n if key is None else list(jax.random.split(key, n))


class MLP(nnx.Module):
  """Dense ReLU network; optional dropout after each hidden layer."""

  def __init__(self, in_features, num_classes, hidden=(256, 256), dropout=0.0, *, rngs):
    sizes = [in_features, *hidden]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)
    self.dropout = nnx.Dropout(dropout) if dropout else None

  def __call__(self, x, *, train=False, dropout_key=None):
    x = x.reshape(x.shape[0], -1)
    keys = _split(dropout_key, len(self.layers))
    for layer, k in zip(self.layers, keys):
      x = jax.nn.relu(layer(x))
      if self.dropout is not None:
        x = self.dropout(x, deterministic=not train, rngs=k)
    return self.head(x)


class BNMLP(nnx.Module):
  """Dense network with BatchNorm after each hidden layer (a small BN model)."""

  def __init__(self, in_features, num_classes, hidden=(128, 128), *, rngs):
    sizes = [in_features, *hidden]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.norms = nnx.List([nnx.BatchNorm(b, momentum=0.9, rngs=rngs) for b in hidden])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, x, *, train=False, dropout_key=None):
    del dropout_key
    x = x.reshape(x.shape[0], -1)
    for layer, norm in zip(self.layers, self.norms):
      x = jax.nn.relu(norm(layer(x), use_running_average=not train))
    return self.head(x)


class CNN(nnx.Module):
  """Small CNN, strided after the first conv: 1-D for mnist1d (``[batch, length]``), 2-D
  for images ``[batch, height, width, channels]``."""

  def __init__(self, in_shape, num_classes, channels=(32, 32, 32), kernel=5, *, rngs):
    spatial = list(in_shape[:-1]) if len(in_shape) == 3 else [in_shape[0]]
    chans, d = [in_shape[-1] if len(in_shape) == 3 else 1, *channels], len(spatial)
    self.convs = nnx.List(
      [
        nnx.Conv(a, b, kernel_size=(kernel,) * d, strides=(2 if i else 1,) * d, rngs=rngs)
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:]))
      ]
    )
    for _ in channels[1:]:
      spatial = [-(-n // 2) for n in spatial]
    self.head = nnx.Linear(math.prod(spatial) * channels[-1], num_classes, rngs=rngs)

  def __call__(self, x, *, train=False, dropout_key=None):
    del train, dropout_key
    if x.ndim == 2:
      x = x[..., None]
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return self.head(x.reshape(x.shape[0], -1))


class _Shortcut(nnx.Module):
  """Identity, or a strided 1x1 conv + BatchNorm when the shape changes."""

  def __init__(self, cin, cout, stride, *, rngs):
    if stride != 1 or cin != cout:
      self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
      self.bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
    else:
      self.proj = self.bn = None

  def __call__(self, x, ura):
    return x if self.proj is None else self.bn(self.proj(x), use_running_average=ura)


class _BasicBlock(nnx.Module):
  def __init__(self, cin, cout, stride, *, rngs):
    self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
    self.shortcut = _Shortcut(cin, cout, stride, rngs=rngs)

  def __call__(self, x, ura):
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = self.bn2(self.conv2(y), use_running_average=ura)
    return jax.nn.relu(y + self.shortcut(x, ura))


class _Bottleneck(nnx.Module):
  def __init__(self, cin, width, stride, *, rngs):
    cout = 4 * width
    self.conv1 = nnx.Conv(cin, width, (1, 1), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(
      width, width, (3, 3), strides=stride, padding=1, use_bias=False, rngs=rngs
    )
    self.bn2 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    self.conv3 = nnx.Conv(width, cout, (1, 1), use_bias=False, rngs=rngs)
    self.bn3 = nnx.BatchNorm(cout, momentum=0.9, scale_init=nnx.initializers.zeros, rngs=rngs)
    self.shortcut = _Shortcut(cin, cout, stride, rngs=rngs)

  def __call__(self, x, ura):
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = jax.nn.relu(self.bn2(self.conv2(y), use_running_average=ura))
    y = self.bn3(self.conv3(y), use_running_average=ura)
    return jax.nn.relu(y + self.shortcut(x, ura))


class ResNet(nnx.Module):
  """ResNet-18/34 (basic blocks) or -50 (bottlenecks); ``cifar_stem`` = 3x3 conv, no pool."""

  def __init__(
    self,
    num_classes,
    stage_sizes: Sequence[int] = (2, 2, 2, 2),
    bottleneck=False,
    width=64,
    cifar_stem=True,
    in_channels=3,
    *,
    rngs,
  ):
    self.cifar_stem = cifar_stem
    k, s, pad = (3, 1, 1) if cifar_stem else (7, 2, 3)  # CIFAR: 3x3, no pool; ImageNet: 7x7/2
    self.stem = nnx.Conv(in_channels, width, (k, k), s, padding=pad, use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    blocks, cin = [], width
    for i, n in enumerate(stage_sizes):
      w = width * 2**i
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        if bottleneck:
          blocks.append(_Bottleneck(cin, w, stride, rngs=rngs))
          cin = 4 * w
        else:
          blocks.append(_BasicBlock(cin, w, stride, rngs=rngs))
          cin = w
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x, *, train=False, dropout_key=None):
    del dropout_key
    ura = not train
    x = jax.nn.relu(self.stem_bn(self.stem(x), use_running_average=ura))
    if not self.cifar_stem:
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for block in self.blocks:
      x = block(x, ura)
    return self.head(jnp.mean(x, axis=(1, 2)))


class _WideBlock(nnx.Module):
  def __init__(self, cin, cout, stride, dropout, *, rngs):
    self.bn1 = nnx.BatchNorm(cin, momentum=0.9, rngs=rngs)
    self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False, rngs=rngs)
    self.dropout = nnx.Dropout(dropout) if dropout else None
    # One assignment: under Flax >= 0.12.x an attribute first set to None is static, and a
    # later Conv assigned to it is refused ("wrap the value with nnx.data").
    project = stride != 1 or cin != cout
    self.proj = (
      nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs) if project else None
    )

  def __call__(self, x, ura, key):
    o = jax.nn.relu(self.bn1(x, use_running_average=ura))
    y = self.conv1(o)
    y = jax.nn.relu(self.bn2(y, use_running_average=ura))
    if self.dropout is not None:
      y = self.dropout(y, deterministic=ura, rngs=key)
    y = self.conv2(y)
    return y + (x if self.proj is None else self.proj(o))


class WideResNet(nnx.Module):
  """Pre-activation WideResNet-depth-k (Zagoruyko and Komodakis, 2016), BatchNorm, dropout."""

  def __init__(self, num_classes, depth=28, widen=10, dropout=0.3, in_channels=3, *, rngs):
    if (depth - 4) % 6:
      raise ValueError(f"depth={depth} must be 6n+4 for a WideResNet.")
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    self.stem = nnx.Conv(in_channels, widths[0], (3, 3), padding=1, use_bias=False, rngs=rngs)
    blocks, cin = [], widths[0]
    for i in range(3):
      for j in range(n):
        blocks.append(_WideBlock(cin, widths[i + 1], 2 if i and not j else 1, dropout, rngs=rngs))
        cin = widths[i + 1]
    self.blocks = nnx.List(blocks)
    self.bn = nnx.BatchNorm(cin, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x, *, train=False, dropout_key=None):
    ura = not train
    x = self.stem(x)
    for block, k in zip(self.blocks, _split(dropout_key, len(self.blocks))):
      x = block(x, ura, k)
    x = jax.nn.relu(self.bn(x, use_running_average=ura))
    return self.head(jnp.mean(x, axis=(1, 2)))


# ViT sizes (Dosovitskiy et al., 2021; Steiner et al., 2022): width, depth, heads, MLP width.
VIT_SIZES = {
  "Ti": dict(dim=192, depth=12, heads=3, mlp_dim=768),
  "S": dict(dim=384, depth=12, heads=6, mlp_dim=1536),
  "B": dict(dim=768, depth=12, heads=12, mlp_dim=3072),
}


class _EncoderBlock(nnx.Module):
  """Pre-LayerNorm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)), with dropout."""

  def __init__(self, dim, heads, mlp_dim, dropout, *, rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=heads, in_features=dim, decode=False, deterministic=True, rngs=rngs
    )
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout) if dropout else None

  def _drop(self, y, train, key):
    if self.dropout is None:
      return y
    return self.dropout(y, deterministic=not train, rngs=key)

  def __call__(self, x, train, key):
    k1, k2 = _split(key, 2)
    x = x + self._drop(self.attn(self.ln1(x)), train, k1)
    return x + self._drop(self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)))), train, k2)


class ViT(nnx.Module):
  """Vision Transformer (Dosovitskiy et al., 2021) for images or 1-D signals. Non-overlapping
  patches, flattened and embedded by a linear layer (no convolution), learned position
  embeddings, a class token (``pool="cls"``) or mean pooling (``"mean"``), pre-LayerNorm
  encoder blocks with dropout, a final LayerNorm and a linear head. Inputs ``[B, H, W, C]``
  with ``patch=(ph, pw)``, or ``[B, L]`` / ``[B, L, C]`` with ``patch=(pl,)``. ``size``
  (``"Ti"``, ``"S"``, ``"B"``) sets width, depth, heads and MLP width as in ViT-Ti/S/B."""

  def __init__(
    self,
    in_shape,
    num_classes,
    patch=(16, 16),
    size=None,
    dim=192,
    depth=12,
    heads=3,
    mlp_dim=768,
    dropout=0.0,
    pool="cls",
    *,
    rngs,
  ):
    if size is not None:
      if size not in VIT_SIZES:
        raise ValueError(f"size={size!r} is not a ViT size: choose one of {sorted(VIT_SIZES)}.")
      dim, depth, heads, mlp_dim = (
        VIT_SIZES[size][k] for k in ("dim", "depth", "heads", "mlp_dim")
      )
    if pool not in ("cls", "mean"):
      raise ValueError(f"pool={pool!r} is not supported: use 'cls' or 'mean'.")
    in_shape = tuple(in_shape)
    if len(in_shape) == 1:  # a 1-D signal of one channel
      in_shape = (*in_shape, 1)
    spatial, channels = in_shape[:-1], in_shape[-1]
    patch = tuple(patch)
    if len(patch) != len(spatial) or any(s % p for s, p in zip(spatial, patch)):
      raise ValueError(
        f"patch={patch} must have one size per spatial dim of the input {spatial}, each "
        "dividing it."
      )
    self.spatial, self.patch, self.pool = spatial, patch, pool
    num_patches = 1
    patch_size = channels
    for s, p in zip(spatial, patch):
      num_patches *= s // p
      patch_size *= p
    self.embed = nnx.Linear(patch_size, dim, rngs=rngs)
    n_tokens = num_patches + (pool == "cls")
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n_tokens, dim)))
    self.cls = nnx.Param(jnp.zeros((1, 1, dim))) if pool == "cls" else None
    self.blocks = nnx.List(
      [_EncoderBlock(dim, heads, mlp_dim, dropout, rngs=rngs) for _ in range(depth)]
    )
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)
    self.dropout = nnx.Dropout(dropout) if dropout else None

  def patches(self, x):
    """``[B, *spatial, C]`` (or ``[B, L]``) -> ``[B, num_patches, patch_size]``."""
    b = x.shape[0]
    x = x.reshape(b, *self.spatial, -1)
    if len(self.spatial) == 1:
      (length,), (p,) = self.spatial, self.patch
      return x.reshape(b, length // p, p * x.shape[-1])
    (h, w), (ph, pw) = self.spatial, self.patch
    x = x.reshape(b, h // ph, ph, w // pw, pw, x.shape[-1]).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ph) * (w // pw), ph * pw * x.shape[-1])

  def __call__(self, x, *, train=False, dropout_key=None):
    keys = _split(dropout_key, len(self.blocks) + 1)
    x = self.embed(self.patches(x))
    if self.cls is not None:
      x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1])), x], 1)
    x = x + self.pos[...]
    if self.dropout is not None:
      x = self.dropout(x, deterministic=not train, rngs=keys[-1])
    for block, k in zip(self.blocks, keys):
      x = block(x, train, k)
    x = self.ln(x)
    return self.head(x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1))


class _CausalBlock(_EncoderBlock):
  """Pre-LayerNorm decoder block: causal self-attention, then the MLP, with dropout."""

  def __call__(self, x, train, key, mask=None):
    k1, k2 = _split(key, 2)
    x = x + self._drop(self.attn(self.ln1(x), mask=mask), train, k1)
    return x + self._drop(self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)))), train, k2)


class TransformerLM(nnx.Module):
  """A small decoder-only transformer language model (GPT-style). Token ids ``[B, T]`` (int) ->
  next-token logits ``[B, T, vocab]``: token and learned position embeddings, pre-LayerNorm
  blocks with causal self-attention and dropout, a final LayerNorm, and an output head tied to
  the token embedding (``tied=True``: logits = h @ E^T) or a separate linear layer. ``max_len``
  is the number of positions; a longer input raises a ValueError."""

  def __init__(
    self,
    vocab_size,
    max_len=128,
    dim=128,
    depth=4,
    heads=4,
    mlp_dim=512,
    dropout=0.0,
    tied=True,
    *,
    rngs,
  ):
    self.max_len = int(max_len)
    self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, self.max_len, dim)))
    self.blocks = nnx.List(
      [_CausalBlock(dim, heads, mlp_dim, dropout, rngs=rngs) for _ in range(depth)]
    )
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = None if tied else nnx.Linear(dim, vocab_size, use_bias=False, rngs=rngs)
    self.dropout = nnx.Dropout(dropout) if dropout else None

  def __call__(self, x, *, train=False, dropout_key=None):
    t = x.shape[1]
    if t > self.max_len:
      raise ValueError(
        f"the input has {t} tokens but the model has max_len={self.max_len} positions: "
        "use a block size <= max_len (config.block_size) or a larger model_kwargs.max_len."
      )
    keys = _split(dropout_key, len(self.blocks) + 1)
    h = self.embed(x.astype(jnp.int32)) + self.pos[:, :t]
    if self.dropout is not None:
      h = self.dropout(h, deterministic=not train, rngs=keys[-1])
    mask = nnx.make_causal_mask(x)
    for block, k in zip(self.blocks, keys):
      h = block(h, train, k, mask)
    h = self.ln(h)
    return self.embed.attend(h) if self.head is None else self.head(h)


class LinenMLP(linen.Module):
  """The MLP in Linen, for the Linen path (``nrs_jax.integrations.linen``)."""

  num_classes: int
  hidden: Sequence[int] = (256, 256)

  @linen.compact
  def __call__(self, x, *, train=False):
    del train
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = linen.relu(linen.Dense(h)(x))
    return linen.Dense(self.num_classes)(x)


def _resnet18(in_shape, num_classes, rngs, stage_sizes=(2, 2, 2, 2), **kw):
  return ResNet(num_classes, stage_sizes, in_channels=in_shape[-1], rngs=rngs, **kw)


def _resnet50(in_shape, num_classes, rngs, **kw):
  kw.setdefault("cifar_stem", False)
  return ResNet(
    num_classes, (3, 4, 6, 3), bottleneck=True, in_channels=in_shape[-1], rngs=rngs, **kw
  )


def _lm(in_shape, vocab_size, rngs, **kw):
  """The LM for sequences of ``in_shape[0]`` tokens (the block size)."""
  block = in_shape[0]
  max_len = kw.setdefault("max_len", block)
  if block > max_len:
    raise ValueError(
      f"block_size={block} is larger than the model's max_len={max_len} positions: lower "
      "config.block_size or raise config.model_kwargs.max_len."
    )
  return TransformerLM(vocab_size, **kw, rngs=rngs)


MODELS = {
  "mlp": lambda in_shape, nc, rngs, **kw: MLP(math.prod(in_shape), nc, rngs=rngs, **kw),
  "bn_mlp": lambda in_shape, nc, rngs, **kw: BNMLP(math.prod(in_shape), nc, rngs=rngs, **kw),
  "cnn1d": lambda in_shape, nc, rngs, **kw: CNN(in_shape, nc, rngs=rngs, **kw),
  "cnn": lambda in_shape, nc, rngs, **kw: CNN(in_shape, nc, rngs=rngs, **kw),
  "resnet18": _resnet18,
  "resnet50": _resnet50,
  "wrn28_10": lambda in_shape, nc, rngs, **kw: WideResNet(
    nc, **{"depth": 28, "widen": 10, **kw}, in_channels=in_shape[-1], rngs=rngs
  ),
  "vit": lambda in_shape, nc, rngs, **kw: ViT(in_shape, nc, rngs=rngs, **kw),
  # Token ids [B, T] -> logits [B, T, V]; nc is the vocabulary, in_shape (T,) the block.
  "lm": lambda in_shape, nc, rngs, **kw: _lm(in_shape, nc, rngs, **kw),
}
LINEN_MODELS = {"linen_mlp": partial(LinenMLP)}


def create_model(name: str, in_shape: Sequence[int], num_classes: int, seed: int, **kwargs: Any):
  """Builds an NNX model by name; raises with the valid names otherwise."""
  if name not in MODELS:
    raise ValueError(
      f"model={name!r} is not known: choose one of {sorted(MODELS) + sorted(LINEN_MODELS)}."
    )
  return MODELS[name](tuple(in_shape), num_classes, nnx.Rngs(seed), **kwargs)
