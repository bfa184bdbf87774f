"""Layers shared by the encoders and heads."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfm_jax import ops

Dtype = Any


class DepthwiseConv(nn.Module):
  """Stride-1 depthwise ``k x k`` conv with ``nn.Conv``'s parameters (``kernel [k, k, 1, C]``,
  ``bias [C]``), so trees, names and converted weights are the same as
  ``nn.Conv(C, (k, k), feature_group_count=C)``; ``impl`` picks the formulation
  (``ops.depthwise_conv2d``: 'xla' grouped convolution or 'shift' multiply-adds).
  Padding is ``dilation · (k // 2)`` (the output keeps the input size), as in the reference."""
  kernel_size: int = 3
  dilation: int = 1
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  impl: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, k = x.shape[-1], self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, 1, c), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = ops.depthwise_conv2d(x, kernel, dilation=self.dilation,
                             padding=self.dilation * (k // 2), impl=self.impl)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (c,), jnp.float32).astype(self.dtype)
    return y


class BatchNorm(nn.Module):
  """``nn.BatchNorm`` over the last axis with the same parameters (``scale``, ``bias``),
  statistics (``batch_stats`` ``mean``, ``var``), values and running-average update, whose
  train-mode backward keeps only its input (``ops.batch_norm_train``). Output in ``dtype``."""
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      return ops.batch_norm_apply(x, ra_mean.value, ra_var.value, scale, bias,
                                  self.epsilon).astype(self.dtype)
    y, mean, var = ops.batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    return y.astype(self.dtype)
