"""The benchmark's PyTorch twin (mfm_jax/torch_reference.py) is our network: MiT + DAFormer head
with separable ASPP, loaded with our Flax weights through convert.mapping, gives the same logits
(eval) and the same loss and gradients (train-mode BN, no dropout/drop-path) on the tiny config."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mfm_jax import torch_reference  # noqa: E402
from mfm_jax.convert import mapping  # noqa: E402
from mfm_jax.models import daformer_head  # noqa: E402
from mfm_jax.models import mit  # noqa: E402
from mfm_jax.models import segmentor  # noqa: E402
from mfm_jax.uda import losses  # noqa: E402

K, E, SIZE = 19, 32, 64


def _flax_model():
  return segmentor.EncoderDecoder(mit.mit("mit_tiny", drop_path_rate=0.0),
                                  daformer_head.DAFormerHead(num_classes=K, embed_dim=E))


def _variables(model, x):
  """Init, then non-trivial BN running statistics and biases (the default init hides them)."""
  v = model.init(jax.random.key(0), x, train=False)
  rng = np.random.default_rng(1)
  flat = flax.traverse_util.flatten_dict(v)
  for k, a in flat.items():
    if k[-1] in ("mean", "bias"):
      flat[k] = jnp.asarray(rng.normal(0, 0.1, a.shape), a.dtype)
    elif k[-1] in ("var", "scale"):
      flat[k] = jnp.asarray(rng.uniform(0.7, 1.3, a.shape), a.dtype)
  return flax.traverse_util.unflatten_dict(flat)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  y = rng.integers(0, K, (2, SIZE, SIZE)).astype(np.int32)
  y[:, :4] = 255
  model = _flax_model()
  v = _variables(model, x)
  twin = torch_reference.build("mit_tiny", K, E, drop_path_rate=0.0, dropout=0.0)
  torch_reference.load_flax(twin, v)
  return model, v, twin, x, y


def test_eval_logits_agree(setup):
  model, v, twin, x, _ = setup
  want = model.apply(v, x, train=False)
  with torch.no_grad():
    got = twin.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  assert got.shape == want.shape == (2, SIZE // 4, SIZE // 4, K)
  assert _rel(got, want) < 1e-4


def test_train_loss_and_gradients_agree(setup):
  model, v, twin, x, y = setup

  def loss_fn(params):
    logits, _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                            deterministic=True, mutable=["batch_stats"])
    return losses.cross_entropy(logits, y)

  loss, grads = jax.value_and_grad(loss_fn)(v["params"])
  twin.train().zero_grad()
  t_loss = torch_reference.cross_entropy(twin(torch.from_numpy(x.transpose(0, 3, 1, 2))),
                                         torch.from_numpy(y.astype(np.int64)))
  t_loss.backward()
  assert float(t_loss.detach()) == pytest.approx(float(loss), rel=1e-5)
  want = mapping.flax_to_torch({"params": grads, "batch_stats": v["batch_stats"]}, "daformer")
  named = dict(twin.named_parameters())
  errs = {n: _rel(p.grad.numpy(), want[n]) for n, p in named.items()}
  assert len(errs) == len([k for k in want if not k.endswith(
      ("running_mean", "running_var", "num_batches_tracked"))])
  assert max(errs.values()) < 1e-4, sorted(errs.items(), key=lambda kv: -kv[1])[:5]


def test_config_twin_and_step_timing():
  """model_from_config builds the configured twin; its step runs under the benchmark's timer
  (wall and process CPU time)."""
  from mfm_jax import benchmark  # pylint: disable=g-import-not-at-top
  from mfm_jax.config import fragments  # pylint: disable=g-import-not-at-top
  c = fragments.compose(fragments.source_only, presets="synthetic")
  c.data.crop_size, c.data.batch_size, c.model.head_embed_dim = (32, 32), 1, E
  v = _flax_model().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  threads = torch.get_num_threads()
  try:
    step, info = torch_reference.train_step(c, v, benchmark.fake_batch(c), threads=1)
    assert info["torch_threads"] == 1
  finally:
    torch.set_num_threads(threads)
  wall, cpu = benchmark.timed(step, steps=2, warmup=1)
  assert wall > 0 and cpu > 0
  assert info["torch_params"] == sum(a.size for a in jax.tree_util.tree_leaves(v["params"]))
