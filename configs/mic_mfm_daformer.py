r"""MIC(DAFormer) + MFM on GTA→Cityscapes, MiT-B5 + DAFormer head, 512 crops (no HRDA).

Presets (--config=configs/mic_mfm.py:synthetic,steps=200): see config_lib.experiment.
"""

from mfm_jax.config import lib as config_lib


def get_config(arg=None):
  return config_lib.experiment("mic", True, arg)
