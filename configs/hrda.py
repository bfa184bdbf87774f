r"""HRDA (DAFormer-style UDA on the multi-resolution network) on GTA→Cityscapes, no MIC, no MFM.

Presets: see ``config_lib.experiment``; ``:mfm=True`` gives HRDA + MFM.
"""

from mfm_jax.config import lib as config_lib


def get_config(arg=None):
  return config_lib.experiment("daformer", False, arg, hrda=True)
