"""mfm_jax.data package."""
