"""The package's layout stays what docs/architecture.md says: every module documented, none too
long, no import circles, one home per config default, and train-state trees (hence
checkpoints) unchanged by reorganisations."""

import ast
import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from mfm_jax.config import base
from mfm_jax.config import fragments
from mfm_jax.config import validation
from mfm_jax.trainer import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs"))
import make_architecture  # noqa: E402  pylint: disable=g-import-not-at-top

MAX_LINES = 420  # "no module over ~400 lines"


def test_architecture_doc_is_generated_from_the_tree():
  """docs/architecture.md's module map is exactly what docs/make_architecture.py writes, so it
  names every module of the package and no module that does not exist."""
  with open(make_architecture.DOC, encoding="utf-8") as f:
    text = f.read()
  assert make_architecture.render(text) == text, (
      "docs/architecture.md is stale: run `python docs/make_architecture.py`.")
  named = {m for m in __import__("re").findall(r"`(mfm_jax/[\w/]+\.py)`", text)}
  modules = set(make_architecture.package_modules())
  assert named - modules == set(), f"architecture.md names missing modules: {named - modules}"
  assert modules - named == set(), f"modules missing from architecture.md: {modules - named}"


def test_readme_and_docs_name_only_existing_modules():
  for doc in ("README.md", "docs/architecture.md"):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
      text = f.read()
    for path in set(__import__("re").findall(r"(mfm_jax/[\w/]+\.py)", text)):
      assert os.path.exists(os.path.join(ROOT, path)), f"{doc} names {path}, which is gone"


def test_no_module_over_the_size_guide():
  long = {m: n for m in make_architecture.package_modules()
          if (n := sum(1 for _ in open(os.path.join(ROOT, m), encoding="utf-8"))) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines: {long}"


def _module_imports() -> dict[str, set[str]]:
  """Module → package modules it imports at module level (lazy imports in functions excluded)."""
  graph = {}
  for path in make_architecture.package_modules():
    name = path[:-3].replace("/", ".").removesuffix(".__init__")
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    deps = set()
    for node in tree.body:
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mfm_jax"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          spec_path = os.path.join(ROOT, *full.split(".")) + ".py"
          deps.add(full if os.path.exists(spec_path) else node.module)
      elif isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name.startswith("mfm_jax."))
    graph[name] = deps - {name}
  return graph


def test_no_import_circles():
  graph = _module_imports()
  state: dict[str, int] = {}
  cycles = []

  def visit(node, trail):
    state[node] = 1
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 1:
        cycles.append(trail[trail.index(dep):] + [dep] if dep in trail else [node, dep])
      elif dep not in state:
        visit(dep, trail + [dep])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, f"import circles: {cycles}"


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_configs_call_named_fragments_only():
  """Every configs/*.py starts from base_config() and calls fragments (no positional flags);
  the result validates."""
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    src = open(path, encoding="utf-8").read()
    assert "base.base_config()" in src and "fragments.apply_presets(c, arg)" in src, path
    calls = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)]
    assert not any(isinstance(a, ast.Constant) and isinstance(a.value, bool)
                   for call in calls for a in call.args), f"{path}: a bare positional bool"
    validation.validate(_load(path).get_config())


def test_base_config_is_the_only_home_of_defaults():
  """Builders read every key from the config: a key missing from a config is an error there,
  not a silently used second default."""
  c = fragments.compose(fragments.source_only, presets="synthetic")
  del c.model["head_dropout"]
  with pytest.raises((AttributeError, KeyError), match="head_dropout"):
    state_lib.build_network(c)
  c = base.base_config()
  del c.optim["warmup_ratio"]
  with pytest.raises((AttributeError, KeyError), match="warmup_ratio"):
    state_lib.optim.make_optimizer(c.optim, {"w": jax.numpy.zeros(2)}, 10)


def _tree_digest(config) -> tuple[int, str]:
  net = state_lib.build_network(config)
  task = state_lib.build_mfm_task(config)
  tx = state_lib.build_optimizer(config, net, task)
  abstract = state_lib.abstract_train_state(config, net, task, tx)
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  rows = sorted(f"{jax.tree_util.keystr(p)}:{tuple(l.shape)}:{l.dtype}" for p, l in leaves)
  return len(rows), hashlib.sha256("\n".join(rows).encode()).hexdigest()


@pytest.mark.parametrize("name", ["mic_mfm", "mic_mfm_daformer", "dacs_mfm_dlv2", "source_only"])
def test_train_state_trees_unchanged(name):
  """The train-state tree (paths, shapes, dtypes) of a config equals the recorded one, so
  checkpoints written before a reorganisation still restore."""
  with open(os.path.join(ROOT, "tests", "data", "state_trees.json"), encoding="utf-8") as f:
    want = json.load(f)["trees"][f"configs/{name}.py"]
  config = _load(os.path.join(ROOT, "configs", f"{name}.py")).get_config("synthetic")
  leaves, digest = _tree_digest(config)
  assert (leaves, digest) == (want["leaves"], want["sha256"])


def test_print_config(tmp_path):
  """--print_config prints the resolved config (presets and overrides applied) and exits
  without a workdir."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  out = subprocess.run(
      [sys.executable, "-m", "mfm_jax.main", "--config=configs/mic_mfm.py:synthetic,steps=7",
       "--config.mfm.mask_ratio=0.5", "--print_config"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "num_steps: 7" in out.stdout and "mask_ratio: 0.5" in out.stdout
  assert "backbone: mit_tiny" in out.stdout and "enabled: true" in out.stdout
