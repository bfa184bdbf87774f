"""Hugging Face ``transformers`` SegFormer encoder names → the reference MiT names (§1.1).

``SegformerModel`` (transformers 4.x and 5.x) keeps the attention's k and v as two Linear
layers; the reference fuses them as kv = [k | v] along the output axis. The result is a
reference-named MiT state_dict that ``mapping.torch_to_flax`` converts like any other.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from mfm_jax.convert import mapping

# transformers ``SegformerModel`` names (5.x and 4.x) → reference MiT names (§1.1). HF keeps k
# and v as two Linear layers; the reference fuses them as kv = [k | v] along the output axis.
_HF_SEGFORMER_RULES = [
    (r"stages\.(\d+)\.patch_embeddings\.proj\.", "patch_embed{s}.proj."),
    (r"stages\.(\d+)\.patch_embeddings\.layer_norm\.", "patch_embed{s}.norm."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.layernorm_before\.", "block{s}.{b}.norm1."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.layernorm_after\.", "block{s}.{b}.norm2."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attention\.q_proj\.", "block{s}.{b}.attn.q."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attention\.o_proj\.", "block{s}.{b}.attn.proj."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attention\.sequence_reduction\.sequence_reduction\.",
     "block{s}.{b}.attn.sr."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attention\.sequence_reduction\.layer_norm\.",
     "block{s}.{b}.attn.norm."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.", "block{s}.{b}.mlp."),
    (r"stages\.(\d+)\.layer_norm\.", "norm{s}."),
    # transformers 4.x names (also the layout of the SegFormer checkpoints on the HF hub).
    (r"encoder\.patch_embeddings\.(\d+)\.proj\.", "patch_embed{s}.proj."),
    (r"encoder\.patch_embeddings\.(\d+)\.layer_norm\.", "patch_embed{s}.norm."),
    (r"encoder\.block\.(\d+)\.(\d+)\.layer_norm_1\.", "block{s}.{b}.norm1."),
    (r"encoder\.block\.(\d+)\.(\d+)\.layer_norm_2\.", "block{s}.{b}.norm2."),
    (r"encoder\.block\.(\d+)\.(\d+)\.attention\.self\.query\.", "block{s}.{b}.attn.q."),
    (r"encoder\.block\.(\d+)\.(\d+)\.attention\.output\.dense\.", "block{s}.{b}.attn.proj."),
    (r"encoder\.block\.(\d+)\.(\d+)\.attention\.self\.sr\.", "block{s}.{b}.attn.sr."),
    (r"encoder\.block\.(\d+)\.(\d+)\.attention\.self\.layer_norm\.", "block{s}.{b}.attn.norm."),
    (r"encoder\.block\.(\d+)\.(\d+)\.mlp\.dense1\.", "block{s}.{b}.mlp.fc1."),
    (r"encoder\.block\.(\d+)\.(\d+)\.mlp\.dense2\.", "block{s}.{b}.mlp.fc2."),
    (r"encoder\.block\.(\d+)\.(\d+)\.mlp\.", "block{s}.{b}.mlp."),
    (r"encoder\.layer_norm\.(\d+)\.", "norm{s}."),
]
# The k / v projections in 5.x and 4.x naming (``which`` starts with 'k' or 'v').
_HF_KV = (
    re.compile(r"stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.attention\.(?P<which>[kv])_proj\."
               r"(?P<leaf>weight|bias)$"),
    re.compile(r"encoder\.block\.(?P<s>\d+)\.(?P<b>\d+)\.attention\.self\.(?P<which>key|value)\."
               r"(?P<leaf>weight|bias)$"),
)


def hf_segformer_to_reference(hf_state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Hugging Face ``SegformerModel`` encoder weights → reference MiT state_dict (numpy).

  A leading ``segformer.`` (from ``SegformerFor*``) is stripped; any other unmatched name (HF
  decode head, classifier) raises ``ConversionError``.
  """
  sd = {k[len("segformer."):] if k.startswith("segformer.") else k:
        (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
        for k, v in hf_state_dict.items()}
  out, kv, unknown = {}, {}, []
  for name, value in sd.items():
    m = next((m for m in (p.match(name) for p in _HF_KV) if m), None)
    if m:
      key = f"block{int(m['s']) + 1}.{m['b']}.attn.kv.{m['leaf']}"
      kv.setdefault(key, {})[m["which"][0]] = value
      continue
    for pattern, repl in _HF_SEGFORMER_RULES:
      m = re.match(pattern, name)
      if m:
        g = m.groups()
        new = repl.format(s=int(g[0]) + 1, b=g[1] if len(g) > 1 else "")
        out[new + name[m.end():]] = value
        break
    else:
      unknown.append(name)
  if unknown:
    raise mapping.ConversionError(f"{len(unknown)} Hugging Face SegFormer names have no MiT "
                          f"counterpart: {mapping._format(sorted(unknown))}.")
  for name, parts in kv.items():
    if set(parts) != {"k", "v"}:
      raise mapping.ConversionError(f"{name}: Hugging Face state_dict has only {sorted(parts)} of k/v.")
    out[name] = np.concatenate([parts["k"], parts["v"]], axis=0)
  return out
