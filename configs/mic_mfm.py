r"""MIC(HRDA) + MFM on GTA→Cityscapes: the MFM paper's best result (77.5 mIoU, mfm_method.md).

MiT-B5 + DAFormer head inside HRDA (1024 crops, LR context ×0.5, 512 HR detail crops, scale
attention), MIC with 64-px blocks, MFM on the context features. Presets
(``--config=configs/mic_mfm.py:synthetic``): see ``mfm_jax.config.fragments.PRESETS``. The MIC(DAFormer)
variant is ``configs/mic_mfm_daformer.py``.
"""

from mfm_jax.config import base
from mfm_jax.config import fragments


def get_config(arg=None):
  c = base.base_config()
  fragments.mic(c)
  fragments.hrda(c)
  fragments.mfm(c)
  return fragments.apply_presets(c, arg)
