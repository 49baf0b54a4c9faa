"""Fused linear + softmax focal loss: chunked over rows, never builds the (N, V) logits."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from focal_jax import _checks
from focal_jax import _reduce
from focal_jax import _softmax

# Automatic chunk size: about this many logits (chunk * V) per chunk, i.e. 16 MiB in float32.
# Big enough for an efficient (chunk, H) @ (H, V) matmul, small enough that the few
# (chunk, V) buffers of a step stay well under the logits of any vocabulary-sized problem.
_CHUNK_ELEMENTS = 1 << 22


def _auto_chunk(num_rows: int, vocab: int) -> int:
  chunk = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
  chunk = 1 << (chunk.bit_length() - 1)  # a power of two
  # Never more chunks than needed: at most the (8-aligned) number of rows.
  return max(1, min(chunk, -(-num_rows // 8) * 8))


def _logits(h, kernel, bias, cdtype):
  # Accumulate in the compute dtype (float32 at least), also for bf16 / fp16 inputs.
  z = jnp.matmul(h, kernel, preferred_element_type=cdtype)
  return z if bias is None else z + bias.astype(cdtype)[None, :]


def _chunk_tangent(h_c, kernel, bias, t_c, st, valid_c, dh_c, dkernel, dbias, eps, cdtype):
  """sum_v dloss/dz[r, v] * dz[r, v] for one chunk, with dz = dh W + h dW + db."""
  z = _logits(h_c, kernel, bias, cdtype)
  g = _softmax.grad_from_stats(z, t_c, st, valid_c, eps)
  dz = None
  if dh_c is not None:
    dz = jnp.matmul(dh_c, kernel, preferred_element_type=cdtype)
  if dkernel is not None:
    term = jnp.matmul(h_c, dkernel, preferred_element_type=cdtype)
    dz = term if dz is None else dz + term
  if dbias is not None:
    term = jnp.broadcast_to(dbias.astype(cdtype)[None, :], g.shape)
    dz = term if dz is None else dz + term
  return jnp.sum(g * dz, axis=-1)


# Checkpointed: the (chunk, V) logits and gradient are recomputed in the backward pass from the
# chunk of hidden rows, the kernel and per-row scalars, so reverse mode stores nothing of size
# (N, V) -- only O(chunk * V) is ever alive.
_chunk_tangent_remat = jax.checkpoint(_chunk_tangent, static_argnums=(9, 10))


# A custom_jvp whose rule is a lax.scan over row chunks (not a custom_vjp): JAX linearizes and
# transposes the scan itself, which keeps the parameter cotangents' types (dtype, and the
# varying/replicated axes under shard_map) automatically, and accumulates the kernel and bias
# gradients over chunks in the transposed scan's carry. The per-row math is softmax_focal's
# (row_stats / grad_from_stats), so both compute the same numbers.
@functools.partial(jax.custom_jvp, nondiff_argnums=(8, 9, 10))
def _linear_rows(h, kernel, bias, t, alpha, gamma, valid, in_range, eps, chunk, cdtype):
  """Per-row losses of softmax_focal(h @ kernel + bias), h of shape (num_chunks * chunk, H)."""
  def body(_, xs):
    h_c, t_c, a_c, g_c, v_c, r_c = xs
    z = _logits(h_c, kernel, bias, cdtype)
    return None, _softmax.row_stats(z, t_c, a_c, g_c, v_c, r_c, eps).loss
  xs = tuple(_chunked(x, chunk) for x in (h, t, alpha, gamma, valid, in_range))
  return lax.scan(body, None, xs)[1].reshape(-1)


def _chunked(x, chunk):
  return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


def _none_if_zero(x):
  return None if isinstance(x, SymbolicZero) else x


def _linear_rows_jvp(eps, chunk, cdtype, primals, tangents):
  h, kernel, bias, t, alpha, gamma, valid, in_range = primals
  dh, dkernel, dbias, _, dalpha, dgamma, _, _ = map(_none_if_zero, tangents)
  if bias is None:
    dbias = None
  want_z = dh is not None or dkernel is not None or dbias is not None

  def body(_, xs):
    h_c, t_c, a_c, g_c, v_c, r_c, dh_c = xs
    z = _logits(h_c, kernel, bias, cdtype)
    st = _softmax.row_stats(z, t_c, a_c, g_c, v_c, r_c, eps)
    tangent = jnp.zeros_like(st.loss)
    if want_z:
      tangent = _chunk_tangent_remat(h_c, kernel, bias, t_c, st, v_c, dh_c, dkernel, dbias, eps,
                                     cdtype)
    return None, (st.loss, st.dloss_dalpha, st.dloss_dgamma, tangent)

  xs = tuple(None if x is None else _chunked(x, chunk)
             for x in (h, t, alpha, gamma, valid, in_range, dh))
  _, (loss, dloss_dalpha, dloss_dgamma, tangent) = lax.scan(body, None, xs)
  loss, tangent = loss.reshape(-1), tangent.reshape(-1)
  if dalpha is not None:
    tangent = tangent + dloss_dalpha.reshape(-1) * dalpha
  if dgamma is not None:
    tangent = tangent + dloss_dgamma.reshape(-1) * dgamma
  return loss, tangent


_linear_rows.defjvp(_linear_rows_jvp, symbolic_zeros=True)


def linear_softmax_focal(
    hidden: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    chunk_size: int | None = None,
    alpha: jax.typing.ArrayLike | None = None,
    gamma: jax.typing.ArrayLike = 2.0,
    label_smoothing: float = 0.0,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "none",
    background_class: int = 0,
    axis_name: Any = None,
) -> jax.Array:
  r"""Softmax focal loss of a linear layer's output, without materializing the logits.

  Equals ``softmax_focal(hidden @ kernel + bias, labels, ...)`` in value and in the gradients
  with respect to ``hidden``, ``kernel`` and ``bias`` (and ``alpha``, ``gamma``), but works on
  ``chunk_size`` rows at a time: the ``(N, V)`` logits and their gradient are never built.
  Forward and backward keep ``O(chunk_size * V)`` memory beyond the inputs and the parameter
  gradients; the backward pass recomputes each chunk's logits (one extra matmul).

  .. math::
    z = h W + b, \qquad
    \ell = \alpha_t (1 - p)^{\gamma_t} \left[-(1 - \epsilon) \log p
      - \frac{\epsilon}{V} \sum_v \log s_v\right], \quad s = \mathrm{softmax}(z), p = s_t

  Made for large-vocabulary heads (masked-LM, LLM): ``kernel`` is ``(H, V)``, as flax
  ``nn.Dense`` stores it. Matmuls accumulate in float32 at least; the result has the dtype of
  ``hidden @ kernel``.

  Args:
    hidden: ``(..., H)`` floating-point features (e.g. ``(N, H)`` or ``(B, T, H)``).
    kernel: ``(H, V)`` weights.
    labels: integers in ``[0, V)``, shape ``hidden.shape[:-1]``; an unmasked out-of-range
      label gives NaN for its entry (never wraps).
    bias: optional ``(V,)`` bias.
    chunk_size: rows per chunk (a positive int). None picks one so that a chunk holds about
      4M logits (16 MiB in float32), capped by the number of rows.
    alpha: None, a scalar, or a ``(V,)`` vector of class weights.
    gamma: a scalar ``>= 0`` or a ``(V,)`` vector.
    label_smoothing: :math:`\epsilon \in [0, 1]`, on the cross-entropy term only.
    where: optional boolean mask of shape ``hidden.shape[:-1]`` (or broadcastable to it).
    ignore_index: optional label value treated like ``where=False``.
    reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"mean_positive"``, as in
      ``softmax_focal``.
    background_class: the label ``"mean_positive"`` does not count as positive.
    axis_name: optional named axis (pmap, shard_map), with ``softmax_focal``'s convention.

  Returns:
    Losses in the dtype of ``hidden @ kernel``: shape ``hidden.shape[:-1]`` for
    ``reduction="none"``, else a scalar.

  Raises:
    TypeError: non-floating ``hidden``, ``kernel`` or ``bias``; non-integer ``labels``; a
      keyword of the wrong type (e.g. ``chunk_size``).
    ValueError: ``kernel`` not ``(H, V)`` with ``H = hidden.shape[-1]``; ``bias`` not
      ``(V,)``; ``labels`` or ``where`` of the wrong shape; ``chunk_size < 1``; and every
      check of ``softmax_focal`` (gamma, alpha, label_smoothing, reduction). At trace time.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import focal_jax
    >>> hidden = jnp.ones((6, 4)) / 4
    >>> kernel = jnp.arange(4 * 10, dtype=jnp.float32).reshape(4, 10) / 40
    >>> labels = jnp.array([0, 1, 2, 3, 4, 9])
    >>> loss = focal_jax.linear_softmax_focal(hidden, kernel, labels, chunk_size=4,
    ...                                       reduction="mean")
    >>> ref = focal_jax.softmax_focal(hidden @ kernel, labels, reduction="mean")
    >>> print(f"{loss:.5f} {ref:.5f}")
    1.90903 1.90903

  References:
    Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_,
    ICCV 2017. Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
    <https://arxiv.org/abs/2411.09009>`_, 2024 (the fused, chunked idea for cross-entropy).
  """
  fn = "linear_softmax_focal"
  hidden = _checks.floating_array(fn, "hidden", hidden)
  kernel = _checks.floating_array(fn, "kernel", kernel)
  if hidden.ndim < 1:
    raise ValueError(f"{fn}: hidden must have shape (..., H), got a scalar")
  size = hidden.shape[-1]
  if kernel.ndim != 2 or kernel.shape[0] != size:
    raise ValueError(
        f"{fn}: kernel must have shape (H, V) with H = {size} (the last axis of hidden "
        f"{hidden.shape}), got shape {kernel.shape}")
  vocab = kernel.shape[1]
  if bias is not None:
    bias = _checks.floating_array(fn, "bias", bias)
    if bias.shape != (vocab,):
      raise ValueError(
          f"{fn}: bias must have shape ({vocab},) (V, the last axis of kernel {kernel.shape}), "
          f"got shape {bias.shape}")
  if chunk_size is not None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
      raise TypeError(
          f"{fn}: chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
      raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size}")
  row_shape = hidden.shape[:-1]
  dtype = jnp.result_type(hidden.dtype, kernel.dtype)
  prep = _softmax.prepare_labels(
      fn, labels, vocab, row_shape, dtype, alpha=alpha, gamma=gamma,
      label_smoothing=label_smoothing, where=where, ignore_index=ignore_index,
      reduction=reduction, background_class=background_class,
      what_rows=f"the shape of hidden {hidden.shape} without its last axis")

  num_rows = math.prod(row_shape)
  chunk = int(chunk_size) if chunk_size is not None else _auto_chunk(num_rows, vocab)
  chunk = min(chunk, max(num_rows, 1))
  padded = -(-num_rows // chunk) * chunk
  pad = padded - num_rows

  def rows(x, fill):
    x = x.reshape((num_rows,) + x.shape[len(row_shape):])
    if pad:  # padding rows are masked: 0 loss, 0 gradient, in no denominator
      x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
    return x

  loss = _linear_rows(
      rows(hidden, 0), kernel, bias, rows(prep.t, 0), rows(prep.alpha, 1), rows(prep.gamma, 0),
      rows(prep.valid, False), rows(prep.in_range, True), prep.eps, chunk, prep.compute_dtype)
  loss = loss[:num_rows].reshape(row_shape)
  return _reduce.reduce_loss(loss, valid=prep.valid, positive=prep.positive,
                             reduction=prep.reduction, axis_name=axis_name, dtype=prep.dtype)
