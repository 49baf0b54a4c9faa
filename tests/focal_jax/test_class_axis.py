"""`class_axis_name=` inside `shard_map` (vocabulary parallelism), 4 CPU devices.

Each member of the class axis holds a contiguous, equal slice of the classes (logits and
categorical targets ``P(..., "v")``; for the linear head the kernel ``P(None, "v")`` and the
bias ``P("v")``); labels are global class ids and alpha / gamma the whole ``(C,)`` vectors,
replicated. Checked here, against the float64 references of conftest.py (``focal_reference``
for values, float64 autodiff of its naive jax.numpy form for gradients), never against the
library itself:

- every member returns the whole loss, and ``jax.grad`` taken inside the shard_map body
  (``check_vma`` on, the default) gives each member the gradient of its own slice; on a 2 x 2
  (data x class) mesh with ``axis_name`` too (``lax.pmean`` over the data axis, the library's
  data-parallel recipe); ``jax.grad`` taken outside the shard_map gives the whole gradient;
- label smoothing, alpha and gamma vectors, ``ignore_index``, ``where``, ``sample_weight``,
  every reduction, positives spread unevenly over the shards, the linear head with several
  chunks; float32 at a float32 tolerance;
- a NaN logit on one member makes that row NaN on every member; masked rows are exactly 0
  with 0 gradient; the Hessian inside the body (SPMD: each member's slice perturbed at once);
- the gradient w.r.t. ``hidden``: whole when ``hidden`` is replicated (JAX sums the
  members' shares), each member's own share when it varies over the axis;
- the compiled program's collectives are per-row ((rows,)) or scalars only;
- argument errors at trace time.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import focal_jax

N, C, H, V = 8, 12, 5, 16
N_DEV = 4

pytestmark = pytest.mark.skipif(jax.device_count() < N_DEV, reason="needs 4 (CPU) devices")


@functools.lru_cache(maxsize=None)
def _data():
  rng = np.random.default_rng(1414)
  d = {}
  d["z"] = rng.normal(size=(N, C)) * 2
  # Labels: background (0) rows, an ignored (-1) row, labels in every class shard; positives
  # spread unevenly: class shards (of 3) hold 0, 3, 2 and 1 targets of the 6 non-ignored
  # non-background rows... and on the 2 x 2 mesh the data halves hold 3 and 2 positives.
  d["t"] = np.array([0, 4, 11, -1, 5, 0, 8, 3])
  d["tv"] = np.array([0, 5, 15, -1, 12, 0, 9, 6])
  d["where"] = np.array([1, 1, 1, 1, 1, 1, 0, 1], bool)
  d["sw"] = rng.uniform(0.5, 2.0, size=(N,))
  d["soft"] = rng.dirichlet(np.ones(C), N)
  d["soft"][[1, 5], 0] = 3.0  # argmax at class 0 (background) on two rows
  d["soft"] /= d["soft"].sum(-1, keepdims=True)
  d["w"] = rng.uniform(0.5, 1.5, size=(N,))  # cotangent of reduction="none"
  d["h"] = rng.normal(size=(N, H))
  d["k"] = rng.normal(size=(H, V)) / np.sqrt(H) * 3
  d["b"] = rng.normal(size=(V,))
  for n in (C, V):
    d[f"alpha{n}"] = rng.uniform(0.2, 1.0, size=(n,))
    d[f"gamma{n}"] = rng.uniform(0.0, 3.0, size=(n,))
  return d


@dataclasses.dataclass(frozen=True)
class Case:
  loss: str  # softmax, categorical, linear
  reduction: str
  mesh: str = "v"  # "v": 4 class shards; "dv": 2 (data) x 2 (class)
  vectors: bool = True  # alpha and gamma (C,) vectors; else alpha=None, gamma=0.5
  eps: float = 0.0
  masks: bool = True  # ignore_index (softmax, linear), where, sample_weight
  chunk: int | None = None

  @property
  def id(self):
    parts = [self.loss, self.reduction, self.mesh, "vec" if self.vectors else "scalar"]
    parts += [f"ls{self.eps}"] if self.eps else []
    parts += ["masks"] if self.masks else []
    parts += [f"chunk{self.chunk}"] if self.chunk else []
    return "-".join(parts)


CASES = [
    Case("softmax", "none", eps=0.1),
    Case("softmax", "mean", vectors=False, masks=False),
    Case("softmax", "mean_positive", mesh="dv", eps=0.2),
    Case("softmax", "sum", mesh="dv", vectors=False),
    Case("categorical", "none"),
    Case("categorical", "mean_positive", mesh="dv"),
    Case("categorical", "mean", vectors=False, masks=False),
    Case("categorical", "sum", mesh="dv"),
    Case("linear", "none", eps=0.1, chunk=3),  # 3 chunks, one padding row
    Case("linear", "mean", vectors=False, chunk=2),
    Case("linear", "mean_positive", mesh="dv", eps=0.1, chunk=3),
    Case("linear", "sum", mesh="dv", vectors=False, masks=False),
]


def _kw(case, n_cls):
  d = _data()
  kw = dict(reduction=case.reduction)
  if case.vectors:
    kw.update(alpha=d[f"alpha{n_cls}"], gamma=d[f"gamma{n_cls}"])
  else:
    kw.update(alpha=None, gamma=0.5)
  if case.loss != "categorical":
    kw["label_smoothing"] = case.eps
    if case.masks:
      kw["ignore_index"] = -1
  if case.masks:
    kw.update(where=d["where"], sample_weight=d["sw"])
  return kw


def _labels(case):
  t = _data()["tv" if case.loss == "linear" else "t"]
  return t if case.masks else np.where(t < 0, 1, t)


# ---------------------------------------------------------------------------- references


def _row_weights(case, valid, positive):
  """d(objective)/d(row loss) of the reduction (objective: sum(w * loss) for "none")."""
  d = _data()
  sw = d["sw"] if case.masks else np.ones(N)
  if case.reduction == "none":
    return np.where(valid, d["w"] * sw, 0.0)
  if case.reduction == "sum":
    return np.where(valid, sw, 0.0)
  count = valid.sum() if case.reduction == "mean" else (valid & positive).sum()
  return np.where(valid, sw, 0.0) / max(int(count), 1)


def _reference(case, refs):
  """(value, gradients) from conftest's float64 references, unsharded, on host arrays.

  Gradients: w.r.t. the logits, or (hidden, kernel, bias) for the linear head."""
  d = _data()
  n_cls = V if case.loss == "linear" else C
  kw = _kw(case, n_cls)
  alpha, gamma = kw["alpha"], kw["gamma"]
  alpha_vec = np.broadcast_to(1.0 if alpha is None else alpha, (n_cls,))
  gamma_vec = np.broadcast_to(gamma, (n_cls,))
  valid = d["where"] if case.masks else np.ones(N, bool)
  sw = d["sw"] if case.masks else np.ones(N)
  if case.loss == "categorical":
    rows = refs.categorical_focal(d["z"], d["soft"], alpha=alpha, gamma=gamma)
    positive = d["soft"].argmax(-1) != 0
    weights = _row_weights(case, valid, positive)
    value = (np.sum(d["w"] * np.where(valid, rows * sw, 0.0)) if case.reduction == "none"
             else refs.reduce(np.where(valid, rows * sw, 0.0), valid, valid & positive,
                              case.reduction))

    def objective(z):
      a, g = jnp.broadcast_to(alpha_vec, (1, C)), jnp.broadcast_to(gamma_vec, (1, C))
      r = jax.vmap(lambda zi, yi: refs.jnp_categorical_focal_sum(zi[None], yi[None], a, g))(
          z, d["soft"])
      return jnp.sum(weights * r)
    return value, (jax.grad(objective)(d["z"]),)
  t = _labels(case)
  valid = valid & (t >= 0)
  positive = t != 0
  weights = _row_weights(case, valid, positive)
  t0 = np.where(t >= 0, t, 0)
  z = d["h"] @ d["k"] + d["b"][None] if case.loss == "linear" else d["z"]
  rows = refs.softmax_focal(z, t0, alpha=alpha, gamma=gamma, label_smoothing=case.eps)
  rows = np.where(valid, rows * sw, 0.0)
  value = (np.sum(d["w"] * rows) if case.reduction == "none"
           else refs.reduce(rows, valid, valid & positive, case.reduction))

  def objective(z):
    r = jax.vmap(lambda zi, ti: refs.jnp_softmax_focal_sum(
        zi[None], ti[None], alpha_vec, gamma_vec, case.eps))(z, t0)
    return jnp.sum(weights * r)
  if case.loss == "linear":
    grads = jax.grad(lambda h, k, b: objective(h @ k + b[None]), (0, 1, 2))(
        d["h"], d["k"], d["b"])
    return value, grads
  return value, (jax.grad(objective)(z),)


# ------------------------------------------------------------------------- under test


def _setup(case, dtype=np.float64):
  """(body of the shard_map, host arrays, in_specs, out_specs of the gradients, axis_name)."""
  d = _data()
  rows = "d" if case.mesh == "dv" else None
  axis_name = "d" if case.mesh == "dv" else None
  n_cls = V if case.loss == "linear" else C
  kw = _kw(case, n_cls)
  w = d["w"]
  row_arrays = [w]
  row_specs = [P(rows)]
  for key in ("where", "sample_weight"):
    if key in kw:
      row_arrays.append(kw.pop(key))
      row_specs.append(P(rows))
  if case.loss == "linear":
    arrays = [d["h"], d["k"], d["b"], _labels(case)]
    specs = [P(rows, None), P(None, "v"), P("v"), P(rows)]
    grad_specs = (P(rows, None), P(None, "v"), P("v"))
    argnums = (0, 1, 2)

    def loss(h, k, b, t, **extra):
      return focal_jax.linear_softmax_focal(h, k, t, bias=b, chunk_size=case.chunk,
                                            class_axis_name="v", axis_name=axis_name,
                                            **extra, **kw)
  else:
    y = d["soft"] if case.loss == "categorical" else _labels(case)
    arrays = [d["z"], y]
    specs = [P(rows, "v"), P(rows, "v") if case.loss == "categorical" else P(rows)]
    grad_specs = (P(rows, "v"),)
    argnums = (0,)
    fn = getattr(focal_jax, f"{case.loss}_focal")

    def loss(z, y, **extra):
      return fn(z, y, class_axis_name="v", axis_name=axis_name, **extra, **kw)

  arrays = [a.astype(dtype) if a.dtype == np.float64 and i in argnums else a
            for i, a in enumerate(arrays)]
  n = len(arrays)
  names = ["where", "sample_weight"][:len(row_arrays) - 1]

  def objective(*args):
    main, (w, *rest) = args[:n], args[n:]
    out = loss(*main, **dict(zip(names, rest)))
    if case.reduction == "none":
      value = jnp.sum(w.astype(out.dtype) * out)
      return value if axis_name is None else lax.psum(value, axis_name)
    # The data-parallel recipe: average the value (and so the gradients) over the data axis.
    return out if axis_name is None else lax.pmean(out, axis_name)

  def body(*args):
    return jax.value_and_grad(objective, argnums=argnums)(*args)

  return body, objective, arrays + row_arrays, specs + row_specs, grad_specs, argnums


@functools.lru_cache(maxsize=None)
def _inside(case, mesh, dtype=np.float64):
  body, _, arrays, specs, grad_specs, _ = _setup(case, dtype)
  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(specs),
                            out_specs=(P(), grad_specs)))
  return f, arrays


def _close(got, want, rtol=1e-10, atol=1e-12):
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want), rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_grad_inside_shard_map_equals_float64_reference(case, refs, class_mesh):
  f, arrays = _inside(case, class_mesh(case.mesh))
  value, grads = f(*arrays)
  ref_value, ref_grads = _reference(case, refs)
  _close(value, ref_value)
  assert len(grads) == len(ref_grads)
  for g, r in zip(grads, ref_grads):
    assert g.shape == r.shape
    _close(g, r)


OUTSIDE = [CASES[0], CASES[5], CASES[10]]


@pytest.mark.parametrize("case", OUTSIDE, ids=lambda c: c.id)
def test_grad_outside_shard_map_equals_float64_reference(case, refs, class_mesh):
  """jax.grad of a function that calls the shard_map: the class-sharded logits (and the
  replicated hidden of the linear head) get the whole, unsharded gradient."""
  _, objective, arrays, specs, _, argnums = _setup(case)
  f = jax.shard_map(objective, mesh=class_mesh(case.mesh), in_specs=tuple(specs),
                    out_specs=P())
  value, grads = jax.jit(jax.value_and_grad(f, argnums=argnums))(*arrays)
  ref_value, ref_grads = _reference(case, refs)
  _close(value, ref_value)
  for g, r in zip(grads, ref_grads):
    _close(g, r)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[8]], ids=lambda c: c.id)
def test_float32(case, refs, class_mesh):
  f, arrays = _inside(case, class_mesh(case.mesh), np.float32)
  value, grads = f(*arrays)
  assert value.dtype == np.float32
  ref_value, ref_grads = _reference(case, refs)
  _close(value, ref_value, rtol=2e-5, atol=1e-6)
  for g, r in zip(grads, ref_grads):
    assert g.dtype == np.float32
    _close(g, r, rtol=2e-4, atol=2e-6)


# ------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("loss", ["softmax", "categorical"])
def test_nan_logit_on_one_member_is_nan_on_every_member_masked_rows_zero(loss, class_mesh):
  """A NaN logit on member 2 of row 1 (unmasked) makes row 1 NaN on every member; row 3 is
  masked and holds NaN and inf logits: exactly 0 loss and 0 gradient; other rows finite."""
  d = _data()
  z = d["z"].copy()
  z[1, 7] = np.nan  # member 2 of 4 (classes 6..8)
  z[3, 0], z[3, 10] = np.nan, np.inf
  where = np.ones(N, bool)
  where[3] = False
  mesh = class_mesh("v")
  fn = getattr(focal_jax, f"{loss}_focal")
  y = d["soft"] if loss == "categorical" else np.where(d["t"] < 0, 2, d["t"])

  def body(z, y):
    def total(z):
      out = fn(z, y, where=where, class_axis_name="v")
      return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0)), out
    (_, out), g = jax.value_and_grad(total, has_aux=True)(z)
    return out[None], g

  y_spec = P(None, "v") if loss == "categorical" else P()
  out, g = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(None, "v"), y_spec),
                                 out_specs=(P("v"), P(None, "v"))))(z, y)
  out, g = np.asarray(out), np.asarray(g)
  assert np.isnan(out[:, 1]).all(), out[:, 1]
  assert (out[:, 3] == 0.0).all()
  assert (g[3] == 0.0).all()
  finite = [r for r in range(N) if r not in (1, 3)]
  assert np.isfinite(out[:, finite]).all()
  assert (out == out[:1]).sum() == out.size - N_DEV  # equal on every member but the NaNs
  assert np.isfinite(g[finite]).all()


def test_softmax_class_axis_not_last(refs, class_mesh):
  """(N, C, W) logits with axis=1, the classes split over "v": the float64 reference on the
  moved axis, and its gradient."""
  rng = np.random.default_rng(5)
  z = rng.normal(size=(3, C, 2)) * 2
  t = np.array([[0, 11], [4, 7], [9, 2]])
  a = _data()["alpha12"]

  def body(z):
    return jax.value_and_grad(lambda z: focal_jax.softmax_focal(
        z, t, alpha=a, axis=1, label_smoothing=0.1, reduction="sum", class_axis_name="v"))(z)
  value, grad = jax.jit(jax.shard_map(body, mesh=class_mesh("v"), in_specs=P(None, "v"),
                                      out_specs=(P(), P(None, "v"))))(z)
  zl, tl = np.moveaxis(z, 1, -1).reshape(-1, C), t.reshape(-1)
  _close(value, refs.softmax_focal(zl, tl, alpha=a, label_smoothing=0.1, reduction="sum"))
  want = jax.grad(lambda z: refs.jnp_softmax_focal_sum(
      jnp.moveaxis(z, 1, -1).reshape(-1, C), tl, a, 2.0, 0.1))(z)
  _close(grad, want)


# ----------------------------------------------------------------------- second order


@pytest.mark.parametrize("loss", ["softmax", "categorical"])
def test_hessian_inside_shard_map_is_the_spmd_sum_of_blocks(loss, refs, class_mesh):
  """jax.hessian inside the body perturbs every member's slice at once (SPMD): member r
  gets sum over q of the unsharded Hessian's (r, q) blocks, here from float64 autodiff of
  the naive reference."""
  d = _data()
  z, t, y = d["z"][:3], np.array([4, 11, 0]), d["soft"][:3]
  a, g = d["alpha12"], d["gamma12"]
  mesh = class_mesh("v")
  if loss == "softmax":
    def fn(z, y):
      return focal_jax.softmax_focal(z, t, alpha=a, gamma=g, label_smoothing=0.1,
                                     reduction="sum", class_axis_name="v")

    def ref(z):
      return refs.jnp_softmax_focal_sum(z, t, a, g, 0.1)
  else:
    def fn(z, y):
      return focal_jax.categorical_focal(z, y, alpha=a, gamma=g, reduction="sum",
                                         class_axis_name="v")

    def ref(z):
      return refs.jnp_categorical_focal_sum(z, y, a[None], g[None])

  def body(z, y):
    return jax.hessian(fn)(z, y)[None]
  hs = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(None, "v"), P(None, "v")),
                             out_specs=P("v")))(z, y)
  full = jax.hessian(ref)(z)
  width = C // N_DEV
  for r in range(N_DEV):
    want = sum(full[:, r * width:(r + 1) * width, :, q * width:(q + 1) * width]
               for q in range(N_DEV))
    _close(hs[r], want)


# ------------------------------------------------------------------- hidden's gradient


def test_linear_hidden_gradient_replicated_is_whole_varying_is_own_share(refs, class_mesh):
  case = Case("linear", "mean", eps=0.1, chunk=3)
  d = _data()
  kw = _kw(case, V)
  t = _labels(case)
  mesh = class_mesh("v")

  def loss(h, k, b):
    return focal_jax.linear_softmax_focal(h, k, t, bias=b, chunk_size=3, class_axis_name="v",
                                          **kw)

  def body(h, k, b):
    whole = jax.grad(loss)(h, k, b)
    share = jax.grad(loss)(lax.pcast(h, "v", to="varying"), k, b)
    return whole, share[None], lax.psum(share, "v")

  whole, shares, summed = jax.jit(jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P(None, "v"), P("v")),
      out_specs=(P(), P("v"), P())))(d["h"], d["k"], d["b"])
  _, (ref_h, ref_k, _) = _reference(case, refs)
  _close(whole, ref_h)
  _close(summed, ref_h)
  _close(np.asarray(shares).sum(0), ref_h)
  # Each share is member r's classes' part: h-gradient of those columns alone.
  z = d["h"] @ d["k"] + d["b"][None]
  assert not np.allclose(shares[0], ref_h)
  del z, ref_k


# ------------------------------------------------------------------------------ HLO

_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-gather|all-reduce|collective-permute|"
                         r"all-to-all|reduce-scatter)(?:-start)?\(")
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def _collectives(text):
  found = []
  for line in text.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      shapes = [tuple(int(s) for s in dims.split(",") if s) for dims in _SHAPE.findall(m.group(1))]
      found.append((m.group(2), shapes, line.strip()))
  return found


HLO_CASES = [CASES[2], CASES[5], Case("linear", "mean", eps=0.1, chunk=3)]


@pytest.mark.parametrize("case", HLO_CASES, ids=lambda c: c.id)
def test_hlo_only_per_row_collectives(case, class_mesh):
  """The compiled shard_map step: every collective is an all-reduce of (rows,) vectors or
  scalars (the linear head's gradients w.r.t. kernel and bias only: with hidden's, JAX adds
  the (rows, H) sum of its shares, Megatron's column-parallel one)."""
  if case.loss == "linear":
    _, objective, arrays, specs, grad_specs, _ = _setup(case)

    def body(*args):  # kernel and bias only
      return jax.value_and_grad(objective, argnums=(1, 2))(*args)
    f = jax.jit(jax.shard_map(body, mesh=class_mesh(case.mesh), in_specs=tuple(specs),
                              out_specs=(P(), grad_specs[1:])))
  else:  # the program of test_grad_inside_shard_map_equals_float64_reference
    f, arrays = _inside(case, class_mesh(case.mesh))
  text = f.lower(*arrays).compile().as_text()
  found = _collectives(text)
  assert found, "no collective at all: the classes were not split"
  rows = N // 2 if case.mesh == "dv" else N
  row_sizes = {rows} | ({case.chunk * -(-rows // case.chunk)} if case.chunk else set())
  for kind, shapes, line in found:
    assert kind == "all-reduce", line[:300]
    for shape in shapes:
      s = tuple(x for x in shape if x != 1)
      assert s == () or (len(s) == 1 and s[0] in row_sizes), line[:300]


def _while_bodies_and_owner(text):
  """(names of while-loop body computations, {line: computation it is in})."""
  bodies = set(re.findall(r"\bbody=%?([\w.\-]+)", text))
  owner, current = {}, None
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if m:
      current = m.group(1)
    owner[line.strip()] = current
  return bodies, owner


def test_hlo_linear_hidden_gradient_summed_once_after_the_loop(class_mesh):
  """With hidden's gradient and several vocabulary tiles per member (256 local columns in
  blocks of 128), the members' shares of it are summed by one (N, H) all-reduce outside the
  tile loop, not one per tile."""
  rng = np.random.default_rng(3)
  h, k = rng.normal(size=(N, 1024)), rng.normal(size=(1024, 1024)) / 32
  t = rng.integers(0, 1024, size=N)
  mesh = class_mesh("v")

  def body(h, k):
    return jax.grad(lambda h, k: focal_jax.linear_softmax_focal(
        h, k, t, class_axis_name="v", reduction="mean"), (0, 1))(h, k)

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, "v")),
                            out_specs=(P(), P(None, "v"))))
  text = f.lower(h, k).compile().as_text()
  bodies, owner = _while_bodies_and_owner(text)
  assert bodies, "no loop: the tile scan is gone"
  wide = [(line, owner[line]) for kind, shapes, line in _collectives(text)
          if any(tuple(x for x in s if x != 1) == (N, 1024) for s in shapes)]
  assert len(wide) == 1, wide
  assert wide[0][1] not in bodies, wide[0]


def test_hlo_check_can_fail(class_mesh):
  """The same parser sees the gathered logits of a loss that replicates them first."""
  mesh = class_mesh("v")

  def body(z):
    full = lax.all_gather(z, "v", axis=1, tiled=True)
    return focal_jax.softmax_focal(full, np.ones(N, int), reduction="mean")[None]

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(None, "v"), out_specs=P("v")))
  text = f.lower(_data()["z"]).compile().as_text()
  assert any(kind == "all-gather" and (N, C) in shapes for kind, shapes, _ in _collectives(text))


# ---------------------------------------------------------------------------- errors


def _trace(mesh, fn, *args, in_specs=None, **kw):
  f = jax.shard_map(lambda *a: fn(*a, **kw), mesh=mesh,
                    in_specs=in_specs or (P(None, "v"), P()), out_specs=P())
  return jax.eval_shape(f, *args)


def test_errors_at_trace_time(class_mesh):
  mesh = class_mesh("v")
  d = _data()
  z, t = d["z"], np.where(d["t"] < 0, 0, d["t"])
  with pytest.raises(ValueError, match=r"softmax_focal: the class count C must be divisible "
                     r"by the size 4 of class_axis_name 'v'.*got C = 10"):
    _trace(mesh, focal_jax.softmax_focal, z, t, class_axis_name="v", alpha=np.ones(10))
  with pytest.raises(ValueError, match=r"softmax_focal: gamma must be a scalar or the whole "
                     r"\(12,\) class vector \(3 classes of logits on each of the 4 members "
                     r"of class_axis_name 'v'\), got shape \(8,\)"):
    _trace(mesh, focal_jax.softmax_focal, z, t, class_axis_name="v", gamma=np.ones(8))
  with pytest.raises(ValueError, match=r"categorical_focal: the class count C must be "
                     r"divisible by the size 4 of class_axis_name 'v'"):
    _trace(mesh, focal_jax.categorical_focal, z, d["soft"], class_axis_name="v",
           in_specs=(P(None, "v"), P(None, "v")), alpha=np.ones(6))
  with pytest.raises(ValueError, match=r"linear_softmax_focal: the class count C must be "
                     r"divisible by the size 4 of class_axis_name 'v'.*got C = 18"):
    _trace(mesh, lambda k, h: focal_jax.linear_softmax_focal(h, k, t, class_axis_name="v",
                                                       gamma=np.ones(18)), d["k"], d["h"])
  with pytest.raises(ValueError, match=r"softmax_focal: class_axis_name must be a named axis "
                     r"bound here .*got 'model'"):
    _trace(mesh, focal_jax.softmax_focal, z, t, class_axis_name="model")
  with pytest.raises(ValueError, match=r"softmax_focal: class_axis_name and axis_name must "
                     r"name different axes .*got 'v' in both"):
    _trace(mesh, focal_jax.softmax_focal, z, t, class_axis_name="v", axis_name="v",
           reduction="mean")
