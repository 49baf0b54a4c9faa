"""Small helpers shared by the focal_jax losses' `custom_jvp` rules: which tangents are being
propagated, and the sum of a rule's tangent terms.

The softmax, sigmoid, categorical and fused-linear modules import these from here (not from one
another), as the torch losses share theirs through `focal_torch._numerics`.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def given(tangent: Any) -> Any:
  """`tangent`, or None where it is a symbolic zero (that input is not being differentiated)."""
  return None if isinstance(tangent, SymbolicZero) else tangent


def tangent_sum(like: jax.Array, *terms: tuple[Any, Callable[[Any], jax.Array]],
                start: jax.Array | None = None) -> jax.Array:
  """The output tangent of a JVP rule: the sum of the terms of the inputs being differentiated.

  Each term is `(tangent, term)`. `tangent` is an input's tangent -- None or a `SymbolicZero`
  where that input is not differentiated, and the term is then left out (`term` is never
  called) -- or a tuple of tangents, for a term that is linear in several of them (it counts
  when any one is given, and `term` gets the tuple with None for the others). `term(tangent)`
  is its contribution, e.g. `lambda d: dloss_dalpha * d`.

  The terms that count are computed in order, then added left to right: from `start` when
  given (a zero tangent, or a loop's carry), else from the first term. With no term, `start`,
  or zeros like `like` (the primal output).

  Examples:
    >>> import jax.numpy as jnp
    >>> loss, dloss_dalpha, dloss_dgamma = jnp.ones(2), jnp.full(2, 2.0), jnp.full(2, 3.0)
    >>> print(tangent_sum(loss, (jnp.ones(2), lambda d: dloss_dalpha * d),
    ...                   (None, lambda d: dloss_dgamma * d)))
    [2. 2.]
  """
  values = []
  for tangent, term in terms:
    if isinstance(tangent, tuple):
      tangent = tuple(map(given, tangent))
      if all(t is None for t in tangent):
        continue
    else:
      tangent = given(tangent)
      if tangent is None:
        continue
    values.append(term(tangent))
  if start is not None:
    values.insert(0, start)
  if not values:
    return jnp.zeros_like(like)
  return functools.reduce(operator.add, values)


def zeros_varying(shape, dtype, refs: Any) -> jax.Array:
  """Zeros of `shape` and `dtype` that vary over every mesh axis that an array of `refs` (a
  pytree; None leaves skipped) varies over: the initial carry of a loop whose body reads
  `refs`. Under `shard_map` (with its default `check_vma=True`) a carry must come out of the
  body as it went in, and a body that reads sharded logits makes it vary over their axes,
  where `jnp.zeros` is invariant (a TypeError at trace time). Elsewhere: plain zeros."""
  out = jnp.zeros(shape, dtype)
  for ref in jax.tree_util.tree_leaves(refs):
    out = out + jnp.zeros_like(ref, dtype=dtype, shape=shape)
  return out
