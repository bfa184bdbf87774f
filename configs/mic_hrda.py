r"""MIC(HRDA) on GTA→Cityscapes (75.9 mIoU in the MIC paper), no MFM.

Presets: see ``config_lib.experiment``.
"""

from mfm_jax.config import lib as config_lib


def get_config(arg=None):
  return config_lib.experiment("mic", False, arg, hrda=True)
