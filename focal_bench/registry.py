"""The implementations a benchmark compares (``impls_jax`` and ``impls_torch``), and how to
pick them.

The definitions (roles, ``Runner``, ``Impl``, ``Unavailable``) live in
``focal_bench.implementation`` and are re-exported here for the modules that read tables.
"""

from __future__ import annotations

from focal_bench import impls_jax, impls_torch
from focal_bench.implementation import (DEEPSPEED, FLOOR, PEER, PROJECT, REFERENCE, Impl,
                                        Runner, Unavailable)

__all__ = ["DEEPSPEED", "FLOOR", "PEER", "PROJECT", "REFERENCE", "Impl", "Runner",
           "Unavailable", "all_impls", "by_key", "select"]


def all_impls() -> list[Impl]:
  """Every implementation of both frameworks, in table order."""
  return impls_jax.IMPLS + impls_torch.IMPLS


def select(mode: str, frameworks: tuple[str, ...], compile_torch: bool,
           only: tuple[str, ...] = ()) -> list[Impl]:
  """The implementations of ``mode`` to run, optionally only the keys in ``only``."""
  out = []
  for impl in all_impls():
    if impl.mode != mode or impl.framework not in frameworks:
      continue
    if impl.compiled and not compile_torch:
      continue
    if only and impl.key not in only:
      continue
    out.append(impl)
  return out


def by_key() -> dict[str, Impl]:
  return {impl.key: impl for impl in all_impls()}
