"""Mix Transformer (MiT, the SegFormer encoder) in Flax linen, NHWC.

Follows the PyTorch reference ``MIC:seg/mmseg/models/backbones/mix_transformer.py``
(uda_reference.md §1.1): overlapping patch embeddings, efficient self-attention with spatial
reduction, Mix-FFN with a depthwise 3x3 conv, exact (erf) GELU, stochastic depth spread
linearly over all blocks. Submodule names mirror the PyTorch state_dict names
(``patch_embed1.proj`` → ``patch_embed1/proj``, ``block1.0.attn.kv`` → ``block1_0/attn/kv``,
``block1.0.mlp.dwconv.dwconv`` → ``block1_0/mlp/dwconv``) so that a converter is a rename plus
the usual transposes.

Init follows the reference's from-scratch init (``_init_weights``): Linear ~ N(0, 0.02) (timm
trunc_normal_ truncates at ±2 absolute, i.e. ±100σ, so effectively untruncated), bias 0;
LayerNorm 1/0; Conv ~ N(0, sqrt(2 / fan_out)) with fan_out = k·k·out/groups, bias 0. In
practice the encoder is initialised from ImageNet weights.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mfm_jax import ops
from mfm_jax.models import layers

Dtype = Any

# Variants as data (uda_reference.md §1.1 table). ``mit_tiny`` is a CPU/test-only variant.
_MIT_WIDE = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
                 sr_ratios=(8, 4, 2, 1), mlp_ratios=(4, 4, 4, 4))
MIT_VARIANTS: dict[str, dict[str, tuple[int, ...]]] = {
    "mit_b0": dict(embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8), depths=(2, 2, 2, 2),
                   sr_ratios=(8, 4, 2, 1), mlp_ratios=(4, 4, 4, 4)),
    "mit_b1": dict(_MIT_WIDE, depths=(2, 2, 2, 2)),
    "mit_b2": dict(_MIT_WIDE, depths=(3, 4, 6, 3)),
    "mit_b3": dict(_MIT_WIDE, depths=(3, 4, 18, 3)),
    "mit_b4": dict(_MIT_WIDE, depths=(3, 8, 27, 3)),
    "mit_b5": dict(_MIT_WIDE, depths=(3, 6, 40, 3)),
    "mit_tiny": dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 1, 2, 4), depths=(1, 1, 1, 1),
                     sr_ratios=(8, 4, 2, 1), mlp_ratios=(4, 4, 4, 4)),
}

# LayerNorm epsilons differ by place in the reference (uda_reference.md §1.1, executed):
_LN_EPS_TORCH_DEFAULT = 1e-5  # patch_embedX.norm and attn.norm (plain nn.LayerNorm)
_LN_EPS_BLOCK = 1e-6  # block norm1/norm2 and stage norms norm1..norm4

_dense_init = nn.initializers.normal(stddev=0.02)


def _conv_init(fan_out: int) -> nn.initializers.Initializer:
  """N(0, sqrt(2 / fan_out)) as in the reference ``_init_weights`` for Conv2d."""
  return nn.initializers.normal(stddev=math.sqrt(2.0 / fan_out))


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=_dense_init, name=name)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (timm ``drop_path``)."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, rate: jax.Array | None = None
               ) -> jax.Array:
    """``rate`` (a traced scalar) replaces the attribute: blocks run under ``lax.scan``."""
    if deterministic or (rate is None and self.rate == 0.0):
      return x
    keep = 1.0 - (self.rate if rate is None else rate)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    scale = keep if rate is None else keep.astype(x.dtype)  # a traced rate must not promote x
    return jnp.where(mask, x / scale, jnp.zeros_like(x))


class OverlapPatchEmbed(nn.Module):
  """Conv (with bias) with overlapping windows → LayerNorm(eps 1e-5)."""
  embed_dim: int
  patch_size: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, pad = self.patch_size, self.patch_size // 2  # 7/4/3 and 3/2/1 (§1.1 patch-embed table)
    x = nn.Conv(self.embed_dim, (k, k), strides=(self.stride, self.stride),
                padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                kernel_init=_conv_init(k * k * self.embed_dim), name="proj")(x)
    return nn.LayerNorm(epsilon=_LN_EPS_TORCH_DEFAULT, dtype=self.dtype, name="norm")(x)


class EfficientSelfAttention(nn.Module):
  """Multi-head attention whose keys/values come from a spatially reduced token grid."""
  dim: int
  num_heads: int
  sr_ratio: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"mit.py: dim {c} is not divisible by num_heads {self.num_heads}.")
    head_dim = c // self.num_heads
    scale = head_dim ** -0.5  # qk_scale None → head_dim^-0.5 (0.125 for head_dim 64)
    q = _dense(c, self.dtype, "q")(x).reshape(b, h * w, self.num_heads, head_dim)
    if self.sr_ratio > 1:
      s = self.sr_ratio
      r = nn.Conv(c, (s, s), strides=(s, s), padding="VALID", dtype=self.dtype,
                  kernel_init=_conv_init(s * s * c), name="sr")(x)
      r = r.reshape(b, -1, c)
      r = nn.LayerNorm(epsilon=_LN_EPS_TORCH_DEFAULT, dtype=self.dtype, name="norm")(r)
    else:
      r = x.reshape(b, h * w, c)
    # Fused kv Linear(C → 2C); torch reshapes to (N, 2, heads, head_dim): channels = [k | v].
    kv = _dense(2 * c, self.dtype, "kv")(r).reshape(b, -1, 2, self.num_heads, head_dim)
    k, v = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * scale
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhnm,bmhd->bnhd", attn, v).reshape(b, h, w, c)
    return _dense(c, self.dtype, "proj")(out)


class MixFFN(nn.Module):
  """fc1 (C → rC) → depthwise 3x3 conv (with bias) → exact GELU → fc2 (rC → C)."""
  dim: int
  hidden_dim: int
  dtype: Dtype = jnp.float32
  depthwise_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _dense(self.hidden_dim, self.dtype, "fc1")(x)
    # Depthwise conv: torch fan_out = 3·3·hidden/groups = 9.
    x = layers.DepthwiseConv(3, kernel_init=_conv_init(9), impl=self.depthwise_impl,
                             dtype=self.dtype, name="dwconv")(x)
    x = ops.gelu_exact(x)  # reference: nn.GELU() = erf form
    return _dense(self.dim, self.dtype, "fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block on an NHWC token grid."""
  dim: int
  num_heads: int
  mlp_ratio: float
  sr_ratio: int
  drop_path: float
  dtype: Dtype = jnp.float32
  depthwise_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool,
               drop_rate: jax.Array | None = None) -> jax.Array:
    drop = DropPath(self.drop_path, name="drop_path")
    y = nn.LayerNorm(epsilon=_LN_EPS_BLOCK, dtype=self.dtype, name="norm1")(x)
    y = EfficientSelfAttention(self.dim, self.num_heads, self.sr_ratio, dtype=self.dtype,
                               name="attn")(y)
    x = x + drop(y, deterministic, drop_rate)
    y = nn.LayerNorm(epsilon=_LN_EPS_BLOCK, dtype=self.dtype, name="norm2")(x)
    y = MixFFN(self.dim, int(self.dim * self.mlp_ratio), dtype=self.dtype,
               depthwise_impl=self.depthwise_impl, name="mlp")(y)
    return x + drop(y, deterministic, drop_rate)


class MixVisionTransformer(nn.Module):
  """MiT encoder: NHWC image → 4 NHWC feature maps with strides 4, 8, 16, 32.

  Attributes:
    embed_dims, num_heads, depths, sr_ratios, mlp_ratios: per-stage settings (``MIT_VARIANTS``).
    drop_path_rate: stochastic depth of the last block; linspace(0, rate, sum(depths)) over all
      blocks (reference class default 0.1, §1.1).
    dtype: compute dtype (params stay float32).
    remat: rematerialise every block (saves activation memory at ~1/3 more compute).
    depthwise_impl: formulation of the Mix-FFN depthwise conv (``ops.DEPTHWISE_IMPLS``).
    scan_blocks: run the blocks of a stage as one ``lax.scan`` over their stacked parameters,
      so XLA compiles each stage's block once instead of ``depth`` times (MiT-B5: 3/6/40/3
      blocks). Takes the parameters in either layout: per block ``block{i}_{j}`` (as
      initialised, converted and written to checkpoints) or stacked ``blocks{i}``
      (``stack_blocks``; the train state's layout with scan_blocks, so that neither the
      optimizer nor the EMA nor each encoder pass handles every block's arrays apart). The
      same function, except that stochastic depth draws its masks from one key split per
      stage (same distribution, other draws).
  """
  embed_dims: Sequence[int]
  num_heads: Sequence[int]
  depths: Sequence[int]
  sr_ratios: Sequence[int]
  mlp_ratios: Sequence[float]
  drop_path_rate: float = 0.1
  dtype: Dtype = jnp.float32
  remat: bool = False
  depthwise_impl: str = "xla"
  scan_blocks: bool = False

  def _scan_stage(self, x: jax.Array, stage: int, rates: np.ndarray,
                  deterministic: bool) -> jax.Array:
    """The blocks ``block{stage}_*`` as one ``lax.scan`` over their stacked parameters."""
    params = self.variables["params"]
    depth = len(rates)
    if stacked_name(stage) in params:  # the train state's layout (``stack_blocks``)
      stacked = params[stacked_name(stage)]
    else:  # per-block layout (checkpoints, converted weights): stacked on every call
      stacked = jax.tree.map(lambda *p: jnp.stack(p),
                             *[params[f"block{stage}_{j}"] for j in range(depth)])
    i = stage - 1
    block = Block(self.embed_dims[i], self.num_heads[i], self.mlp_ratios[i], self.sr_ratios[i],
                  0.0, dtype=self.dtype, depthwise_impl=self.depthwise_impl)
    keys = (jnp.zeros((depth,), jnp.uint32) if deterministic
            else jax.random.split(self.make_rng("dropout"), depth))

    def body(h, xs):
      p, rate, key = xs
      rngs = {} if deterministic else {"dropout": key}
      out = block.apply({"params": p}, h, deterministic, rate, rngs=rngs)
      return out.astype(h.dtype), None

    if self.remat:
      body = jax.checkpoint(body)
    x, _ = jax.lax.scan(body, x, (stacked, jnp.asarray(rates, jnp.float32), keys))
    return x

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               deterministic: bool | None = None) -> list[jax.Array]:
    """Returns ``[f1, f2, f3, f4]``; ``train`` only matters through ``deterministic``."""
    deterministic = (not train) if deterministic is None else deterministic
    settings = (self.embed_dims, self.num_heads, self.depths, self.sr_ratios, self.mlp_ratios)
    if any(len(s) != 4 for s in settings):
      raise ValueError("mit.py: embed_dims, num_heads, depths, sr_ratios and mlp_ratios must each "
                       f"have 4 entries, got {settings}.")
    # Positional (not keyword) `deterministic` so that remat can treat it as static (index 2,
    # counting the module itself as argument 0).
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    dpr = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    x = x.astype(self.dtype)
    features, cur = [], 0
    for i in range(4):
      patch, stride = (7, 4) if i == 0 else (3, 2)
      x = OverlapPatchEmbed(self.embed_dims[i], patch, stride, dtype=self.dtype,
                            name=f"patch_embed{i + 1}")(x)
      if self.scan_blocks and self.depths[i] > 1 and not self.is_initializing():
        x = self._scan_stage(x, i + 1, dpr[cur:cur + self.depths[i]], deterministic)
      else:
        for j in range(self.depths[i]):
          x = block_cls(self.embed_dims[i], self.num_heads[i], self.mlp_ratios[i],
                        self.sr_ratios[i], float(dpr[cur + j]), dtype=self.dtype,
                        depthwise_impl=self.depthwise_impl,
                        name=f"block{i + 1}_{j}")(x, deterministic)
      cur += self.depths[i]
      x = nn.LayerNorm(epsilon=_LN_EPS_BLOCK, dtype=self.dtype, name=f"norm{i + 1}")(x)
      features.append(x)
    return features


def mit(variant: str, **kwargs: Any) -> MixVisionTransformer:
  """Builds ``MixVisionTransformer`` from a ``MIT_VARIANTS`` name; kwargs override fields."""
  if variant not in MIT_VARIANTS:
    raise ValueError(f"mit.py: unknown MiT variant {variant!r}; choose one of "
                     f"{sorted(MIT_VARIANTS)}.")
  return MixVisionTransformer(**MIT_VARIANTS[variant], **kwargs)


# --- parameter layouts: per block (canonical) and stacked per stage (scan_blocks) -------------

_BLOCK_KEY = re.compile(r"^block(\d+)_(\d+)$")
_STACKED_KEY = re.compile(r"^blocks(\d+)$")


def stacked_name(stage: int) -> str:
  """Key of stage ``stage``'s (1-based) stacked blocks: ``blocks3`` holds ``block3_0..``."""
  return f"blocks{stage}"


def _stack_leaf(*xs):
  x = xs[0]
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype,
                                sharding=getattr(x, "sharding", None))
  if isinstance(x, np.ndarray):
    return np.stack(xs)
  return jnp.stack(xs)


def _unstack_leaf(x, j: int):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=getattr(x, "sharding", None))
  return x[j]


def _has(node: Any, pattern: re.Pattern) -> bool:
  return isinstance(node, dict) and any(isinstance(k, str) and pattern.match(k) for k in node)


def stack_blocks(tree: Any) -> Any:
  """Every dict holding ``block{i}_{j}`` entries (stages of more than one block) gets them as
  one ``blocks{i}`` entry whose arrays have a leading axis of size depth.

  Works on any pytree: parameters, gradients, optimizer moments (optax's masked leaves stay
  as they are), abstract ``ShapeDtypeStruct`` trees (shardings kept) and numpy trees.
  ``unstack_blocks`` inverts it exactly.
  """
  def convert(node):
    if not _has(node, _BLOCK_KEY):
      return node
    out, stages = {}, {}
    for key, value in node.items():
      m = _BLOCK_KEY.match(key) if isinstance(key, str) else None
      if m:
        stages.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
      else:
        out[key] = value
    for stage, blocks in stages.items():
      depth = len(blocks)
      if sorted(blocks) != list(range(depth)):
        raise ValueError(f"mit.py: stage {stage} has blocks {sorted(blocks)}; expected "
                         f"block{stage}_0..block{stage}_{depth - 1}.")
      if depth == 1:  # not scanned
        out[f"block{stage}_0"] = blocks[0]
      elif stacked_name(stage) in node:
        raise ValueError(f"mit.py: both {stacked_name(stage)} and block{stage}_* present.")
      else:
        out[stacked_name(stage)] = jax.tree.map(_stack_leaf, *[blocks[j] for j in range(depth)])
    return out

  return jax.tree_util.tree_map(convert, tree, is_leaf=lambda n: _has(n, _BLOCK_KEY))


def unstack_blocks(tree: Any) -> Any:
  """Inverse of ``stack_blocks``: ``blocks{i}`` entries back to ``block{i}_{j}`` (a tree
  without stacked entries is returned as it is). A stage's depth is read off its arrays
  anywhere in the tree, so entries without arrays (optax's masked leaves) unstack too."""
  depths: dict[int, set[int]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [getattr(k, "key", None) for k in path]
    stage = next((_STACKED_KEY.match(k) for k in reversed(keys)
                  if isinstance(k, str) and _STACKED_KEY.match(k)), None)
    if stage is not None and hasattr(leaf, "shape"):
      depths.setdefault(int(stage.group(1)), set()).add(int(leaf.shape[0]))
  for stage, found in depths.items():
    if len(found) != 1:
      raise ValueError(f"mit.py: the arrays of {stacked_name(stage)} disagree on the block "
                       f"count: {sorted(found)}.")

  def convert(node):
    if not _has(node, _STACKED_KEY):
      return node
    out = {}
    for key, value in node.items():
      m = _STACKED_KEY.match(key) if isinstance(key, str) else None
      if not m:
        out[key] = value
        continue
      if int(m.group(1)) not in depths:
        raise ValueError(f"mit.py: {key} holds no array to read its block count from.")
      (depth,) = depths[int(m.group(1))]
      for j in range(depth):
        out[f"block{m.group(1)}_{j}"] = jax.tree.map(lambda x, j=j: _unstack_leaf(x, j), value)
    return out

  return jax.tree_util.tree_map(convert, tree, is_leaf=lambda n: _has(n, _STACKED_KEY))
