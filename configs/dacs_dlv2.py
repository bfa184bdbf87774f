r"""DACS on GTA→Cityscapes with DeepLabV2 (ResNet-101 V1c, dlv2red head), 512 crops.

The MFM paper's DACS row (52.1 → 55.9 mIoU, mfm_method.md). Presets: see config_lib.experiment.
"""

from mfm_jax.config import lib as config_lib


def get_config(arg=None):
  return config_lib.experiment("dacs", False, arg, backbone="resnet101_v1c", head="dlv2red")
