r"""HRDA (DAFormer-style UDA on the multi-resolution network) on GTA→Cityscapes, no MIC, no MFM.

Presets: see ``mfm_jax.config.fragments.PRESETS``; ``:mfm=True`` gives HRDA + MFM.
"""

from mfm_jax.config import base
from mfm_jax.config import fragments


def get_config(arg=None):
  c = base.base_config()
  fragments.daformer(c)
  fragments.hrda(c)
  return fragments.apply_presets(c, arg)
