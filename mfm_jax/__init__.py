"""mfm_jax: Masked Feature Modeling for domain-adaptive semantic segmentation in JAX/Flax.

Host UDA methods (DACS, DAFormer, HRDA, MIC) and the MFM auxiliary task
(arXiv 2509.13801) implemented as one pure, jitted train step.
"""

__version__ = "0.1.0"
