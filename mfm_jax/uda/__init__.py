"""mfm_jax.uda package."""
