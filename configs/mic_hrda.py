r"""MIC(HRDA) on GTA→Cityscapes (75.9 mIoU in the MIC paper), no MFM.

Presets: see ``mfm_jax.config.fragments.PRESETS``.
"""

from mfm_jax.config import base
from mfm_jax.config import fragments


def get_config(arg=None):
  c = base.base_config()
  fragments.mic(c)
  fragments.hrda(c)
  return fragments.apply_presets(c, arg)
