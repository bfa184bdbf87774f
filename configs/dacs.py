r"""DACS on GTA→Cityscapes, MiT-B5 + DAFormer head, 512 crops.

Presets (--config=configs/dacs.py:synthetic,steps=200): see config_lib.experiment.
"""

from mfm_jax.config import lib as config_lib


def get_config(arg=None):
  return config_lib.experiment("dacs", False, arg)
