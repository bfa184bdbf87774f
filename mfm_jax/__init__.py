"""mfm_jax: Masked Feature Modeling for domain-adaptive semantic segmentation in JAX/Flax.

Host UDA methods (DACS, DAFormer, HRDA, MIC) and the MFM auxiliary task
(arXiv 2509.13801) implemented as one pure, jitted train step.
"""

from mfm_jax.runtime import xla_flags as _xla_flags

# Before any JAX backend exists: XLA's CPU scheduler trades memory for concurrency by default
# (2.4x the step's temporaries here; runtime/xla_flags.py). Flags in XLA_FLAGS take precedence.
_xla_flags.set_cpu_defaults()

__version__ = "0.1.0"
