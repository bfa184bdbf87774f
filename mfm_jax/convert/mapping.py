"""PyTorch state_dict ⇄ Flax variables: rule-based names and layouts, strict merging.

Flax module names mirror the reference torch names (uda_reference.md §1.1–1.5), so one rule
covers every architecture: a numeric path part joins its parent (``block1.0`` → ``block1_0``,
``decode_head.fuse_layer.aspp_modules.1`` → ``…/aspp_modules_1``), MiT's ``mlp.dwconv.dwconv``
is ``mlp/dwconv``, and the leaves map as

* ``weight`` [out, in] (Linear) → ``kernel`` [in, out]; ``weight`` OIHW (Conv2d, depthwise
  [C, 1, k, k] included) → ``kernel`` HWIO; ``weight`` 1-D (LayerNorm/BN) → ``scale``;
* ``running_mean`` / ``running_var`` → ``batch_stats`` ``mean`` / ``var``;
* ``num_batches_tracked`` is dropped (and written back as 0 so mmseg loads strictly).

Conversion is strict: the result is checked against ``jax.eval_shape`` of the Flax model the
state_dict describes (sizes read off the tensors), and every missing, unexpected or mis-shaped
name is reported. Architectures: MiT backbones (``mit_b0`` … ``mit_b5``, ``mit_tiny``),
``resnet`` (mmseg ResNetV1c names), and the segmentors ``daformer``, ``dlv2``, ``dlv3p``, ``hrda``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mfm_jax.models import daformer_head
from mfm_jax.models import mit
from mfm_jax.runtime import errors

MIT_ARCHS = tuple(mit.MIT_VARIANTS)
BACKBONE_ARCHS = MIT_ARCHS + ("resnet",)
SEGMENTOR_ARCHS = ("daformer", "dlv2", "dlv3p", "hrda")
ARCHS = BACKBONE_ARCHS + SEGMENTOR_ARCHS
_BN_BUFFERS = {"running_mean": "mean", "running_var": "var"}
_IMAGE = (1, 64, 64, 3)  # any size with 4 MiT stages ≥ 1 token; parameter shapes don't depend on it


class ConversionError(errors.UserError, ValueError):
  """Names or shapes of a state_dict do not match the requested architecture."""


# ---------------------------------------------------------------- names and layouts

def torch_name_to_flax(name: str) -> tuple[str, ...] | None:
  """'block1.0.attn.kv.weight' → ('params', 'block1_0', 'attn', 'kv', 'kernel'); None = drop."""
  parts: list[str] = []
  for p in name.split("."):
    if p.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{p}"
    else:
      parts.append(p)
  if parts[-3:-1] == ["dwconv", "dwconv"]:  # MiT mlp.dwconv.dwconv → mlp/dwconv
    del parts[-2]
  *path, leaf = parts
  if leaf == "num_batches_tracked":
    return None
  if leaf in _BN_BUFFERS:
    return ("batch_stats", *path, _BN_BUFFERS[leaf])
  # 'weight' is resolved to 'kernel' or 'scale' by its rank in ``_flax_leaf``.
  return ("params", *path, leaf)


def _flax_leaf(key: tuple[str, ...], ndim: int) -> tuple[str, ...]:
  if key[0] == "params" and key[-1] == "weight":
    return key[:-1] + ("scale" if ndim == 1 else "kernel",)
  return key


def flax_path_to_torch(key: tuple[str, ...]) -> str:
  """('params', 'block1_0', 'mlp', 'dwconv', 'kernel') → 'block1.0.mlp.dwconv.dwconv.weight'."""
  collection, *path, leaf = key
  parts = []
  for i, p in enumerate(path):
    m = re.fullmatch(r"(.+)_(\d+)", p)
    parts.extend([m.group(1), m.group(2)] if m else [p])
    if p == "dwconv" and i > 0 and path[i - 1] == "mlp":
      parts.append("dwconv")
  if collection == "batch_stats":
    leaf = {v: k for k, v in _BN_BUFFERS.items()}[leaf]
  elif leaf in ("kernel", "scale"):
    leaf = "weight"
  return ".".join(parts + [leaf])


def torch_to_flax_layout(array: np.ndarray, is_kernel: bool) -> np.ndarray:
  """Linear [out, in] → [in, out]; Conv OIHW → HWIO (depthwise [C,1,k,k] → [k,k,1,C])."""
  if is_kernel and array.ndim == 2:
    return np.ascontiguousarray(array.T)
  if is_kernel and array.ndim == 4:
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  return array


def flax_to_torch_layout(array: np.ndarray, is_kernel: bool) -> np.ndarray:
  """Inverse of ``torch_to_flax_layout``: Dense [in, out] → [out, in]; HWIO → OIHW."""
  if is_kernel and array.ndim == 2:
    return np.ascontiguousarray(array.T)
  if is_kernel and array.ndim == 4:
    return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
  return array


# ---------------------------------------------------------------- model shapes from tensors

def _blocks(sd: Mapping[str, Any], prefix: str) -> int:
  """How many numbered children ``prefix.<i>.`` the state_dict has."""
  pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
  return len({m.group(1) for k in sd if (m := pat.match(k))})


def _need(sd: Mapping[str, Any], name: str, what: str) -> tuple[int, ...]:
  if name not in sd:
    raise ConversionError(f"state_dict has no {name!r}, so it does not hold {what}; "
                          f"first keys: {sorted(sd)[:8]}.")
  return tuple(np.shape(sd[name]))


def _mit_module(sd: Mapping[str, Any], p: str, arch: str | None = None) -> mit.MixVisionTransformer:
  if arch is not None:  # An explicit variant: shape mismatches are reported, not adapted to.
    return mit.mit(arch)
  dims = tuple(_need(sd, f"{p}patch_embed{i}.proj.weight", "a MiT encoder")[0] for i in range(1, 5))
  depths = tuple(_blocks(sd, f"{p}block{i}") for i in range(1, 5))
  srs = tuple(np.shape(sd[f"{p}block{i}.0.attn.sr.weight"])[-1]
              if f"{p}block{i}.0.attn.sr.weight" in sd else 1 for i in range(1, 5))
  ratios = tuple(np.shape(sd[f"{p}block{i}.0.mlp.fc1.weight"])[0] // dims[i - 1]
                 if f"{p}block{i}.0.mlp.fc1.weight" in sd else 4 for i in range(1, 5))
  for name, v in mit.MIT_VARIANTS.items():
    if (tuple(v["embed_dims"]), tuple(v["depths"])) == (dims, depths):
      return mit.mit(name)
  # Head counts leave no trace in the weights; 1 head per stage gives the same parameter tree.
  return mit.MixVisionTransformer(embed_dims=dims, num_heads=(1, 1, 1, 1), depths=depths,
                                  sr_ratios=srs, mlp_ratios=ratios)


def mit_variant(sd: Mapping[str, Any], prefix: str = "") -> str | None:
  """The ``MIT_VARIANTS`` name whose widths/depths match the state_dict, else None."""
  module = _mit_module(sd, prefix)
  for name, v in mit.MIT_VARIANTS.items():
    if (tuple(v["embed_dims"]), tuple(v["depths"])) == (tuple(module.embed_dims),
                                                         tuple(module.depths)):
      return name
  return None


def _resnet_module(sd: Mapping[str, Any], p: str):
  from mfm_jax.models import resnet  # pylint: disable=g-import-not-at-top
  blocks = tuple(_blocks(sd, f"{p}layer{i}") for i in range(1, 5))
  depth = {tuple(v): k for k, v in resnet.STAGE_BLOCKS.items()}.get(blocks)
  if depth is None:
    raise ConversionError(f"ResNet stage blocks {blocks} match no depth of "
                          f"resnet.STAGE_BLOCKS {dict(resnet.STAGE_BLOCKS)}.")
  deep_stem = f"{p}stem.0.weight" in sd
  # Dilation only changes the forward pass, never a parameter shape.
  return resnet.ResNetV1c(depth=depth, deep_stem=deep_stem, dilated=deep_stem)


def _head_module(sd: Mapping[str, Any], p: str, kind: str):
  """A 'daformer' or 'deeplab' decode head built from the tensors under prefix ``p``."""
  if kind == "daformer":
    if f"{p}fuse_layer.conv.weight" in sd:
      fusion, n = "conv1", 0
    else:
      n = _blocks(sd, f"{p}fuse_layer.aspp_modules")
      fusion = "sepaspp" if f"{p}fuse_layer.aspp_modules.1.depthwise_conv.conv.weight" in sd \
          else "aspp"
    if fusion != "conv1" and not 1 <= n <= 4:
      raise ConversionError(f"{p}fuse_layer has {n} ASPP branches; DAFormer uses 4.")
    return daformer_head.DAFormerHead(
        num_classes=_need(sd, f"{p}conv_seg.weight", "a DAFormer head")[0],
        embed_dim=_need(sd, f"{p}embed_layers.0.proj.weight", "a DAFormer head")[0],
        fusion=fusion, dilations=(1, 6, 12, 18)[:max(n, 1)])
  from mfm_jax.models import deeplab  # pylint: disable=g-import-not-at-top
  if f"{p}c1_bottleneck.conv.weight" in sd:
    return deeplab.DeepLabV3PlusHead(
        num_classes=_need(sd, f"{p}conv_seg.weight", "a DeepLabV3+ head")[0],
        channels=_need(sd, f"{p}bottleneck.conv.weight", "a DeepLabV3+ head")[0],
        c1_channels=sd[f"{p}c1_bottleneck.conv.weight"].shape[0],
        dilations=(1, 12, 24, 36)[:_blocks(sd, f"{p}aspp_modules")])
  n = _blocks(sd, f"{p}aspp_modules")
  if n == 0:
    raise ConversionError(f"No decode head found under {p!r} (no embed_layers, c1_bottleneck "
                          f"or aspp_modules); first keys: {sorted(sd)[:8]}.")
  return deeplab.DLV2Head(num_classes=_need(sd, f"{p}aspp_modules.0.conv.weight", "DLV2")[0],
                          dilations=(6, 12, 18, 24)[:n])


def _abstract(module, *args) -> tuple[dict[str, Any], Any]:
  out, variables = jax.eval_shape(
      lambda *a: module.init_with_output(jax.random.key(0), *a, train=False), *args)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}, out


def abstract_variables(sd: Mapping[str, Any], arch: str) -> dict[str, Any]:
  """``jax.eval_shape`` tree {'params', 'batch_stats'} of the model ``sd`` describes."""
  image = jax.ShapeDtypeStruct(_IMAGE, jnp.float32)
  if arch in MIT_ARCHS:
    return _abstract(_mit_module(sd, "", arch), image)[0]
  if arch == "resnet":
    return _abstract(_resnet_module(sd, ""), image)[0]
  if arch not in SEGMENTOR_ARCHS:
    raise ConversionError(f"Unknown arch {arch!r}; choose one of {list(ARCHS)} or 'auto'.")
  kind = "daformer" if arch in ("daformer", "hrda") else "deeplab"
  backbone = (_mit_module if kind == "daformer" else _resnet_module)(sd, "backbone.")
  enc, feats = _abstract(backbone, image)
  heads = {"head": "decode_head.head.", "scale_attention": "decode_head.scale_attention."} \
      if arch == "hrda" else {None: "decode_head."}
  tree = {"params": {"backbone": enc["params"], "decode_head": {}},
          "batch_stats": {"backbone": enc["batch_stats"], "decode_head": {}}}
  for name, prefix in heads.items():
    dec, _ = _abstract(_head_module(sd, prefix, kind), feats)
    for col in ("params", "batch_stats"):
      if name is None:
        tree[col]["decode_head"] = dec[col]
      else:
        tree[col]["decode_head"][name] = dec[col]
  # Drop empty sub-trees (no BN in MiT) so the tree equals the segmentor's own init tree.
  tree["batch_stats"] = {k: v for k, v in tree["batch_stats"].items() if v}
  return tree


def detect_arch(sd: Mapping[str, Any]) -> str:
  """Guesses the architecture from torch key names (and MiT widths/depths)."""
  keys = list(sd)
  has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
  if has("decode_head.scale_attention."):
    return "hrda"
  if has("decode_head.embed_layers."):
    return "daformer"
  if has("decode_head.c1_bottleneck."):
    return "dlv3p"
  if has("decode_head.aspp_modules."):
    return "dlv2"
  p = "backbone." if keys and all(k.startswith("backbone.") for k in keys) else ""
  if f"{p}patch_embed1.proj.weight" in sd:
    variant = mit_variant(sd, p)
    if variant is None:
      raise ConversionError("MiT encoder whose widths/depths match no MIT_VARIANTS entry; "
                            "pass an explicit arch.")
    return variant
  if f"{p}layer1.0.conv1.weight" in sd:
    return "resnet"
  raise ConversionError(
      "Cannot detect the architecture from the key names (no MiT patch_embed1, ResNet layer1, "
      f"or known decode_head keys); first keys: {sorted(keys)[:8]}. Pass arch= explicitly "
      f"(one of {list(ARCHS)}).")


# ---------------------------------------------------------------- conversion

def _format(names: list[str], limit: int = 12) -> str:
  return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _hint(sd: Mapping[str, Any], arch: str) -> str:
  try:
    guess = detect_arch(sd)
  except ConversionError:
    return ""
  return f" The key names suggest arch={guess!r}." if guess != arch else ""


def torch_to_flax(state_dict: Mapping[str, Any], arch: str = "auto",
                  target: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Torch state_dict (numpy arrays or tensors) → {'params': ..., 'batch_stats': ...}.

  Args:
    state_dict: names relative to the segmentor (``backbone.*``, ``decode_head.*``), or to the
      backbone for MiT/ResNet archs (a ``backbone.`` prefix on every key is accepted there).
    arch: one of ``ARCHS`` or 'auto' (``detect_arch``).
    target: optional abstract variables to check against instead of the tree rebuilt from the
      tensor shapes (e.g. the training config's model).

  Returns:
    Nested dicts of numpy arrays in Flax layout, exactly matching the model's init tree.

  Raises:
    ConversionError: listing missing, unexpected and mis-shaped names.
  """
  sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
        for k, v in state_dict.items()}
  arch = detect_arch(sd) if arch == "auto" else arch
  if arch in BACKBONE_ARCHS and sd and all(k.startswith("backbone.") for k in sd):
    sd = {k[len("backbone."):]: v for k, v in sd.items()}
  if target is None:
    try:
      target = abstract_variables(sd, arch)
    except ConversionError as e:
      raise ConversionError(f"arch={arch!r}: {e}{_hint(sd, arch)}") from None
  flat_target = flax.traverse_util.flatten_dict(dict(target))
  want = {k: tuple(v.shape) for k, v in flat_target.items()}
  out, source, unexpected, shapes, bad = {}, {}, [], [], set()
  for name, array in sd.items():
    key = torch_name_to_flax(name)
    if key is None:
      continue
    key = _flax_leaf(key, array.ndim)
    if key not in want:
      unexpected.append(name)
      continue
    if key in out:
      raise ConversionError(f"{name!r} and {source[key]!r} both map to {'/'.join(key)}.")
    value = torch_to_flax_layout(array, key[-1] == "kernel")
    if value.shape != want[key]:
      shapes.append(f"{name} {list(array.shape)} → {'/'.join(key)} wants {list(want[key])}")
      bad.add(key)
      continue
    if np.issubdtype(value.dtype, np.floating):  # e.g. float64 files → the model's float32
      value = value.astype(flat_target[key].dtype, copy=False)
    out[key], source[key] = value, name
  missing = sorted(flax_path_to_torch(k) for k in want if k not in out and k not in bad)
  if missing or unexpected or shapes:
    raise ConversionError(
        f"state_dict does not match arch={arch!r}: {len(missing)} missing "
        f"[{_format(missing)}]; {len(unexpected)} unexpected [{_format(sorted(unexpected))}]; "
        f"{len(shapes)} shape mismatches [{_format(shapes, 6)}].{_hint(sd, arch)}")
  tree = flax.traverse_util.unflatten_dict(out)
  return {"params": tree.get("params", {}), "batch_stats": tree.get("batch_stats", {})}


def flax_to_torch(variables: Mapping[str, Any], arch: str = "auto", prefix: str = "",
                  as_torch: bool = False, check: bool = True) -> dict[str, Any]:
  """{'params', 'batch_stats'} → state_dict with the reference names (inverse of ``torch_to_flax``).

  Adds ``num_batches_tracked`` = 0 (int64) for every BatchNorm so mmseg's strict loading
  accepts the file. ``prefix`` is prepended to every key ('model.' for a UDA wrapper,
  'backbone.' to embed a backbone). With ``check`` the result is converted back against the
  architecture's model tree (strict). Returns numpy arrays, or torch tensors if ``as_torch``.
  """
  flat = flax.traverse_util.flatten_dict(
      {"params": variables["params"], "batch_stats": variables.get("batch_stats") or {}})
  sd = {}
  for key, value in sorted(flat.items()):
    value = np.asarray(value)
    sd[flax_path_to_torch(key)] = flax_to_torch_layout(value, key[-1] == "kernel")
    if key[0] == "batch_stats" and key[-1] == "mean":
      sd[".".join(flax_path_to_torch(key).split(".")[:-1] + ["num_batches_tracked"])] = \
          np.zeros((), np.int64)
  if check:
    torch_to_flax(sd, arch)
  sd = {prefix + k: v for k, v in sd.items()}
  if as_torch:
    import torch  # pylint: disable=g-import-not-at-top
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
  return sd


def summarize(tree: Any) -> dict[str, Any]:
  """Arrays, scalars, sum of |values| and a sha256 over (path, dtype, shape, bytes) in path order."""
  flat = flax.traverse_util.flatten_dict(dict(tree)) if isinstance(tree, Mapping) else {}
  digest, total, count = hashlib.sha256(), 0.0, 0
  for key in sorted(flat):
    a = np.ascontiguousarray(np.asarray(flat[key]))
    digest.update(f"{'/'.join(map(str, key))}|{a.dtype.str}|{a.shape}".encode())
    digest.update(a.tobytes())
    total += float(np.abs(a.astype(np.float64)).sum())
    count += a.size
  return {"arrays": len(flat), "values": count, "sum_abs": total, "sha256": digest.hexdigest()}
