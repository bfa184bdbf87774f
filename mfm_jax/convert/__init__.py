"""mfm_jax.convert package."""
