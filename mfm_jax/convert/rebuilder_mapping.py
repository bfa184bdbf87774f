"""The authors' released MFM Rebuilder (github Wenlve-Zhou/MRM ``rebuilder.py``) ⇄ Orbax.

State_dict names of the release (uda_reference.md §7.2b): ``embedding.linear_embed.*``,
``transformer.mask_token`` [1, D, 1, 1], ``transformer.pos_embed`` [1, N, D] (a fixed sin-cos
table registered as a non-trainable parameter), ``transformer.blocks.<i>.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}.*``, ``transformer.norm.*`` and the projectors
``projector.projector<i>.{fpn.<j>, norm}.*`` (DAFormer head) or ``projector.{fpn.<j>, norm}.*``
(DeepLabV2 head). ``mfm_jax.models.rebuilder`` names its modules after them, so the generic
rules of ``mapping`` apply (``blocks.0`` → ``blocks_0``; transposed-conv weights [in, out, k, k]
take the OIHW → HWIO rule, which is the layout ``ConvTranspose2x`` stores); only the mask token
is reshaped, and the positional table is checked against ours instead of being stored.

The Orbax output holds ``{'params': {'rebuilder': ...}}``, read by ``config.mfm.init_from``.
A whole training checkpoint is accepted too: the Rebuilder's tensors are the ones under a
``rebuilder.`` prefix (also ``model.rebuilder.`` / ``module.``-wrapped).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mfm_jax.convert import mapping
from mfm_jax.models import rebuilder as rebuilder_lib

ARCHS = ("rebuilder_daformer", "rebuilder_dlv2")
_MASK_TOKEN = "transformer.mask_token"
_POS_EMBED = "transformer.pos_embed"


def unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  """The tensor dict of a loaded file: itself, or its 'state_dict' / 'model' entry."""
  def is_tensors(x):
    return isinstance(x, Mapping) and x and all(
        isinstance(k, str) and hasattr(v, "shape") for k, v in x.items())
  if is_tensors(obj):
    return obj
  for key in ("state_dict", "model"):
    if isinstance(obj, Mapping) and is_tensors(obj.get(key)):
      return obj[key]
  top = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
  raise mapping.ConversionError(f"{path}: no state_dict found (a dict of tensors, or one under "
                                f"'state_dict' / 'model'); top level is {top}.")


def select_rebuilder(sd: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
  """The Rebuilder's tensors of a state_dict (bare, or under a ``…rebuilder.`` prefix)."""
  sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
        for k, v in sd.items()}
  if all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  if any(k.startswith(("embedding.", "transformer.", "projector.")) for k in sd):
    return sd, []
  prefixes = sorted({m.group(1) for k in sd if (m := re.match(r"(.*?rebuilder\.)", k))})
  if len(prefixes) != 1:
    raise mapping.ConversionError(
        "No MFM Rebuilder tensors found: expected keys 'embedding.*', 'transformer.*', "
        "'projector.*' (or one '<...>rebuilder.' prefix before them); "
        f"prefixes seen: {prefixes or sorted({k.split('.')[0] for k in sd})[:8]}.")
  p = prefixes[0]
  out = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
  return out, [f"selected the {len(out)} Rebuilder tensors under {p!r}; ignored "
               f"{len(sd) - len(out)} other tensors"]


def _shape(sd, name, arch) -> tuple[int, ...]:
  if name not in sd:
    raise mapping.ConversionError(f"arch={arch!r}: missing {name!r}.")
  return tuple(sd[name].shape)


def _abstract(sd: Mapping[str, np.ndarray], arch: str) -> tuple[rebuilder_lib.Rebuilder, Any]:
  """The Flax Rebuilder the tensors describe (sizes read off them) and its eval_shape params."""
  dim, c_last = _shape(sd, "embedding.linear_embed.weight", arch)
  depth = len({m.group(1) for k in sd if (m := re.match(r"transformer\.blocks\.(\d+)\.", k))})
  single = arch == "rebuilder_dlv2"
  if single:
    projectors = {0: "projector."}
  else:
    projectors = {int(m.group(1)) - 1: f"projector.projector{m.group(1)}."
                  for k in sd if (m := re.match(r"projector\.projector(\d+)\.", k))}
    if not projectors:
      raise mapping.ConversionError(f"arch={arch!r}: no 'projector.projector<i>.' tensors; "
                                    "a DeepLabV2 Rebuilder is arch='rebuilder_dlv2'.")
  n_levels = 1 if single else max(projectors) + 1
  channels, steps = [c_last] * n_levels, {}
  for lvl, p in projectors.items():
    channels[lvl] = _shape(sd, f"{p}norm.weight", arch)[0]
    steps[lvl] = sum(1 for k, v in sd.items() if k.startswith(f"{p}fpn.") and k.endswith(
        ".weight") and v.ndim == 4 and v.shape[-1] == 4)
  if single:
    channels, steps = [c_last] * 4, {3: steps[0]}
    levels = (3,)
  else:
    levels = tuple(sorted(projectors))
  if channels[-1] != c_last:
    raise mapping.ConversionError(f"arch={arch!r}: the embedding reads {c_last} channels but the "
                                  f"last projector writes {channels[-1]}.")
  grid = 2
  feats = [jax.ShapeDtypeStruct((1, grid * 2 ** steps.get(i, 0), grid * 2 ** steps.get(i, 0),
                                 c), jnp.float32) for i, c in enumerate(channels)]
  module = rebuilder_lib.Rebuilder(channels=tuple(channels), levels=levels,
                                   single_projector=single, embed_dim=dim, depth=depth,
                                   num_heads=1)
  keep = jax.ShapeDtypeStruct((1, grid, grid), jnp.float32)
  params = jax.eval_shape(module.init, jax.random.key(0), feats, keep)["params"]
  return module, params


def torch_to_flax(state_dict: Mapping[str, Any], arch: str) -> tuple[dict[str, Any], list[str]]:
  """Released Rebuilder state_dict → Flax params (strict: names and shapes must match)."""
  if arch not in ARCHS:
    raise mapping.ConversionError(f"Unknown Rebuilder arch {arch!r}; choose one of {ARCHS}.")
  sd, notes = select_rebuilder(state_dict)
  _, target = _abstract(sd, arch)
  sd = dict(sd)
  if _MASK_TOKEN in sd:
    sd[_MASK_TOKEN] = sd[_MASK_TOKEN].reshape(-1)
  pos = sd.pop(_POS_EMBED, None)
  if pos is None:
    raise mapping.ConversionError(f"arch={arch!r}: missing {_POS_EMBED!r}.")
  n, dim = pos.shape[-2:]
  g = int(round(n ** 0.5))
  ours = rebuilder_lib.sincos_pos_embed(dim, (g, g))
  err = float(np.max(np.abs(pos.reshape(n, dim) - ours))) if g * g == n else np.inf
  if err > 1e-5:
    raise mapping.ConversionError(
        f"{_POS_EMBED} {list(pos.shape)} is not the fixed 2-D sin-cos table of a {g}x{g} grid "
        f"(max |difference| {err:.3g}); this is not the released Rebuilder.")
  notes.append(f"{_POS_EMBED}: the fixed {g}x{g} sin-cos table (max |diff| {err:.1e}); "
               "recomputed, not stored")
  variables = mapping.torch_to_flax(sd, arch, target={"params": target})
  return variables["params"], notes


def flax_to_torch(params: Mapping[str, Any], arch: str, grid: int = 16) -> dict[str, np.ndarray]:
  """Flax Rebuilder params → the release's state_dict (the positional table for ``grid``²)."""
  sd = mapping.flax_to_torch({"params": params, "batch_stats": {}}, check=False)
  token = sd[_MASK_TOKEN]
  sd[_MASK_TOKEN] = token.reshape(1, -1, 1, 1)
  sd[_POS_EMBED] = rebuilder_lib.sincos_pos_embed(token.size, (grid, grid))[None]
  torch_to_flax(sd, arch)  # strict check of the names and shapes written
  return sd


def convert_to_orbax(state_dict: Mapping[str, Any], output_dir: str, arch: str,
                     overwrite: bool = False) -> dict[str, Any]:
  """Writes ``{'params': {'rebuilder': ...}}``; returns the report fields."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  params, notes = torch_to_flax(state_dict, arch)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(output_dir), {"params": {"rebuilder": params}},
                      force=overwrite)
  return {"params": params, "notes": notes}
