"""mfm_jax.models package."""
