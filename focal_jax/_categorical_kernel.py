"""The categorical focal loss's gradient in one pass over the logits: a Pallas kernel in the
transpose position of the tangent, Mosaic on TPU and Triton on CUDA (engine, JAX- and
platform-specific; the whole module).

With XLA fusions the backward of `jit(grad(mean loss))` reads the rows of the logits three
times (the row statistics, `W = sum_j w_j`, the gradient `s_j W - w_j`; docs/math.md
"Categorical"): 6x the logits' bytes on a TPU v5e at (2048, 30522), 6-10x on an H100 (with
(N, C) temporaries there). The kernels compute the statistics, `W` and the gradient from
blocks of whole rows and write `ct * gradient` directly: one read of the logits and targets,
one write (3x).

Under `jax.grad` the kernel must take the cotangent `ct` of the per-row losses as an input,
or its (N, C) output would be read again by the multiply. So the logits' tangent term of
`_focal_rows`' rule is a primitive, `row_dot_grad(dz; z, y, ...) = sum_j g_j dz_j`, linear in
`dz`, whose transpose is the primitive `ct_times_grad(ct; z, y, ...) = ct * g` (and the other
way round). Under a reduction (`_categorical._kernel_total`) the tangent is `total_dot_grad`,
the same summed over the rows, whose transpose is `ct_times_grad` with a scalar `ct`: the
kernel reads it once, where a per-row cotangent would be a vector XLA writes for the kernel
(at C = 2 half the float32 logits' bytes). Without `where` (`CategoricalOptions.masked`) no
row mask is read either. All three primitives have JVP rules (for second derivatives;
written as `jax.jvp` of the jnp formulas of `_categorical`, so they are differentiable to any
order) and batching rules, and lower to the jnp formulas everywhere except `ct_times_grad` on
TPU and CUDA, where it is the kernel (the dot primitives appear in forward mode only, where
they stay jnp). `interpret="tpu"` / `"gpu"` lowers `ct_times_grad` to that kernel in Pallas'
interpret mode on any platform (the tests, on the CPU).

Both kernels run the same four loops over chunks of classes of a block of rows
(`_grad_passes`): the max and its first class, the non-top mass, `W` (and `W - w_top`), and
the gradient.

TPU (Mosaic): a block of whole rows sits in VMEM. For a (N, C) array stored row-major (TPU's
default layout where C is a multiple of 128, or N is not) blocks of 8 (16 for 16-bit) rows;
for one stored column-major (TPU picks it where that pads less: C not a multiple of 128 and N
one, e.g. (2048, 30522)) blocks of 128 rows of the transposed view (C, N), so that no
transpose is copied in HBM; at few classes a multiple of those (`plan`). Where a block does
not fit in VMEM (`vmem_cap`), the logits are not 2-D, the compute dtype is not float32, or a
per-class `alpha` / `gamma` meets the column-major form, `plan` says no and the XLA form
stays.

CUDA (Triton): each program takes a power-of-two number of rows and loops over chunks of up
to `_GPU_BLOCK` classes, loading them from the whole arrays with masks (`gpu_plan`); rows of
at most one chunk are loaded once and kept in registers, longer ones are read once per loop
(four times, from the L2 cache where it holds them: XLA's cost model, which the H100 figures
come from, counts the kernel's operands once). Float32 compute only, 2-D, under 2^31
entries. Never run on a GPU yet (compiled for an H100 ahead of time; interpret mode on CPU):
`FOCAL_JAX_GPU_KERNEL=0` keeps it out.
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
from jax.experimental.pallas import triton as plgpu
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


def _grad_passes(read_z, read_terms, write, *, chunks: int, chunk: int, cshape, ax: int,
                 num_classes: int, keep, ct, cdt):
  """The body both kernels share: four loops over the `chunks` chunks of a block of whole rows
  (`cshape`: a chunk's shape, class axis `ax`) writing `ct * where(keep, dloss/dz, 0)`.

  `read_z(k)`: chunk `k` of the logits; `read_terms(k)`: its targets, alpha and gamma (scalars
  or arrays that broadcast to the chunk); `write(k, v)`: chunk `k` of the output. `keep`, `ct`:
  a row's mask and cotangent (the chunk's shape with 1 on the class axis). Classes past
  `num_classes` (the padding of the last chunk) take no part.
  """
  rshape = tuple(1 if d == ax else size for d, size in enumerate(cshape))
  # int32 loop indices, also with jax_enable_x64 (Mosaic has no 64-bit integers).
  zero_i, n_chunks = jnp.int32(0), jnp.int32(chunks)

  def load(k):
    cls = lax.broadcasted_iota(jnp.int32, cshape, ax) + k * chunk
    inside = cls < num_classes  # the padding of the last chunk: no class
    return read_z(k).astype(cdt), cls, inside

  # The row max, the first class at it, and whether a logit is NaN.
  def max_pass(k, carry):
    m, top, nan = carry
    z, cls, inside = load(k)
    zm = jnp.where(inside, z, -jnp.inf)
    cm = jnp.max(zm, axis=ax, keepdims=True)
    ci = jnp.min(jnp.where(zm == cm, cls, num_classes), axis=ax, keepdims=True)
    cn = jnp.max(jnp.where(inside & (z != z), 1.0, 0.0).astype(cdt), axis=ax, keepdims=True)
    new = cm > m
    return jnp.where(new, cm, m), jnp.where(new, ci, top), jnp.maximum(nan, cn)

  m, top, nan = lax.fori_loop(zero_i, n_chunks, max_pass, (
      jnp.full(rshape, -jnp.inf, cdt), jnp.zeros(rshape, jnp.int32), jnp.zeros(rshape, cdt)))
  m = jnp.where(nan > 0.0, jnp.nan, m)
  finite = jnp.isfinite(m)
  m = jnp.where(finite, m, 0.0)

  def mass_pass(k, s_rest):
    z, cls, inside = load(k)
    e = jnp.where(inside & (cls != top), jnp.exp(z - m), 0.0)
    return s_rest + jnp.sum(e, axis=ax, keepdims=True)

  s_rest = lax.fori_loop(zero_i, n_chunks, mass_pass, jnp.zeros(rshape, cdt))
  s_rest = jnp.where(finite, s_rest, 0.0)

  def terms(k):
    z, cls, inside = load(k)
    y, alpha, gamma = read_terms(k)
    y = jnp.where(inside, y.astype(cdt), 0.0)
    is_top = cls == top
    s, one_m_s, w = _elems(jnp.where(inside, z, -jnp.inf), y, alpha, gamma, m, s_rest, is_top)
    return s, one_m_s, jnp.where(inside, w, 0.0), is_top

  def weight_pass(k, carry):
    w_sum, w_rest = carry
    _, _, w, is_top = terms(k)
    return (w_sum + jnp.sum(w, axis=ax, keepdims=True),
            w_rest + jnp.sum(jnp.where(is_top, 0.0, w), axis=ax, keepdims=True))

  zero = jnp.zeros(rshape, cdt)
  w_sum, w_rest = lax.fori_loop(zero_i, n_chunks, weight_pass, (zero, zero))
  ct = ct.astype(cdt)

  # dloss/dz_j = s_j (W - w_j) - (1 - s_j) w_j, with W - w_top summed directly.
  def grad_pass(k, carry):
    s, one_m_s, w, is_top = terms(k)
    others = jnp.where(is_top, w_rest, w_sum - w)
    write(k, ct * jnp.where(keep, s * others - one_m_s * w, 0.0))
    return carry

  lax.fori_loop(zero_i, n_chunks, grad_pass, zero_i)


def _unpack(refs, row_ct: bool, masked: bool, per_class: bool):
  """A kernel's refs after the logits and targets: (ct, valid, alpha, gamma, out), None for
  those it was not given (ct: a scalar in `hyper_ref`; valid: all rows count; alpha and gamma:
  scalars in `hyper_ref`)."""
  refs = list(refs)
  ct_ref = refs.pop(0) if row_ct else None
  valid_ref = refs.pop(0) if masked else None
  alpha_ref, gamma_ref = (refs.pop(0), refs.pop(0)) if per_class else (None, None)
  (out_ref,) = refs
  return ct_ref, valid_ref, alpha_ref, gamma_ref, out_ref


def _kernel(hyper_ref, z_ref, y_ref, *refs, p: Plan, num_classes: int, row_ct: bool,
            masked: bool, per_class: bool, cdt):
  """One block of whole rows in VMEM (TPU): `out = ct * where(valid, dloss/dz, 0)`."""
  ct_ref, valid_ref, alpha_ref, gamma_ref, out_ref = _unpack(refs, row_ct, masked, per_class)
  ax, chunk = p.ax, p.chunk
  rows = z_ref.shape[1 - ax]

  def index(k):
    start = pl.multiple_of(k * chunk, chunk)
    return (pl.ds(start, chunk), slice(None)) if ax == 0 else (slice(None), pl.ds(start, chunk))

  def read_terms(k):
    idx = index(k)
    if per_class:
      return y_ref[idx], alpha_ref[idx], gamma_ref[idx]
    return y_ref[idx], hyper_ref[0], hyper_ref[1]

  def write(k, v):
    out_ref[index(k)] = v.astype(out_ref.dtype)

  _grad_passes(lambda k: z_ref[index(k)], read_terms, write, chunks=p.padded // chunk,
               chunk=chunk, cshape=(chunk, rows) if ax == 0 else (rows, chunk), ax=ax,
               num_classes=num_classes, keep=valid_ref[...] != 0 if masked else True,
               ct=ct_ref[...] if row_ct else hyper_ref[2], cdt=cdt)


def _hyper(ct, alpha, gamma):
  """The kernels' scalars, (alpha, gamma[, ct]) in the compute dtype, and whether `ct` is a
  per-row vector (not among them)."""
  row_ct = ct.ndim > 0
  scalars = [alpha.reshape(-1)[0], gamma.reshape(-1)[0]] + ([] if row_ct else [ct])
  return jnp.stack([v.astype(alpha.dtype) for v in scalars]), row_ct


def kernel_ct_times_grad(ct, z, y, alpha, gamma, valid, *, interpret: bool = False,
                         device_kind: str | None = None, masked: bool = True):
  """`ct * where(valid, dloss/dz, 0)` of (N, C) logits `z` and targets `y`, in the dtype of
  `z`, by the Pallas kernel. `ct`: (N, 1), or a scalar (read once, no per-row vector);
  `valid`: (N, 1), ignored (every row counts) where not `masked`; `alpha`, `gamma`: scalars or
  class vectors of the compute dtype (their dtype), broadcastable to `z`."""
  n, c = z.shape
  cdt = alpha.dtype
  per_class = alpha.size > 1 or gamma.size > 1
  p = plan(z.shape, z.dtype, cdt, per_class, interpret, device_kind)
  if p is None:
    raise ValueError(f"categorical kernel: no plan for {z.shape} {z.dtype}")
  hyper, row_ct = _hyper(ct, alpha, gamma)
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
  in_specs = [pl.BlockSpec(memory_space=pltpu.SMEM), big, big]
  args = [hyper, *views]
  if row_ct:
    in_specs.append(small)
    args.append(vec(ct.astype(cdt)))
  if masked:
    in_specs.append(small)
    args.append(vec(valid.astype(jnp.int32)))
  if per_class:  # row-major only (plan)
    in_specs += [pl.BlockSpec((1, p.padded), lambda i: (0, 0))] * 2
    args += [jnp.broadcast_to(v.reshape(-1), (c,)).reshape(1, c) for v in (alpha, gamma)]
  # For Mosaic, traced with 32-bit defaults also under jax_enable_x64: it has no 64-bit types,
  # and a stray one (a Python int carry, an index map's constant) aborts the TPU compiler.
  # (Interpret mode keeps the caller's setting: the tests run float64 logits through it.)
  with contextlib.nullcontext() if interpret else jax.enable_x64(False):
    out = pl.pallas_call(
        functools.partial(_kernel, p=p, num_classes=c, row_ct=row_ct, masked=masked,
                          per_class=per_class, cdt=cdt),
        grid=(pl.cdiv(n, p.rows),), in_specs=in_specs, out_specs=big,
        # Under shard_map (check_vma) the output varies over the mesh axes as the logits do.
        out_shape=jax.ShapeDtypeStruct(views[0].shape, z.dtype,
                                       manual_axis_type=jax.typeof(views[0]).manual_axis_type),
        interpret=interpret,
        compiler_params=None if interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=int(p.vmem)),
    )(*args)
  return out.T if p.ax == 0 else out


# --- the labels form of the targets (softmax_focal's integer labels) ---------------------
# `softmax_focal` with integer labels (no label smoothing) is `categorical_focal` with one-hot
# targets: -alpha_t (1 - s_t)**gamma_t log s_t. Its CUDA form (`_softmax`) binds the primitives
# with `y` the labels themselves, an integer (N, 1) array, and the GPU kernel builds the
# one-hot targets in registers from them (no (N, C) targets in memory). Where softmax_focal
# has no defined loss the targets are NaN, so the whole gradient row is NaN (softmax's XLA
# forms give such a row NaN at the target and at non-finite logits): an out-of-range label, or
# a row whose max is not finite (a NaN, an inf, or no finite logit). Masked rows stay exactly
# 0 (`valid`). Only the GPU kernel and the jnp formula read labels (the TPU one: jnp).


def labels_form(y) -> bool:
  """Whether `y` are integer labels ((N, 1)), not (N, C) targets."""
  return jnp.issubdtype(y.dtype, jnp.integer)


def _labels_y(label, cls, num_classes: int, bad, cdt):
  """One-hot targets of `label` ((.., 1)) at classes `cls`; NaN where the label is out of
  range or the row is `bad`."""
  ok = (label >= 0) & (label < num_classes)
  if bad is not None:
    ok = ok & ~bad
  return jnp.where(ok, jnp.where(cls == label, 1.0, 0.0), jnp.nan).astype(cdt)


def _jnp_labels_y(z, y, cdt):
  """`_labels_y` for (.., C) logits `z` in jnp (the primitives' formula)."""
  zc = z.astype(cdt)
  nan = jnp.any(jnp.isnan(zc), axis=-1, keepdims=True)
  top = jnp.max(jnp.where(jnp.isnan(zc), -jnp.inf, zc), axis=-1, keepdims=True)
  bad = nan | jnp.isinf(top)
  cls = lax.broadcasted_iota(y.dtype, z.shape, z.ndim - 1)
  return lax.stop_gradient(_labels_y(y, cls, z.shape[-1], bad, cdt))


# --- the GPU kernel (Pallas Triton) ------------------------------------------------------

# Entries of a block (rows x classes of a chunk) that one Triton program holds in registers.
_GPU_BLOCK = 2048
# The fewest programs a plan aims for where the rows allow (an H100 has 132 SMs).
_GPU_PROGRAMS = 512


@dataclasses.dataclass(frozen=True)
class GpuPlan:
  """How the Triton kernel takes a (N, C) row-major array: rows per program, classes per chunk
  (powers of two, as Triton's blocks must be), chunks per row, and warps per program."""
  rows: int
  chunk: int
  chunks: int
  warps: int


def _pow2_floor(x: int) -> int:
  return 1 << (max(1, x).bit_length() - 1)


def gpu_plan(shape: tuple[int, ...], compute_dtype: Any,
             interpret: bool = False) -> GpuPlan | None:
  """The Triton kernel's plan for logits of `shape`, or None where it does not apply: not 2-D,
  empty, a compute dtype other than float32 (any in interpret mode), or 2^31 entries or more
  (Triton's offsets are int32)."""
  if len(shape) != 2 or not interpret and np.dtype(compute_dtype) != np.float32:
    return None
  n, c = shape
  if n == 0 or c == 0 or n * c >= 2**31:
    return None
  chunk = min(1 << (c - 1).bit_length(), _GPU_BLOCK)
  rows = min(_GPU_BLOCK // chunk, _pow2_floor(n // _GPU_PROGRAMS))
  return GpuPlan(rows, chunk, -(-c // chunk), 4 if rows * chunk <= 1024 else 8)


def _gpu_kernel(hyper_ref, z_ref, y_ref, *refs, p: GpuPlan, n: int, num_classes: int,
                row_ct: bool, masked: bool, per_class: bool, cdt, labels: bool = False):
  """`p.rows` whole rows in chunks of `p.chunk` classes (Triton): `out = ct * where(valid,
  dloss/dz, 0)`. The refs are the whole arrays; loads and stores past their ends are masked."""
  ct_ref, valid_ref, alpha_ref, gamma_ref, out_ref = _unpack(refs, row_ct, masked, per_class)
  first = pl.program_id(0) * p.rows
  in_rows = first + lax.broadcasted_iota(jnp.int32, (p.rows, 1), 0) < n
  rows, one = pl.ds(first, p.rows), pl.ds(0, 1)

  def cols(k):
    return pl.ds(k * p.chunk, p.chunk)

  def in_cls(k):
    return k * p.chunk + lax.broadcasted_iota(jnp.int32, (1, p.chunk), 1) < num_classes

  def read_z(k):
    return plgpu.load(z_ref.at[rows, cols(k)], mask=in_rows & in_cls(k), other=0.0)

  def read_terms(k):
    if labels:  # one-hot targets from the labels (see `labels_form`)
      y = _labels_y(plgpu.load(y_ref.at[rows, one], mask=in_rows, other=0), k * p.chunk
                    + lax.broadcasted_iota(jnp.int32, (1, p.chunk), 1), num_classes, bad, cdt)
    else:
      y = plgpu.load(y_ref.at[rows, cols(k)], mask=in_rows & in_cls(k), other=0.0)
    if per_class:
      return y, *(plgpu.load(r.at[one, cols(k)], mask=in_cls(k), other=0.0)
                  for r in (alpha_ref, gamma_ref))
    return y, hyper_ref[0], hyper_ref[1]

  def write(k, v):
    plgpu.store(out_ref.at[rows, cols(k)], v.astype(out_ref.dtype), mask=in_rows & in_cls(k))

  keep = plgpu.load(valid_ref.at[rows, one], mask=in_rows, other=False) if masked else True
  ct = plgpu.load(ct_ref.at[rows, one], mask=in_rows, other=0.0) if row_ct else hyper_ref[2]
  bad = None
  if labels:  # rows without a finite max (a NaN, an inf, no finite logit): NaN targets
    z0 = read_z(0) if p.chunks == 1 else None

    def bad_pass(k, carry):
      top, nan = carry
      z = (z0 if z0 is not None else read_z(k)).astype(cdt)
      inside = in_cls(k)
      zm = jnp.where(inside & (z == z), z, -jnp.inf)
      cn = jnp.where(inside & (z != z), 1.0, 0.0).astype(cdt)
      return (jnp.maximum(top, jnp.max(zm, axis=1, keepdims=True)),
              jnp.maximum(nan, jnp.max(cn, axis=1, keepdims=True)))

    init = (jnp.full((p.rows, 1), -jnp.inf, cdt), jnp.zeros((p.rows, 1), cdt))
    top, nan = lax.fori_loop(jnp.int32(0), jnp.int32(p.chunks), bad_pass, init)
    bad = (nan > 0.0) | (top == jnp.inf) | (top == -jnp.inf)
  if p.chunks == 1:  # whole rows in one chunk: read once, kept in registers by every loop
    z0, terms0 = read_z(0), read_terms(0)
    read_z, read_terms = lambda k: z0, lambda k: terms0
  _grad_passes(read_z, read_terms, write, chunks=p.chunks, chunk=p.chunk,
               cshape=(p.rows, p.chunk), ax=1, num_classes=num_classes, keep=keep, ct=ct,
               cdt=cdt)


def gpu_kernel_ct_times_grad(ct, z, y, alpha, gamma, valid, *, interpret: bool = False,
                             masked: bool = True):
  """`kernel_ct_times_grad` by the Triton kernel (CUDA; any platform in interpret mode)."""
  n, c = z.shape
  cdt = alpha.dtype
  per_class = alpha.size > 1 or gamma.size > 1
  p = gpu_plan(z.shape, cdt, interpret)
  if p is None:
    raise ValueError(f"categorical GPU kernel: no plan for {z.shape} {z.dtype}")
  hyper, row_ct = _hyper(ct, alpha, gamma)
  args = [hyper, z, y] + [ct.astype(cdt)] * row_ct + [valid.astype(jnp.bool_)] * masked
  if per_class:
    args += [jnp.broadcast_to(v.reshape(-1), (c,)).reshape(1, c) for v in (alpha, gamma)]
  # 32-bit index arithmetic also under jax_enable_x64 (as for Mosaic).
  with contextlib.nullcontext() if interpret else jax.enable_x64(False):
    return pl.pallas_call(
        functools.partial(_gpu_kernel, p=p, n=n, num_classes=c, row_ct=row_ct,
                          masked=masked, per_class=per_class, cdt=cdt,
                          labels=labels_form(y)),
        grid=(pl.cdiv(n, p.rows),),
        out_shape=jax.ShapeDtypeStruct(z.shape, z.dtype,
                                       manual_axis_type=jax.typeof(z).manual_axis_type),
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=p.warps,
                                                                    num_stages=1),
    )(*args)


# --- the primitives ----------------------------------------------------------------------

# `_categorical.masked_z_grad`, the jnp formula of the gradient, handed over by `_categorical`
# when it imports this module (`use_jnp_grad`): importing it from here would be a cycle.
_JNP_GRAD: list = []


def use_jnp_grad(fn) -> None:
  """Sets the jnp formula of the gradient: `fn(z, y, alpha, gamma, valid, options)`."""
  _JNP_GRAD[:] = [fn]


def _jnp_grad(z, y, alpha, gamma, valid, options):
  """where(valid, dloss/dz, 0), (.., C) in the compute dtype: `_categorical`'s jnp form."""
  if labels_form(y):
    y = _jnp_labels_y(z, y, alpha.dtype)
  return _JNP_GRAD[0](z, y, alpha, gamma, valid[..., 0], options)


def _jnp_row_dot_grad(dz, z, y, alpha, gamma, valid, *, options, interpret):
  del interpret
  g = _jnp_grad(z, y, alpha, gamma, valid, options)
  return jnp.sum(g * dz.astype(g.dtype), axis=-1, keepdims=True)


def _jnp_ct_times_grad(ct, z, y, alpha, gamma, valid, *, options, interpret):
  del interpret
  g = _jnp_grad(z, y, alpha, gamma, valid, options)
  return (ct.astype(g.dtype) * g).astype(z.dtype)


def _tpu_ct_times_grad(ct, z, y, alpha, gamma, valid, *, options, interpret,
                       device_kind=None):
  """The TPU kernel where its plan fits the chip, else the jnp formula (a chip with less VMEM
  than assumed at trace time: the same HBM passes as the XLA form's backward)."""
  if labels_form(y) or plan(z.shape, z.dtype, alpha.dtype, alpha.size > 1 or gamma.size > 1,
                            bool(interpret), device_kind) is None:
    return _jnp_ct_times_grad(ct, z, y, alpha, gamma, valid, options=options,
                              interpret=interpret)
  return kernel_ct_times_grad(ct, z, y, alpha, gamma, valid, interpret=bool(interpret),
                              device_kind=device_kind, masked=options.masked)


def _gpu_ct_times_grad(ct, z, y, alpha, gamma, valid, *, options, interpret):
  """The Triton kernel where its plan applies, else the jnp formula."""
  if gpu_plan(z.shape, alpha.dtype, bool(interpret)) is None:
    return _jnp_ct_times_grad(ct, z, y, alpha, gamma, valid, options=options,
                              interpret=interpret)
  return gpu_kernel_ct_times_grad(ct, z, y, alpha, gamma, valid, interpret=bool(interpret),
                                  masked=options.masked)


def _any_ct_times_grad(*args, options, interpret):
  """ct_times_grad off the kernels' platforms: the kernel `interpret` names ("tpu", "gpu") in
  Pallas' interpret mode, else (None) the jnp formula."""
  fn = {"tpu": _tpu_ct_times_grad, "gpu": _gpu_ct_times_grad}.get(interpret, _jnp_ct_times_grad)
  return fn(*args, options=options, interpret=interpret)


def _target_device_kind(ctx) -> str | None:
  """The device kind of the TPU a lowering is for: of its backend's devices (a TPU client, or
  the compile-only client of a TPU topology ahead of time), else None."""
  try:
    return ctx.module_context.backend.devices()[0].device_kind
  except Exception:  # pylint: disable=broad-except  # no backend with devices
    return None


def _tpu_ct_times_grad_lowering(ctx, *args, options, interpret):
  """ct_times_grad on TPU: the kernel, its plan checked against the target chip's VMEM."""
  if interpret:
    fn = functools.partial(_any_ct_times_grad, options=options, interpret=interpret)
  else:
    fn = functools.partial(_tpu_ct_times_grad, options=options, interpret=interpret,
                           device_kind=_target_device_kind(ctx))
  return mlir.lower_fun(fn, multiple_results=False)(ctx, *args)


def _cuda_ct_times_grad_lowering(ctx, *args, options, interpret):
  """ct_times_grad on CUDA: the Triton kernel."""
  fn = _any_ct_times_grad if interpret else _gpu_ct_times_grad
  return mlir.lower_fun(functools.partial(fn, options=options, interpret=interpret),
                        multiple_results=False)(ctx, *args)


row_dot_grad_p = jex_core.Primitive("categorical_focal_row_dot_grad")
total_dot_grad_p = jex_core.Primitive("categorical_focal_total_dot_grad")
ct_times_grad_p = jex_core.Primitive("categorical_focal_ct_times_grad")


def row_dot_grad(dz, z, y, alpha, gamma, valid, *, options, interpret=None):
  """sum_j where(valid, dloss/dz_j, 0) dz_j per row, (..) in the compute dtype (`alpha`'s):
  linear in `dz`; its transpose is `ct_times_grad` with a per-row cotangent. `interpret`:
  None (each platform's lowering), "tpu" or "gpu" (that kernel in Pallas' interpret mode on
  every platform)."""
  valid = jnp.broadcast_to(valid, z.shape[:-1])[..., None]
  out = row_dot_grad_p.bind(dz, z, y, alpha, gamma, valid, options=options,
                            interpret=interpret)
  return out[..., 0]


def total_dot_grad(dz, z, y, alpha, gamma, valid, *, options, interpret=None):
  """`row_dot_grad` summed over the rows, a scalar: its transpose is `ct_times_grad` with a
  scalar cotangent, which the kernels read once (no per-row vector is written for them)."""
  valid = jnp.broadcast_to(valid, z.shape[:-1])[..., None]
  return total_dot_grad_p.bind(dz, z, y, alpha, gamma, valid, options=options,
                               interpret=interpret)


def _jnp_total_dot_grad(dz, z, y, alpha, gamma, valid, *, options, interpret):
  return jnp.sum(_jnp_row_dot_grad(dz, z, y, alpha, gamma, valid, options=options,
                                   interpret=interpret))


def _row_dot_grad_abstract(dz, z, y, alpha, gamma, valid, **_):
  return z.update(shape=z.shape[:-1] + (1,), dtype=alpha.dtype, weak_type=False)


def _total_dot_grad_abstract(dz, z, y, alpha, gamma, valid, **_):
  return z.update(shape=(), dtype=alpha.dtype, weak_type=False)


def _ct_times_grad_abstract(ct, z, y, alpha, gamma, valid, **_):
  return z.update(weak_type=False)


row_dot_grad_p.def_abstract_eval(_row_dot_grad_abstract)
total_dot_grad_p.def_abstract_eval(_total_dot_grad_abstract)
ct_times_grad_p.def_abstract_eval(_ct_times_grad_abstract)
row_dot_grad_p.def_impl(_jnp_row_dot_grad)
total_dot_grad_p.def_impl(_jnp_total_dot_grad)
ct_times_grad_p.def_impl(_any_ct_times_grad)

# Lowerings: jnp everywhere; ct_times_grad the kernel on TPU and CUDA, and the kernel that
# `interpret` names in interpret mode anywhere.
for _prim, _fn in ((row_dot_grad_p, _jnp_row_dot_grad), (total_dot_grad_p, _jnp_total_dot_grad),
                   (ct_times_grad_p, _any_ct_times_grad)):
  mlir.register_lowering(_prim, mlir.lower_fun(_fn, multiple_results=False))
mlir.register_lowering(ct_times_grad_p, _tpu_ct_times_grad_lowering, platform="tpu")
mlir.register_lowering(ct_times_grad_p, _cuda_ct_times_grad_lowering, platform="cuda")


def _dual(prim, lin_aval):
  """The primitive whose transpose `prim` is, for a linear input like `lin_aval`."""
  if prim is not ct_times_grad_p:
    return ct_times_grad_p
  return total_dot_grad_p if lin_aval.shape == () else row_dot_grad_p


def _transpose(prim, ct, lin, z, y, alpha, gamma, valid, *, options, interpret):
  """The transpose of each primitive (linear in its first input) is its dual (`_dual`) applied
  to the cotangent, cast to the linear input's dtype."""
  assert ad.is_undefined_primal(lin)
  assert not any(ad.is_undefined_primal(a) for a in (z, y, alpha, gamma, valid))
  if type(ct) is ad.Zero:
    out = ad.Zero(lin.aval)
  else:
    out = _dual(prim, lin.aval).bind(ct, z, y, alpha, gamma, valid, options=options,
                                     interpret=interpret).astype(lin.aval.dtype)
  return [out, None, None, None, None, None]


def _jvp(fn, primals, tangents, *, options, interpret):
  """The JVP of each primitive: `jax.jvp` of its jnp formula (differentiable to any order:
  `_categorical`'s row statistics and elementwise terms have their own rules)."""
  *diff, valid = primals
  tans = [ad.instantiate_zeros(t) for t in tangents[:-1]]
  f = lambda *d: fn(*d, valid, options=options, interpret=interpret)
  return jax.jvp(f, tuple(diff), tuple(tans))


def _batch(prim, jnp_fn, args, dims, *, options, interpret):
  """vmap: batch dimensions of the linear input, logits, targets and mask moved to the front
  (the others broadcast) and the primitive bound at that rank; batched `alpha` / `gamma`
  take the jnp formula under `jax.vmap`. The scalar forms take the per-row ones: a batch of
  totals is the per-row `row_dot_grad` summed over each member's rows, and a batch of scalar
  cotangents spreads over each member's rows."""
  lin, z, y, alpha, gamma, valid = args
  d_lin, d_z, d_y, d_alpha, d_gamma, d_valid = dims
  none = None  # an input that is not batched
  if d_alpha is not none or d_gamma is not none:
    f = functools.partial(jnp_fn, options=options, interpret=interpret)
    return jax.vmap(f, in_axes=tuple(dims))(*args), 0
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not none)
  scalar_ct = prim is ct_times_grad_p and lin.ndim == (d_lin is not none)
  moved = []
  for a, d in ((lin, d_lin), (z, d_z), (y, d_y), (valid, d_valid)):
    a = (jnp.broadcast_to(a, (size,) + a.shape) if d is none else jnp.moveaxis(a, d, 0))
    moved.append(a)
  lin, z, y, valid = moved
  rank = z.ndim
  if scalar_ct:  # (size,) -> each member's rows
    lin = jnp.broadcast_to(lin.reshape((size,) + (1,) * (rank - 1)), z.shape[:-1] + (1,))
  # alpha, gamma: rank-matched to the unbatched logits; one more leading 1.
  alpha, gamma = (a.reshape((1,) * (rank - a.ndim) + a.shape) if a.ndim else a
                  for a in (alpha, gamma))
  if prim is total_dot_grad_p:
    out = row_dot_grad_p.bind(lin, z, y, alpha, gamma, valid, options=options,
                              interpret=interpret)
    return jnp.sum(out, axis=tuple(range(1, rank))), 0
  return prim.bind(lin, z, y, alpha, gamma, valid, options=options, interpret=interpret), 0


for _prim, _fn in ((row_dot_grad_p, _jnp_row_dot_grad), (total_dot_grad_p, _jnp_total_dot_grad),
                   (ct_times_grad_p, _jnp_ct_times_grad)):
  ad.primitive_transposes[_prim] = functools.partial(_transpose, _prim)
  ad.primitive_jvps[_prim] = functools.partial(_jvp, _fn)
  batching.primitive_batchers[_prim] = functools.partial(_batch, _prim, _fn)
