"""The MFM study: named grids of training runs, run one after another, tables and figures.

``python -m mfm_jax.study --study=hosts|ablations|masking --workdir=DIR`` (see ``cli.py``).
Modules: ``grids`` (the studies), ``runner`` (subprocess per run, skip/resume), ``results``
(CSV/JSON/Markdown, mean ± std, paired differences), ``plots`` (PNG figures), ``visual``
(prediction grid of finished runs).
"""
