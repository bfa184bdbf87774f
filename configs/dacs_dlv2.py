r"""DACS on GTA→Cityscapes with DeepLabV2 (ResNet-101 V1c, dlv2red head), 512 crops.

The MFM paper's DACS row (52.1 → 55.9 mIoU, mfm_method.md). Presets: see mfm_jax.config.fragments.PRESETS.
"""

from mfm_jax.config import base
from mfm_jax.config import fragments


def get_config(arg=None):
  c = base.base_config()
  fragments.dacs(c)
  fragments.deeplabv2(c)
  return fragments.apply_presets(c, arg)
