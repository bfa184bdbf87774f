"""The study's named grids: rows (config file + preset, overrides) crossed with seeds.

A ``Row`` is one line of a result table (a method or an ablation setting); a ``Run`` is a row
at one seed, trained in ``<workdir>/runs/<run.name>``. Run names depend only on the row's slug
and the seed, and equal slugs always mean equal configs, so studies that share a workdir share
runs (the ablations' and the masking study's DAFormer / DAFormer+MFM rows are the hosts
study's).

Order matters for a study that may not finish: runs go seed by seed (every row of seed 0,
then seed 1, ...), and within a seed the most important rows first.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

PRESET = "study"  # mfm_jax.config.fragments.study: the 256²-crop scale of the synthetic benchmark


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of a result table.

  Attributes:
    slug: directory-safe id, unique for (config, overrides).
    label: the name shown in tables and plots.
    config: config file (relative to the repository root) and preset, ``configs/x.py:study``.
    overrides: ``(key, value)`` pairs applied on top (``--config.KEY=VALUE``).
    baseline: label of the row this one is compared with per seed (the host without MFM), or
      None.
    sweep: ``(axis name, x value)`` for "mIoU vs x" plots (mask ratio), or None.
  """
  slug: str
  label: str
  config: str
  overrides: tuple[tuple[str, Any], ...] = ()
  baseline: str | None = None
  sweep: tuple[str, float] | None = None


@dataclasses.dataclass(frozen=True)
class Run:
  """A row at one seed."""
  row: Row
  seed: int

  @property
  def name(self) -> str:
    return f"{self.row.slug}-s{self.seed}"

  @property
  def overrides(self) -> tuple[tuple[str, Any], ...]:
    return self.row.overrides


def _cfg(name: str, preset: str = PRESET) -> str:
  return f"configs/{name}.py:{preset}"


# Host methods of the paper's main table at the study scale (MiT-tiny + DAFormer head for all,
# DACS included: configs/dacs.py is DACS with the DAFormer network).
HOSTS = (
    ("dacs", "DACS", "dacs", "dacs_mfm"),
    ("daformer", "DAFormer", "daformer", "daformer_mfm"),
    ("mic", "MIC(DAFormer)", "mic", "mic_mfm_daformer"),
)
# The ablations and masking studies use DAFormer+MFM: the cheapest host with the full
# DAFormer recipe (MIC adds a third training pass per step).
ABLATION_HOST = ("daformer", "DAFormer", "daformer", "daformer_mfm")


def host_rows(host: tuple[str, str, str, str]) -> tuple[Row, Row]:
  """(host without MFM, host + MFM) rows of one host method."""
  slug, label, cfg, cfg_mfm = host
  base = Row(slug, label, _cfg(cfg))
  return base, Row(f"{slug}_mfm", f"{label}+MFM", _cfg(cfg_mfm), baseline=label)


def hosts_rows() -> list[Row]:
  """Source-only, each host without and with MFM, and the target oracle."""
  rows = [Row("source_only", "source-only", _cfg("source_only"))]
  for host in HOSTS:
    rows.extend(host_rows(host))
  rows.append(Row("oracle", "oracle", _cfg("source_only", f"{PRESET},oracle")))
  return rows


def ablations_rows() -> list[Row]:
  """mfm_method.md's ablation table on ``ABLATION_HOST`` (default values: ratio 0.4, rebuild
  on, classification objective, target domain, nothing frozen)."""
  base, mfm = host_rows(ABLATION_HOST)
  label, slug = ABLATION_HOST[1], mfm.slug

  def variant(suffix, text, overrides, sweep=None):
    return Row(f"{slug}-{suffix}", f"{label}+MFM {text}", mfm.config, tuple(overrides),
               baseline=label, sweep=sweep)

  rows = [base, dataclasses.replace(mfm, sweep=("mask ratio", 0.4))]
  for ratio in (0.2, 0.6, 0.8):
    rows.append(variant(f"ratio{ratio:g}", f"ratio {ratio:g}", [("mfm.mask_ratio", ratio)],
                        sweep=("mask ratio", ratio)))
  rows.append(variant("norebuild", "rebuild off", [("mfm.rebuild", False)]))
  for objective in ("feature", "pixel"):
    rows.append(variant(f"obj_{objective}", f"objective {objective}",
                        [("mfm.objective", objective)]))
  for domain in ("both", "source"):
    rows.append(variant(f"dom_{domain}", f"domain {domain}", [("mfm.domain", domain)]))
  for part in ("encoder", "decoder"):
    rows.append(variant(f"freeze_{part}", f"freeze {part}", [("mfm.freeze", part)]))
  # The pre-release behaviour: only the last encoder level masked and rebuilt.
  rows.append(variant("levels_last", "last level only", [("mfm.levels", "last")]))
  return rows


def masking_rows() -> list[Row]:
  """Random latent mask (the default, as released) vs the semantic-guided one
  (``mfm.mask_strategy='uncertainty'``: teacher-uncertainty-weighted, same expected ratio)."""
  base, mfm = host_rows(ABLATION_HOST)
  label = ABLATION_HOST[1]
  return [base, dataclasses.replace(mfm, label=f"{label}+MFM random mask"),
          Row(f"{mfm.slug}-mask_uncertainty", f"{label}+MFM uncertainty mask", mfm.config,
              (("mfm.mask_strategy", "uncertainty"),), baseline=label)]


@dataclasses.dataclass(frozen=True)
class Study:
  """A named grid, its default seeds, and the pair of slugs shown in the prediction grid."""
  rows: Callable[[], list[Row]]
  seeds: tuple[int, ...]
  visual_pair: tuple[str, str]


STUDIES: dict[str, Study] = {
    "hosts": Study(hosts_rows, (0, 1, 2), ("mic", "mic_mfm")),
    "ablations": Study(ablations_rows, (0, 1), ("daformer", "daformer_mfm")),
    "masking": Study(masking_rows, (0, 1, 2), ("daformer", "daformer_mfm-mask_uncertainty")),
}


def expand(rows: Sequence[Row], seeds: Sequence[int]) -> list[Run]:
  """Seed-major order: every row of the first seed, then the next seed, ..."""
  slugs = [r.slug for r in rows]
  if len(set(slugs)) != len(slugs):
    raise ValueError(f"Duplicate row slugs: {slugs}")
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"Duplicate seeds: {list(seeds)}")
  return [Run(row, int(seed)) for seed in seeds for row in rows]


def select(runs: Sequence[Run], only: str = "") -> list[Run]:
  """The runs whose name (``<slug>-s<seed>``) matches the regular expression ``only``."""
  if not only:
    return list(runs)
  pattern = re.compile(only)
  return [r for r in runs if pattern.search(r.name)]


def study_runs(name: str, seeds: Sequence[int] | None = None) -> list[Run]:
  """All runs of study ``name`` (its default seeds unless given)."""
  if name not in STUDIES:
    raise ValueError(f"Unknown study {name!r}; choose one of {sorted(STUDIES)}.")
  study = STUDIES[name]
  return expand(study.rows(), study.seeds if seeds is None else seeds)
