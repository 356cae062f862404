"""The one 2-D matmul every projection (and every parameter-efficient side path) uses, in
float or (``model.quantization='int8'``) as an int8 matmul in the forward and backward pass.

int8 goes through Qwix's quantized-training dot (``qwix._src.core.dot_general_qt``, pinned to
qwix 0.1.8 in setup.py): both operands are quantized per channel (symmetric absmax: one scale
per row of the activations, one per output column of the weight), the product is an
int8 x int8 -> int32 dot rescaled to the input dtype, and the backward pass quantizes the
incoming gradient the same way, so the two gradient matmuls are int8 too (the saved int8
operands are reused, their scales folded into the gradient). The gradient passes straight
through the rounding. The dot is called directly rather than through ``qwix.quantize_model``'s
interception of a whole Flax module: the call sites choose which matmuls are quantized (the
blocks' projections, not the LoRA side paths or the vocabulary projection), with no module-path
regexes and no wrapper around the model that every loader would have to apply.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xlingo.errors import ConfigError

QUANTIZATIONS = ("none", "int8")


def flat_matmul(x: jax.Array, w: jax.Array, contract: int = 1, quantization: str = "none",
                **kw) -> jax.Array:
  """``x[..., *w.shape[:contract]] @ w`` as one 2-D matmul: [..., K] x [K, N] -> [..., N].

  Equal to the einsum over the named axes, but the leading (batch, length) axes are merged
  into one rows axis first and the weight's input/output axes into K and N. On CPU this
  halves the backward pass of a SwiGLU MLP (611 -> 350 ms for configs/small.py's shapes,
  docs/PERFORMANCE.md): the weight gradient becomes a plain [K, rows] x [rows, N] matmul
  instead of a contraction over two axes that XLA lowers with transposed copies. Merging a
  major sharded axis with its minor neighbour keeps the sharding, so the logical
  constraints around the call still apply. ``quantization`` is ``model.quantization``.
  """
  k_shape, n_shape = w.shape[:contract], w.shape[contract:]
  lead = x.shape[: x.ndim - contract]
  k = int(np.prod(k_shape))
  x_rk, w_kn = x.reshape(-1, k), w.reshape(k, -1)
  if quantization == "none":
    y = jnp.matmul(x_rk, w_kn, **kw)
  elif quantization == "int8":
    if kw:
      raise ValueError(f"an int8 matmul takes no {sorted(kw)}")
    y = int8_matmul(x_rk, w_kn)
  else:
    raise ConfigError(f"model.quantization={quantization!r}; use one of "
                      + ", ".join(QUANTIZATIONS))
  return y.reshape(*lead, *n_shape)


def int8_matmul(x_rk: jax.Array, w_kn: jax.Array) -> jax.Array:
  """[R, K] x [K, N] with int8 operands in the forward pass and both gradient matmuls."""
  # Imported here: only an int8 model pays Qwix's import.
  from qwix._src.core import dot_general_qt

  config = dot_general_qt.DotGeneralQtConfig(
      lhs_qtype=jnp.int8, rhs_qtype=jnp.int8,
      dlhs_grad_qtype=jnp.int8, drhs_grad_qtype=jnp.int8)
  return dot_general_qt.dot_general_qt(x_rk, w_kn, (((1,), (0,)), ((), ())), config)
