"""The categorical focal loss's gradient in one pass over the logits: a Pallas (Mosaic TPU)
kernel in the transpose position of the tangent (engine, JAX- and TPU-specific; the whole
module).

With XLA fusions the backward of `jit(grad(mean loss))` reads the rows of the logits three
times (the row statistics, `W = sum_j w_j`, the gradient `s_j W - w_j`; docs/math.md
"Categorical"): 6x the logits' bytes on a TPU v5e at (2048, 30522). The kernel holds a block of
whole rows in VMEM, computes the statistics, `W` and the gradient from it, and writes
`ct * gradient` directly: one read of the logits and targets, one write (3x).

Under `jax.grad` the kernel must take the cotangent `ct` of the per-row losses as an input,
or its (N, C) output would be read again by the multiply. So the logits' tangent term of
`_focal_rows`' rule is a primitive, `row_dot_grad(dz; z, y, ...) = sum_j g_j dz_j`, linear in
`dz`, whose transpose is the primitive `ct_times_grad(ct; z, y, ...) = ct * g` (and the other
way round). Both have JVP rules (for second derivatives; written as `jax.jvp` of the jnp
formulas of `_categorical`, so they are differentiable to any order) and batching rules, and
lower to the jnp formulas everywhere except `ct_times_grad` on TPU, where it is the kernel
(`row_dot_grad` appears in forward mode only, where it stays jnp). `interpret=True` lowers
both to the kernel in Pallas' interpret mode on any platform (the tests, on the CPU).

The kernel takes whole rows: for a (N, C) array stored row-major (TPU's default layout
where C is a multiple of 128, or N is not) blocks of 8 (16 for 16-bit) rows; for one stored
column-major (TPU picks it where that pads less: C not a multiple of 128 and N one, e.g.
(2048, 30522)) blocks of 128 rows of the transposed view (C, N), so that no transpose is
copied in HBM; at few classes a multiple of those (`plan`). Within a block four loops over
chunks of classes read VMEM: the max and its first class, the non-top mass, `W` (and
`W - w_top`), and the gradient. Where a block does not
fit in VMEM (`vmem_cap`), the logits are not 2-D, the compute dtype is not float32, or a
per-class `alpha` / `gamma` meets the column-major form, `plan` says no and the XLA form stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.extend import core as jex_core
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir

# Stands in for log(1 - s) = -inf at the top class of a row without any other mass (as
# _categorical._NO_REST_LOG).
_NO_REST_LOG = -1e30

# VMEM a kernel may ask for: the chip's (128 MiB per core on a TPU v5e and v6e, 64 MiB on
# v5p and 7, 16 MiB on v4) less this margin.
_VMEM_MARGIN = 8 << 20
# The VMEM assumed where the chip is not known at trace time (a compile ahead of time from a
# CPU process): a v5e's.
_DEFAULT_VMEM = 128 << 20
# Classes per chunk of the in-kernel loops: (512, 128) column-major, (rows, 2048) row-major.
_COL_CHUNK = 512
_ROW_CHUNK = 2048
# The most entries of a chunk of a block with few classes (see `plan`).
_CHUNK_ELEMENTS = 1 << 16


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the kernel takes a (N, C) array: `ax` the class axis of the kernel's view (0: the
  transposed view of a column-major array, 1: row-major), rows per block, classes per chunk,
  classes padded to whole chunks, and the VMEM it asks for."""
  ax: int
  rows: int
  chunk: int
  padded: int
  vmem: int


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def column_major(n: int, c: int) -> bool:
  """Whether TPU's default layout of a (n, c) array is column-major (`{0,1}`): the layout of
  the smaller tiled size with (8, 128) tiles, row-major on a tie (read from libtpu's layouts
  of entry parameters: (2048, 30522), (4096, 1000), (2048, 1000) column-major; (2000, 30522),
  (2048, 32000), (2048, 128256), (1000, 2048) row-major)."""
  return _round_up(c, 8) * _round_up(n, 128) < _round_up(n, 8) * _round_up(c, 128)


def vmem_cap(device_kind: str | None = None) -> int:
  """The VMEM a kernel may ask for on a TPU of `device_kind` (a `Device.device_kind`, e.g.
  "TPU v5 lite"), else on this process' TPU, else (neither known: a compile for a TPU from
  another platform) on a chip with `_DEFAULT_VMEM`."""
  try:
    if device_kind is None:
      capacity = pltpu.get_tpu_info().vmem_capacity_bytes
    else:
      from jax._src.pallas.mosaic import tpu_info  # pylint: disable=import-outside-toplevel
      chip = tpu_info.chip_version_from_device_kind(device_kind)
      capacity = tpu_info.get_tpu_info_for_chip(chip, 1).vmem_capacity_bytes
  except Exception:  # pylint: disable=broad-except  # not a known TPU
    capacity = _DEFAULT_VMEM
  return capacity - _VMEM_MARGIN


def plan(shape: tuple[int, ...], dtype: Any, compute_dtype: Any, per_class: bool,
         interpret: bool = False, device_kind: str | None = None) -> Plan | None:
  """The kernel's plan for logits of `shape` and `dtype`, or None where it does not apply
  (`device_kind`: the TPU it is for, see `vmem_cap`)."""
  if len(shape) != 2 or not interpret and np.dtype(compute_dtype) != np.float32:
    return None
  n, c = shape
  itemsize = np.dtype(dtype).itemsize
  if n == 0:
    return None
  ax = 0 if column_major(n, c) else 1
  if ax == 0:
    if per_class:  # a (C, 1) class vector pads to 128 lanes in VMEM
      return None
    rows, chunk = 128, min(_COL_CHUNK, _round_up(c, 16))
  else:
    rows, chunk = (8 if itemsize >= 4 else 16), min(_ROW_CHUNK, _round_up(c, 128))
  padded = _round_up(c, chunk)
  # Few classes: more rows per block (up to `_CHUNK_ELEMENTS` a chunk), so that the grid
  # has fewer steps (each costs a fixed overhead) and DMAs are larger.
  rows *= max(1, min(-(-n // rows), _CHUNK_ELEMENTS // (rows * padded)))
  cbytes = max(4, np.dtype(compute_dtype).itemsize)
  vmem = 2 * rows * padded * 3 * itemsize  # z, y and the output, double-buffered
  if per_class:
    vmem += 2 * 2 * 8 * padded * cbytes
  vmem += 16 * chunk * rows * cbytes + (4 << 20)  # chunk temporaries, row vectors
  if vmem > vmem_cap(device_kind):
    return None
  return Plan(ax, rows, chunk, padded, vmem)


def _elems(z, y, alpha, gamma, m, s_rest, is_top):
  """`s`, `1 - s` (as `exp(log(1 - s))`) and `w`: `_categorical._elems`' default form."""
  has_rest = s_rest > 0.0
  s_rest_safe = jnp.where(has_rest, s_rest, 1.0)
  log_norm = jnp.log1p(s_rest)
  log_s = z - m - log_norm
  s = jnp.exp(log_s)
  log_s_fin = jnp.where(log_s == -jnp.inf, 0.0, log_s)
  s_not_top = jnp.where(is_top, 0.0, s)
  log_1m_s_top = jnp.where(has_rest, jnp.log(s_rest_safe) - log_norm, _NO_REST_LOG)
  log_1m_s = jnp.where(is_top, log_1m_s_top, jnp.log1p(-s_not_top))
  r_top = jnp.where(has_rest, log_norm * (1.0 + s_rest_safe) / s_rest_safe, 1.0)
  r = jnp.where(is_top, r_top, -log_s_fin * jnp.exp(-jnp.where(is_top, 0.0, log_1m_s)))
  focal = jnp.exp(gamma * log_1m_s)
  w = alpha * y * focal * (1.0 + gamma * s * r)
  return s, jnp.exp(log_1m_s), w


def _kernel(hyper_ref, z_ref, y_ref, ct_ref, valid_ref, *refs, p: Plan, num_classes: int,
            per_class: bool, cdt):
  """One block of whole rows: `out = ct * where(valid, dloss/dz, 0)`."""
  if per_class:
    alpha_ref, gamma_ref, out_ref = refs
  else:
    (out_ref,) = refs
  ax, chunk = p.ax, p.chunk
  rows = z_ref.shape[1 - ax]
  cshape = (chunk, rows) if ax == 0 else (rows, chunk)
  rshape = (1, rows) if ax == 0 else (rows, 1)
  # int32 loop indices, also with jax_enable_x64 (Mosaic has no 64-bit integers).
  zero_i, chunks = jnp.int32(0), jnp.int32(p.padded // chunk)

  def index(k):
    start = pl.multiple_of(k * chunk, chunk)
    return (pl.ds(start, chunk), slice(None)) if ax == 0 else (slice(None), pl.ds(start, chunk))

  def load(k):
    idx = index(k)
    cls = lax.broadcasted_iota(jnp.int32, cshape, ax) + k * chunk
    inside = cls < num_classes  # the padding of the last chunk: no class
    return z_ref[idx].astype(cdt), cls, inside, idx

  # The row max, the first class at it, and whether a logit is NaN.
  def max_pass(k, carry):
    m, top, nan = carry
    z, cls, inside, _ = load(k)
    zm = jnp.where(inside, z, -jnp.inf)
    cm = jnp.max(zm, axis=ax, keepdims=True)
    ci = jnp.min(jnp.where(zm == cm, cls, num_classes), axis=ax, keepdims=True)
    cn = jnp.max(jnp.where(inside & (z != z), 1.0, 0.0).astype(cdt), axis=ax, keepdims=True)
    new = cm > m
    return jnp.where(new, cm, m), jnp.where(new, ci, top), jnp.maximum(nan, cn)

  m, top, nan = lax.fori_loop(zero_i, chunks, max_pass, (
      jnp.full(rshape, -jnp.inf, cdt), jnp.zeros(rshape, jnp.int32), jnp.zeros(rshape, cdt)))
  m = jnp.where(nan > 0.0, jnp.nan, m)
  finite = jnp.isfinite(m)
  m = jnp.where(finite, m, 0.0)

  def mass_pass(k, s_rest):
    z, cls, inside, _ = load(k)
    e = jnp.where(inside & (cls != top), jnp.exp(z - m), 0.0)
    return s_rest + jnp.sum(e, axis=ax, keepdims=True)

  s_rest = lax.fori_loop(zero_i, chunks, mass_pass, jnp.zeros(rshape, cdt))
  s_rest = jnp.where(finite, s_rest, 0.0)

  def terms(k):
    z, cls, inside, idx = load(k)
    if per_class:
      alpha, gamma = alpha_ref[idx], gamma_ref[idx]
    else:
      alpha, gamma = hyper_ref[0], hyper_ref[1]
    y = jnp.where(inside, y_ref[idx].astype(cdt), 0.0)
    is_top = cls == top
    s, one_m_s, w = _elems(jnp.where(inside, z, -jnp.inf), y, alpha, gamma, m, s_rest, is_top)
    return s, one_m_s, jnp.where(inside, w, 0.0), is_top, idx

  def weight_pass(k, carry):
    w_sum, w_rest = carry
    _, _, w, is_top, _ = terms(k)
    return (w_sum + jnp.sum(w, axis=ax, keepdims=True),
            w_rest + jnp.sum(jnp.where(is_top, 0.0, w), axis=ax, keepdims=True))

  zero = jnp.zeros(rshape, cdt)
  w_sum, w_rest = lax.fori_loop(zero_i, chunks, weight_pass, (zero, zero))
  keep = valid_ref[...] != 0
  ct = ct_ref[...].astype(cdt)

  # dloss/dz_j = s_j (W - w_j) - (1 - s_j) w_j, with W - w_top summed directly.
  def grad_pass(k, carry):
    s, one_m_s, w, is_top, idx = terms(k)
    others = jnp.where(is_top, w_rest, w_sum - w)
    grad = jnp.where(keep, s * others - one_m_s * w, 0.0)
    out_ref[idx] = (ct * grad).astype(out_ref.dtype)
    return carry

  lax.fori_loop(zero_i, chunks, grad_pass, zero_i)


def kernel_ct_times_grad(ct, z, y, alpha, gamma, valid, *, interpret: bool = False,
                         device_kind: str | None = None):
  """`ct[:, None] * where(valid, dloss/dz, 0)` of (N, C) logits `z` and targets `y`, in the
  dtype of `z`, by the Pallas kernel. `ct`, `valid`: (N, 1); `alpha`, `gamma`: scalars or
  class vectors of the compute dtype (their dtype), broadcastable to `z`."""
  n, c = z.shape
  cdt = alpha.dtype
  per_class = alpha.size > 1 or gamma.size > 1
  p = plan(z.shape, z.dtype, cdt, per_class, interpret, device_kind)
  if p is None:
    raise ValueError(f"categorical kernel: no plan for {z.shape} {z.dtype}")
  hyper = jnp.stack([alpha.reshape(-1)[0], gamma.reshape(-1)[0]])
  if p.ax == 0:
    views = (z.T, y.T)
    vec = lambda v: v.reshape(1, n)
    big = pl.BlockSpec((p.padded, p.rows), lambda i: (0, i))
    small = pl.BlockSpec((1, p.rows), lambda i: (0, i))
  else:
    views = (z, y)
    vec = lambda v: v.reshape(n, 1)
    big = pl.BlockSpec((p.rows, p.padded), lambda i: (i, 0))
    small = pl.BlockSpec((p.rows, 1), lambda i: (i, 0))
  in_specs = [pl.BlockSpec(memory_space=pltpu.SMEM), big, big, small, small]
  args = [hyper, *views, vec(ct.astype(cdt)), vec(valid.astype(jnp.int32))]
  if per_class:  # row-major only (plan)
    in_specs += [pl.BlockSpec((1, p.padded), lambda i: (0, 0))] * 2
    args += [jnp.broadcast_to(v.reshape(-1), (c,)).reshape(1, c) for v in (alpha, gamma)]
  # For Mosaic, traced with 32-bit defaults also under jax_enable_x64: it has no 64-bit types,
  # and a stray one (a Python int carry, an index map's constant) aborts the TPU compiler.
  # (Interpret mode keeps the caller's setting: the tests run float64 logits through it.)
  with contextlib.nullcontext() if interpret else jax.enable_x64(False):
    out = pl.pallas_call(
        functools.partial(_kernel, p=p, num_classes=c, per_class=per_class, cdt=cdt),
        grid=(pl.cdiv(n, p.rows),), in_specs=in_specs, out_specs=big,
        # Under shard_map (check_vma) the output varies over the mesh axes as the logits do.
        out_shape=jax.ShapeDtypeStruct(views[0].shape, z.dtype,
                                       manual_axis_type=jax.typeof(views[0]).manual_axis_type),
        interpret=interpret,
        compiler_params=None if interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=int(p.vmem)),
    )(*args)
  return out.T if p.ax == 0 else out


# --- the primitives ----------------------------------------------------------------------

# `_categorical.masked_z_grad`, the jnp formula of the gradient, handed over by `_categorical`
# when it imports this module (`use_jnp_grad`): importing it from here would be a cycle.
_JNP_GRAD: list = []


def use_jnp_grad(fn) -> None:
  """Sets the jnp formula of the gradient: `fn(z, y, alpha, gamma, valid, options)`."""
  _JNP_GRAD[:] = [fn]


def _jnp_grad(z, y, alpha, gamma, valid, options):
  """where(valid, dloss/dz, 0), (.., C) in the compute dtype: `_categorical`'s jnp form."""
  return _JNP_GRAD[0](z, y, alpha, gamma, valid[..., 0], options)


def _jnp_row_dot_grad(dz, z, y, alpha, gamma, valid, *, options, interpret):
  del interpret
  g = _jnp_grad(z, y, alpha, gamma, valid, options)
  return jnp.sum(g * dz.astype(g.dtype), axis=-1, keepdims=True)


def _jnp_ct_times_grad(ct, z, y, alpha, gamma, valid, *, options, interpret):
  del interpret
  g = _jnp_grad(z, y, alpha, gamma, valid, options)
  return (ct.astype(g.dtype) * g).astype(z.dtype)


def _kernel_ct_times_grad(ct, z, y, alpha, gamma, valid, *, options, interpret,
                          device_kind=None):
  """The kernel where its plan fits the chip, else the jnp formula (a chip with less VMEM than
  assumed at trace time: the same HBM passes as the XLA form's backward)."""
  if plan(z.shape, z.dtype, alpha.dtype, alpha.size > 1 or gamma.size > 1, interpret,
          device_kind) is None:
    return _jnp_ct_times_grad(ct, z, y, alpha, gamma, valid, options=options,
                              interpret=interpret)
  return kernel_ct_times_grad(ct, z, y, alpha, gamma, valid, interpret=interpret,
                              device_kind=device_kind)


def _target_device_kind(ctx) -> str | None:
  """The device kind of the TPU a lowering is for: of its backend's devices (a TPU client, or
  the compile-only client of a TPU topology ahead of time), else None."""
  try:
    return ctx.module_context.backend.devices()[0].device_kind
  except Exception:  # pylint: disable=broad-except  # no backend with devices
    return None


def _tpu_ct_times_grad_lowering(ctx, *args, options, interpret):
  """ct_times_grad on TPU: the kernel, its plan checked against the target chip's VMEM."""
  fn = functools.partial(_kernel_ct_times_grad, options=options, interpret=interpret,
                         device_kind=_target_device_kind(ctx))
  return mlir.lower_fun(fn, multiple_results=False)(ctx, *args)


row_dot_grad_p = jex_core.Primitive("categorical_focal_row_dot_grad")
ct_times_grad_p = jex_core.Primitive("categorical_focal_ct_times_grad")


def row_dot_grad(dz, z, y, alpha, gamma, valid, *, options, interpret=False):
  """sum_j where(valid, dloss/dz_j, 0) dz_j per row, (..) in the compute dtype (`alpha`'s):
  linear in `dz`; its transpose is `ct_times_grad`."""
  valid = jnp.broadcast_to(valid, z.shape[:-1])[..., None]
  out = row_dot_grad_p.bind(dz, z, y, alpha, gamma, valid, options=options,
                            interpret=interpret)
  return out[..., 0]


def _row_dot_grad_abstract(dz, z, y, alpha, gamma, valid, **_):
  return z.update(shape=z.shape[:-1] + (1,), dtype=alpha.dtype, weak_type=False)


def _ct_times_grad_abstract(ct, z, y, alpha, gamma, valid, **_):
  return z.update(weak_type=False)


row_dot_grad_p.def_abstract_eval(_row_dot_grad_abstract)
ct_times_grad_p.def_abstract_eval(_ct_times_grad_abstract)
row_dot_grad_p.def_impl(_jnp_row_dot_grad)
ct_times_grad_p.def_impl(
    lambda *a, options, interpret: (_kernel_ct_times_grad if interpret else _jnp_ct_times_grad)(
        *a, options=options, interpret=interpret))

# Lowerings: jnp everywhere; ct_times_grad the kernel on TPU, and in interpret mode anywhere.
mlir.register_lowering(row_dot_grad_p, mlir.lower_fun(_jnp_row_dot_grad, multiple_results=False))
mlir.register_lowering(ct_times_grad_p, mlir.lower_fun(
    lambda *a, options, interpret: (_kernel_ct_times_grad if interpret else _jnp_ct_times_grad)(
        *a, options=options, interpret=interpret), multiple_results=False))
mlir.register_lowering(ct_times_grad_p, _tpu_ct_times_grad_lowering, platform="tpu")


def _transpose_row_dot_grad(ct, dz, z, y, alpha, gamma, valid, *, options, interpret):
  assert ad.is_undefined_primal(dz)
  assert not any(ad.is_undefined_primal(a) for a in (z, y, alpha, gamma, valid))
  if type(ct) is ad.Zero:
    out = ad.Zero(dz.aval)
  else:
    out = ct_times_grad_p.bind(ct, z, y, alpha, gamma, valid, options=options,
                               interpret=interpret)
  return [out, None, None, None, None, None]


def _transpose_ct_times_grad(ct, cot, z, y, alpha, gamma, valid, *, options, interpret):
  assert ad.is_undefined_primal(cot)
  assert not any(ad.is_undefined_primal(a) for a in (z, y, alpha, gamma, valid))
  if type(ct) is ad.Zero:
    out = ad.Zero(cot.aval)
  else:
    out = row_dot_grad_p.bind(ct, z, y, alpha, gamma, valid, options=options,
                              interpret=interpret).astype(cot.aval.dtype)
  return [out, None, None, None, None, None]


ad.primitive_transposes[row_dot_grad_p] = _transpose_row_dot_grad
ad.primitive_transposes[ct_times_grad_p] = _transpose_ct_times_grad


def _jvp(fn, primals, tangents, *, options, interpret):
  """The JVP of either primitive: `jax.jvp` of its jnp formula (differentiable to any order:
  `_categorical`'s row statistics and elementwise terms have their own rules)."""
  *diff, valid = primals
  tans = [ad.instantiate_zeros(t) for t in tangents[:-1]]
  f = lambda *d: fn(*d, valid, options=options, interpret=interpret)
  return jax.jvp(f, tuple(diff), tuple(tans))


ad.primitive_jvps[row_dot_grad_p] = functools.partial(_jvp, _jnp_row_dot_grad)
ad.primitive_jvps[ct_times_grad_p] = functools.partial(_jvp, _jnp_ct_times_grad)


def _batch(prim, jnp_fn, args, dims, *, options, interpret):
  """vmap: batch dimensions of the linear input, logits, targets and mask moved to the front
  (the others broadcast) and the primitive bound at that rank; batched `alpha` / `gamma`
  take the jnp formula under `jax.vmap`."""
  lin, z, y, alpha, gamma, valid = args
  d_lin, d_z, d_y, d_alpha, d_gamma, d_valid = dims
  none = None  # an input that is not batched
  if d_alpha is not none or d_gamma is not none:
    f = functools.partial(jnp_fn, options=options, interpret=interpret)
    return jax.vmap(f, in_axes=tuple(dims))(*args), 0
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not none)
  moved = []
  for a, d in ((lin, d_lin), (z, d_z), (y, d_y), (valid, d_valid)):
    a = (jnp.broadcast_to(a, (size,) + a.shape) if d is none else jnp.moveaxis(a, d, 0))
    moved.append(a)
  lin, z, y, valid = moved
  rank = z.ndim
  # alpha, gamma: rank-matched to the unbatched logits; one more leading 1.
  alpha, gamma = (a.reshape((1,) * (rank - a.ndim) + a.shape) if a.ndim else a
                  for a in (alpha, gamma))
  return prim.bind(lin, z, y, alpha, gamma, valid, options=options, interpret=interpret), 0


batching.primitive_batchers[row_dot_grad_p] = functools.partial(
    _batch, row_dot_grad_p, _jnp_row_dot_grad)
batching.primitive_batchers[ct_times_grad_p] = functools.partial(
    _batch, ct_times_grad_p, _jnp_ct_times_grad)
