"""Every MFM ablation switch and host method traces through the one train step, and the
deployed network with MFM equals the one without (parameters and FLOPs)."""

import jax
import jax.numpy as jnp
import pytest

from mfm_jax import benchmark, config_lib, state as state_lib
from mfm_jax.train_step import make_update_fn


def _config(method="mic", mfm=True, **overrides):
  c = config_lib.experiment(method, mfm, "synthetic")
  c.data.crop_size = (32, 32)
  c.mfm.grid_size = 4
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config_lib.validate(c)
  return c


def _trace(c):
  """Abstract evaluation of one update (no compilation): returns the metric names."""
  host = state_lib.build_host(c)
  task = state_lib.build_mfm_task(c)
  tx = state_lib.build_optimizer(c, host, task)
  state = state_lib.abstract_train_state(c, host, task, tx)
  b, (h, w) = c.data.batch_size, c.data.crop_size
  batch = dict(source_image=jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32),
               source_label=jax.ShapeDtypeStruct((b, h, w), jnp.int32),
               target_image=jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32),
               target_valid=jax.ShapeDtypeStruct((b, h, w), jnp.float32),
               target_label=jax.ShapeDtypeStruct((b, h, w), jnp.int32))
  new_state, metrics = jax.eval_shape(make_update_fn(c, host, task, tx), state, batch)
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
  return set(metrics)


@pytest.mark.parametrize("overrides,expect,absent", [
    ({}, {"loss/mfm_target"}, {"loss/mfm_source"}),
    ({"mfm.rebuild": False}, {"loss/mfm_target"}, set()),
    ({"mfm.objective": "feature"}, {"loss/mfm_target"}, set()),
    ({"mfm.objective": "pixel"}, {"loss/mfm_target"}, set()),
    ({"mfm.domain": "source"}, {"loss/mfm_source"}, {"loss/mfm_target"}),
    ({"mfm.domain": "both"}, {"loss/mfm_source", "loss/mfm_target"}, set()),
    ({"mfm.freeze": "encoder"}, {"loss/mfm_target"}, set()),
    ({"mfm.freeze": "decoder"}, {"loss/mfm_target"}, set()),
    ({"mfm.levels": "all"}, {"loss/mfm_target"}, set()),
    ({"mfm.mask_ratio": 0.7}, {"loss/mfm_target"}, set()),
])
def test_mfm_ablation_traces(overrides, expect, absent):
  names = _trace(_config(**overrides))
  assert expect <= names and not absent & names, names


@pytest.mark.parametrize("method,expect,absent", [
    ("source_only", {"loss/src_ce"}, {"loss/mix_ce", "loss/fd", "loss/mic_ce"}),
    ("dacs", {"loss/mix_ce"}, {"loss/fd", "loss/mic_ce"}),
    ("daformer", {"loss/mix_ce", "loss/fd"}, {"loss/mic_ce"}),
    ("mic", {"loss/mix_ce", "loss/fd", "loss/mic_ce"}, set()),
])
def test_host_methods_trace(method, expect, absent):
  names = _trace(_config(method=method, mfm=False))
  assert expect <= names and not absent & names and "loss/mfm_target" not in names


def test_rebuilder_only_in_training_state():
  c = _config()
  host, task = state_lib.build_host(c), state_lib.build_mfm_task(c)
  state = state_lib.abstract_train_state(c, host, task, state_lib.build_optimizer(c, host, task))
  assert set(state.params) == {"model", "rebuilder"}
  assert set(state.ema_params) == {"backbone", "decode_head"}


@pytest.mark.parametrize("preset", ["mic_mfm_daformer", "mic_mfm_hrda"])
def test_deployed_network_equal_with_and_without_mfm(preset):
  hrda = preset.endswith("hrda")
  with_mfm = config_lib.experiment("mic", True, "synthetic", hrda=hrda)
  without = config_lib.experiment("mic", False, "synthetic", hrda=hrda)
  a, b = benchmark.deployed_figures(with_mfm), benchmark.deployed_figures(without)
  assert a["tree"] == b["tree"]
  assert a["params"] == b["params"] > 0
  assert a["forward_flops"] == b["forward_flops"] > 0


def test_benchmark_prints_its_figures_on_cpu():
  """benchmark.run on a tiny MIC(DAFormer)+MFM step, with the PyTorch SegFormer comparison."""
  c = _config(**{"mesh.data": 1, "model.depthwise_impl": "xla"})  # cheapest compile
  out = benchmark.run(c, steps=2, warmup=1, with_torch=True)
  assert out["deployed_equal"] and out["devices"] == 1
  for key in ("compile_s", "step_s", "images_per_s", "xla_temp_gib", "xla_step_flops",
              "analytic_step_tflops", "achieved_tflops_s", "jax_supervised_step_s",
              "torch_step_s", "torch_over_jax_supervised"):
    assert out[key] > 0, key
  assert out["images_per_s"] == pytest.approx(2 * c.data.batch_size / out["step_s"])
  assert out["mfu"] is None  # no known peak for CPUs
  # Analytic count: source, ClassMix, MIC and MFM training passes (3F each) + the EMA teacher
  # and the ImageNet feature-distance encoder (F each) = 14F per image pair.
  assert c.uda.fd.enabled
  f = benchmark.deployed_figures(c)["forward_flops"]
  assert out["analytic_step_tflops"] * 1e12 == pytest.approx(14 * f * c.data.batch_size)


def test_benchmark_depthwise_table():
  c = _config()
  shapes = benchmark.depthwise_shapes(c)
  # mit_tiny (16, 32, 64, 128) × mlp_ratio 4 at strides 4..32 of 32², + sep. ASPP d = 6, 12, 18.
  e = c.model.head_embed_dim
  assert shapes == [(8, 8, 64, 1), (4, 4, 128, 1), (2, 2, 256, 1), (1, 1, 512, 1),
                    (8, 8, 4 * e, 6), (8, 8, 4 * e, 12), (8, 8, 4 * e, 18)]
  rows = benchmark.depthwise_table(c, steps=1, warmup=1)
  assert len(rows) == len(shapes) and all(r["xla_ms"] > 0 and r["shift_ms"] > 0 for r in rows)
