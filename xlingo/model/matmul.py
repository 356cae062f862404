"""The one 2-D matmul every projection (and every parameter-efficient side path) uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def flat_matmul(x: jax.Array, w: jax.Array, contract: int = 1, **kw) -> jax.Array:
  """``x[..., *w.shape[:contract]] @ w`` as one 2-D matmul: [..., K] x [K, N] -> [..., N].

  Equal to the einsum over the named axes, but the leading (batch, length) axes are merged
  into one rows axis first and the weight's input/output axes into K and N. On CPU this
  halves the backward pass of a SwiGLU MLP (611 -> 350 ms for configs/small.py's shapes,
  docs/PERFORMANCE.md): the weight gradient becomes a plain [K, rows] x [rows, N] matmul
  instead of a contraction over two axes that XLA lowers with transposed copies. Merging a
  major sharded axis with its minor neighbour keeps the sharding, so the logical
  constraints around the call still apply.
  """
  k_shape, n_shape = w.shape[:contract], w.shape[contract:]
  lead = x.shape[: x.ndim - contract]
  k = int(np.prod(k_shape))
  y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), **kw)
  return y.reshape(*lead, *n_shape)
