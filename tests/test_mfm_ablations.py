"""Every MFM ablation switch and host method traces through the one train step, and the
deployed network with MFM equals the one without (parameters and FLOPs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfm_jax import benchmark
from mfm_jax.config import fragments
from mfm_jax.config import validation
from mfm_jax.trainer import state as state_lib
from mfm_jax.trainer.step import make_update_fn


def _config(method="mic", mfm=True, **overrides):
  c = fragments.compose(getattr(fragments, method), *([fragments.mfm] if mfm else []), presets="synthetic")
  c.data.crop_size = (32, 32)
  c.mfm.grid_size = 4
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  validation.validate(c)
  return c


def _trace(c):
  """Abstract evaluation of one update (no compilation): returns the metric names."""
  net = state_lib.build_network(c)
  task = state_lib.build_mfm_task(c)
  tx = state_lib.build_optimizer(c, net, task)
  state = state_lib.abstract_train_state(c, net, task, tx)
  b, (h, w) = c.data.batch_size, c.data.crop_size
  batch = dict(source_image=jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8),
               source_size=jax.ShapeDtypeStruct((b, 2), jnp.int32),
               source_label=jax.ShapeDtypeStruct((b, h, w), jnp.int32),
               target_image=jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8),
               target_size=jax.ShapeDtypeStruct((b, 2), jnp.int32),
               target_valid=jax.ShapeDtypeStruct((b, h, w), jnp.float32),
               target_label=jax.ShapeDtypeStruct((b, h, w), jnp.int32))
  new_state, metrics = jax.eval_shape(make_update_fn(c, net, task, tx), state, batch)
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
  return set(metrics)


# The whole ablation grid (mfm_method.md "Ablations"): every combination `validate` accepts
# traces through the one train step; every rejected one names the offending key.
_GRID = [dict(rebuild=r, objective=o, domain=d, freeze=f, levels=lv)
         for r in (True, False) for o in ("classification", "feature", "pixel")
         for d in ("target", "source", "both") for f in ("none", "encoder", "decoder")
         for lv in ("all", "last")]


def _grid_config(combo, method="dacs"):
  c = fragments.compose(getattr(fragments, method), fragments.mfm, presets="synthetic")
  c.data.crop_size = (64, 64)  # last MiT level 2×2: a 2×2 token grid
  for k, v in combo.items():
    c.mfm[k] = v
  return c


def _accepted():
  ok, rejected = [], []
  for combo in _GRID:
    try:
      validation.validate(_grid_config(combo))
      ok.append(combo)
    except validation.ConfigError as e:
      rejected.append((combo, str(e)))
  return ok, rejected


def test_ablation_grid_validation_names_the_key():
  ok, rejected = _accepted()
  assert len(ok) + len(rejected) == len(_GRID) == 108
  # rebuild off only with classification; freeze=decoder only with classification.
  for combo, msg in rejected:
    assert combo["rebuild"] is False or combo["freeze"] == "decoder", combo
    assert ("config.mfm.rebuild" in msg) or ("config.mfm.freeze" in msg), (combo, msg)
  for combo in ok:
    assert combo["rebuild"] or combo["objective"] == "classification"
    assert combo["freeze"] != "decoder" or combo["objective"] == "classification"
  assert len(ok) == 2 * (9 + 6 + 6) + 2 * 9  # 42 with the Rebuilder + 18 masking-only
  c = _grid_config(dict(objective="classification"))
  c.uda.enabled = False
  with pytest.raises(validation.ConfigError, match="config.mfm.domain"):
    validation.validate(c)
  c = _grid_config(dict(mask_strategy="uncertainty", domain="both"))
  with pytest.raises(validation.ConfigError, match="config.mfm.mask_strategy"):
    validation.validate(c)
  c = _grid_config(dict(objective="pixel"))
  c.data.crop_size = (64, 96)
  c.mfm.grid_size = 7
  validation.validate(c)  # 2×3 last level → grid 2×3, 64/2 and 96/3 divide
  c.data.crop_size = (96, 96)
  c.mfm.grid_size = 2
  validation.validate(c)
  c.mfm.grid_size = 100
  with pytest.raises(validation.ConfigError, match="config.mfm.grid_size"):
    validation.validate(c)


def _trace_ids():
  ok, _ = _accepted()
  # levels='last' only matters with the Rebuilder's projectors: trace it at freeze='none'.
  return [c for c in ok if c["levels"] == "all" or (c["freeze"] == "none" and c["rebuild"])]


@pytest.mark.parametrize("combo", _trace_ids(), ids=lambda c: "-".join(
    f"{v}" for v in c.values()))
def test_ablation_grid_traces(combo):
  names = _trace(_grid_config(combo))
  want = {"target": {"loss/mfm_target"}, "source": {"loss/mfm_source"},
          "both": {"loss/mfm_target", "loss/mfm_source"}}[combo["domain"]]
  assert {n for n in names if n.startswith("loss/mfm")} == want, names


def test_mask_strategy_uncertainty_traces():
  assert "loss/mfm_target" in _trace(_grid_config(dict(mask_strategy="uncertainty")))


def _mfm_setup(combo):
  """(state, f) with f(params) = the MFM terms alone on a fixed random batch (64² crops: a 2×2
  token grid, so some tokens are masked, some not). The model parameters, the batch and the
  RNG keys do not depend on ``combo``."""
  c = _grid_config(combo)
  validation.validate(c)
  net, task = state_lib.build_network(c), state_lib.build_mfm_task(c)
  tx = state_lib.build_optimizer(c, net, task)
  st = state_lib.create_train_state(c, net, task, tx)
  rng = np.random.default_rng(0)
  b = 2
  img = jnp.asarray(rng.normal(size=(b, 64, 64, 3)), jnp.float32)
  lbl = jnp.asarray(rng.integers(0, 19, size=(b, 64, 64)), jnp.int32)
  keys = {k: jax.random.key(i) for i, k in enumerate(("mfm_tgt_enc", "mfm_tgt", "mfm_src"))}
  bs = st.batch_stats

  def f(params):
    t_logits, t_feats, _ = net.predict({"params": st.ema_params, "batch_stats": bs}, img,
                                        train=True)
    src_feats, _ = net.encode({"params": params["model"], "batch_stats": bs}, img, train=True)
    terms, _ = task.terms(params, net, bs, keys=keys,
                          target=dict(images=img, labels=lbl, weights=jnp.ones((b, 64, 64)),
                                      teacher_features=t_feats, teacher_logits=t_logits),
                          source=dict(images=img, labels=lbl, features=src_feats,
                                      teacher_features=t_feats))
    return terms

  return st, f


def _mfm_grads(combo):
  """Gradients of the MFM term alone w.r.t. {'model', 'rebuilder'} on a random batch."""
  st, f = _mfm_setup(combo)
  return jax.jit(jax.grad(lambda p: sum(f(p).values())))(st.params)


def _mfm_terms(combo):
  st, f = _mfm_setup(combo)
  return {k: float(v) for k, v in jax.jit(f)(st.params).items()}, st


_DEFAULT_TERMS = []


def _default_terms():
  if not _DEFAULT_TERMS:
    _DEFAULT_TERMS.append(_mfm_terms({})[0])
  return _DEFAULT_TERMS[0]


# combo → how its MFM value relates to the default's (target, classification, Rebuilder on all
# levels, random masking, nothing frozen) for the same parameters, batch and keys.
_VALUE_CASES = [
    (dict(objective="feature"), "differs"),
    (dict(objective="pixel"), "differs"),
    (dict(rebuild=False), "differs"),
    (dict(levels="last"), "differs"),
    # On a 2×2 grid the guided draw can pick the random draw's cells: value checks only.
    (dict(mask_strategy="uncertainty"), "finite"),
    (dict(domain="both"), "target_equal"),
    (dict(freeze="encoder"), "equal"),  # freezing stops gradients, never changes the value
]


@pytest.mark.parametrize("combo,relation", _VALUE_CASES,
                         ids=lambda x: "-".join(f"{v}" for v in x.values())
                         if isinstance(x, dict) else x)
def test_ablation_changes_the_mfm_value(combo, relation):
  default = _default_terms()
  assert set(default) == {"mfm_target"}
  assert np.isfinite(default["mfm_target"]) and default["mfm_target"] > 0
  terms, st = _mfm_terms(combo)
  want = {"target": {"mfm_target"}, "source": {"mfm_source"},
          "both": {"mfm_target", "mfm_source"}}[combo.get("domain", "target")]
  assert set(terms) == want, terms  # the switched-off domain has no term at all
  assert all(np.isfinite(v) and v > 0 for v in terms.values()), terms
  assert ("rebuilder" in st.params) == combo.get("rebuild", True)
  if relation == "equal":
    assert terms["mfm_target"] == pytest.approx(default["mfm_target"], rel=1e-6)
  elif relation == "target_equal":
    # 'both' = the default's target term (same keys, same features) + a source term.
    assert terms["mfm_target"] == pytest.approx(default["mfm_target"], rel=1e-5)
  elif relation == "differs":
    # Deterministic computation: an ignored switch reproduces the default's value exactly (an
    # untrained decoder on random labels keeps the CE near log 19, so changes are small).
    assert terms["mfm_target"] != pytest.approx(default["mfm_target"], rel=1e-6, abs=0)


def _norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree)))


@pytest.mark.parametrize("objective,freezes", [("classification", ("encoder", "decoder")),
                                               ("feature", ("encoder",))])
def test_freeze_gives_exactly_zero_gradients(objective, freezes):
  none = _mfm_grads(dict(freeze="none", objective=objective))
  assert _norm(none["model"]["backbone"]) > 0 and _norm(none["rebuilder"]) > 0
  for freeze in freezes:
    g = _mfm_grads(dict(freeze=freeze, objective=objective))
    frozen, other = (("backbone", "decode_head") if freeze == "encoder"
                     else ("decode_head", "backbone"))
    assert _norm(g["model"][frozen]) == 0.0, freeze
    assert _norm(g["rebuilder"]) > 0
    if objective == "classification":
      assert _norm(none["model"][frozen]) > 0 and _norm(g["model"][other]) > 0


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
  net, task = state_lib.build_network(c), state_lib.build_mfm_task(c)
  state = state_lib.abstract_train_state(c, net, task, state_lib.build_optimizer(c, net, task))
  assert set(state.params) == {"model", "rebuilder"}
  assert set(state.ema_params) == {"backbone", "decode_head"}


@pytest.mark.parametrize("preset", ["mic_mfm_daformer", "mic_mfm_hrda"])
def test_deployed_network_equal_with_and_without_mfm(preset):
  hrda = preset.endswith("hrda")
  with_mfm = fragments.compose(fragments.mic, *([fragments.hrda] if hrda else []), fragments.mfm, presets="synthetic")
  without = fragments.compose(fragments.mic, *([fragments.hrda] if hrda else []), presets="synthetic")
  a, b = benchmark.deployed_figures(with_mfm), benchmark.deployed_figures(without)
  assert a["tree"] == b["tree"]
  assert a["params"] == b["params"] > 0
  assert a["forward_flops"] == b["forward_flops"] > 0


def test_benchmark_prints_its_figures_on_cpu():
  """benchmark.run on a tiny MIC(DAFormer)+MFM step, with the side-by-side supervised step of
  the same network in PyTorch (torch_reference twin, same weights) and in JAX."""
  c = _config(**{"mesh.data": 1, "model.depthwise_impl": "xla"})  # cheapest compile
  out = benchmark.run(c, steps=2, warmup=1, with_torch=True)
  assert out["deployed_equal"] and out["devices"] == 1
  assert out["rebuilder_params"] == benchmark.rebuilder_params(c) > 0
  assert out["mfm_step_flops_ratio"] > 1.0 and out["xla_temp_gib_without_mfm"] > 0
  for key in ("compile_s", "step_s", "images_per_s", "xla_temp_gib", "xla_step_flops",
              "analytic_step_tflops", "achieved_tflops_s", "step_cpu_s", "jax_supervised_step_s",
              "jax_supervised_cpu_s", "torch_step_s", "torch_cpu_s", "jax_cores_used",
              "torch_cores_used", "torch_over_jax"):
    assert out[key] > 0, key
  assert out["jax_over_torch"] == pytest.approx(1.0 / out["torch_over_jax"])
  assert out["compared_network"] == "mit_tiny+daformer_sepaspp"
  assert out["jax_depthwise_impl"] == "xla"
  assert out["torch_params"] == out["deployed_params_without_mfm"]
  assert out["images_per_s"] == pytest.approx(2 * c.data.batch_size / out["step_s"])
  assert out["mfu"] is None  # no known peak for CPUs
  # Analytic count: source, ClassMix, MIC and MFM training passes (3F each) + the EMA teacher
  # and the ImageNet feature-distance encoder (F each) = 14F per image pair.
  assert c.uda.fd.enabled
  f = benchmark.deployed_figures(c)["forward_flops"]
  assert out["analytic_step_tflops"] * 1e12 == pytest.approx(14 * f * c.data.batch_size)


def test_deployed_flops_count_every_block_also_with_scan_blocks():
  """XLA's cost analysis counts a loop body once: the analytic forward is counted unrolled."""
  c = _config()
  c.model.backbone = "mit_b0"  # two blocks per stage
  c.data.crop_size = (32, 32)
  plain = benchmark.deployed_figures(c)["forward_flops"]
  c.model.scan_blocks = True
  assert benchmark.deployed_figures(c)["forward_flops"] == plain
  assert c.model.scan_blocks  # the caller's config is left as it was


def test_benchmark_depthwise_table():
  c = _config()
  shapes = benchmark.depthwise_shapes(c)
  # mit_tiny (16, 32, 64, 128) × mlp_ratio 4 at strides 4..32 of 32², + sep. ASPP d = 6, 12, 18.
  e = c.model.head_embed_dim
  assert shapes == [(8, 8, 64, 1), (4, 4, 128, 1), (2, 2, 256, 1), (1, 1, 512, 1),
                    (8, 8, 4 * e, 6), (8, 8, 4 * e, 12), (8, 8, 4 * e, 18)]
  rows = benchmark.depthwise_table(c, steps=1, warmup=1)
  assert len(rows) == len(shapes) and all(r["xla_ms"] > 0 and r["shift_ms"] > 0 for r in rows)


def test_benchmark_upsample_table():
  """The Rebuilder projectors' ×2 transposed convs at 256² (grid 8; levels 64/32/16/8 need
  3/2/1/0 steps), timed in both formulations."""
  c = _config(**{"data.crop_size": (256, 256), "mfm.grid_size": 16})
  d, b = c.mfm.embed_dim, c.data.batch_size
  assert benchmark.upsample_shapes(c) == [(b, 8, 8, d, d // 2, 3), (b, 16, 16, d // 2, d // 4, 2),
                                          (b, 32, 32, d // 4, d // 4, 1)]
  rows = benchmark.upsample_table(c, steps=1, warmup=1)
  assert len(rows) == 3 and all(r["transpose_ms"] > 0 and r["subpixel_ms"] > 0 for r in rows)
