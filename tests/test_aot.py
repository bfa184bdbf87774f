"""Ahead-of-time compilation for TPU topologies (``benchmark --aot``, ``trainer/aot.py``).

The compile test needs the TPU compiler (libtpu, from ``pip install "jax[tpu]"``); it is
skipped, saying so, only when libtpu is not installed (CI does not install it). No TPU is used.
"""

import pytest

from mfm_jax.config import fragments
from mfm_jax.trainer import aot


def test_chip_kinds_and_hbm_table():
  assert aot.chip_kind("v5e:2x2") == "v5e" and aot.chip_kind("v5litepod:2x2") == "v5e"
  assert aot.chip_kind("v5p:2x2x1") == "v5p" and aot.chip_kind("v4:2x2x1") == "v4"
  assert aot.HBM_GIB["v5e"] == 16.0 and aot.HBM_GIB["v5p"] == 95.0
  with pytest.raises(ValueError, match="unknown TPU generation 'h100'"):
    aot.chip_kind("h100:8")


def test_aot_config_batch_per_device_and_depthwise():
  c = fragments.compose(fragments.mic, fragments.mfm)  # full size: 512² crops, batch 2
  a = aot.aot_config(c, batch_per_device=2, num_devices=4)
  assert a.data.batch_size == 8 and a.mesh.data == 4
  assert a.model.depthwise_impl == "xla"  # 'auto' would pick the CPU's 'shift' here
  assert c.data.batch_size == 2  # the input config is not modified


@pytest.mark.skipif(not aot.tpu_compiler_available(),
                    reason="libtpu not installed (pip install \"jax[tpu]\"): no TPU compiler")
def test_compile_tiny_step_for_v5e():
  c = fragments.compose(fragments.source_only, presets="synthetic")
  out = aot.compile_step(c, "v5e:2x2", batch_per_device=1)
  assert out["devices"] == 4 and out["chip"] == "v5e" and out["fits"]
  assert 0 < out["argument_gib"] < 0.1 and out["temp_gib"] >= 0 and out["total_gib"] > 0
  assert out["xla_flops_per_step"] == pytest.approx(4 * out["xla_flops_per_device"])
  assert out["xla_flops_per_device"] > 1e8  # a real forward + backward, not an empty program
  assert out["hlo_ops"] >= out["hlo_ops_top_level"] > 100 and out["state_arrays"] > 50


def test_program_size_counts_operations_per_function():
  text = ('func.func public @main(%arg0: tensor<f32>) -> tensor<f32> {\n'
          '    %0 = stablehlo.add %arg0, %arg0 : tensor<f32>\n'
          '    %1 = call @f(%0) : (tensor<f32>) -> tensor<f32>\n'
          '    return %1 : tensor<f32>\n  }\n'
          '  func.func private @f(%arg0: tensor<f32>) -> tensor<f32> {\n'
          '    %0 = chlo.square %arg0 : tensor<f32>\n'
          '    %1 = stablehlo.multiply %0, %0 : tensor<f32>\n'
          '    return %1 : tensor<f32>\n  }\n')
  assert aot.program_size(text, 7) == {"hlo_ops": 3, "hlo_ops_top_level": 1, "state_arrays": 7}
