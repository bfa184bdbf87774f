"""Test setup: CPU only, 4 simulated devices, persistent compilation cache.

The environment variables must be set before jax is imported anywhere.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402  (after the environment is set)

_CACHE = os.environ.get(
    "MFM_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mfm_jax_test_xla"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
