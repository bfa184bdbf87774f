r"""DAFormer on GTA→Cityscapes, MiT-B5 + DAFormer head, 512 crops.

Presets (--config=configs/daformer.py:synthetic,steps=200): see mfm_jax.config.fragments.PRESETS.
"""

from mfm_jax.config import base
from mfm_jax.config import fragments


def get_config(arg=None):
  c = base.base_config()
  fragments.daformer(c)
  return fragments.apply_presets(c, arg)
