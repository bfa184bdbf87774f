"""Mean-teacher EMA of the student parameters (uda_reference.md §2.2).

The reference (DACS ``_update_ema``) averages ``.parameters()`` only; BatchNorm running
statistics are NOT averaged (the teacher runs in train mode and uses target-batch statistics).
Hence ``ema_update`` is applied to the ``params`` collection only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_alpha(step, alpha_max: float) -> jax.Array:
  """EMA decay alpha_t = min(1 - 1/(t+1), alpha_max) for (local) iteration ``t``.

  ``alpha_max`` is ``config.uda.ema_alpha``: 0.999 for DAFormer / HRDA / MIC, 0.99 for DACS
  (dacs_a999_fdthings.py / dacs.py).

  t = 0 gives 0 (the teacher becomes an exact copy of the student, which is the reference's
  iteration-0 initialisation), t = 1 gives 0.5, t = 10 gives 0.909..., t >= 999 gives 0.999.
  ``step`` may be a traced integer.
  """
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(1.0 - 1.0 / (t + 1.0), jnp.float32(alpha_max))


def ema_update(ema_params, params, step, alpha_max: float):
  """Returns ``alpha_t * ema_params + (1 - alpha_t) * params`` leaf by leaf.

  Args:
    ema_params: teacher parameter pytree.
    params: student parameter pytree with the same structure.
    step: current iteration (python int or traced int32 scalar).
    alpha_max: upper bound of the decay (0.999 in the reference).

  Returns:
    The new teacher pytree (each leaf keeps the dtype of ``ema_params``).
  """
  if jax.tree_util.tree_structure(ema_params) != jax.tree_util.tree_structure(params):
    raise ValueError("mfm_jax/uda/ema.py: ema_params and params have different tree structures.")
  alpha = ema_alpha(step, alpha_max)

  def _avg(e, p):
    e32 = e.astype(jnp.float32)
    out = alpha * e32 + (1.0 - alpha) * p.astype(jnp.float32)
    return out.astype(e.dtype)

  return jax.tree_util.tree_map(_avg, ema_params, params)
