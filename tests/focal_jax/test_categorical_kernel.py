"""categorical_focal's gradient kernels (`focal_jax._categorical_kernel`): the TPU (Mosaic) and
the GPU (Triton) one, run on the CPU in Pallas' interpret mode.

On TPU the logits' gradient of `_focal_rows` is a Pallas kernel that sits in the transpose
position of the primitive `row_dot_grad` (its transpose `ct_times_grad` writes
`ct * dloss/dz` from one read of the logits and targets). Here the kernel path is forced on
the CPU (`CategoricalOptions(kernel="tpu-interpret")`, and `lax.platform_dependent` taking its
default branch, the TPU program's form) and checked against float64 references: the
textbook formula's autodiff at moderate margins, and a NumPy closed form of docs/math.md's
gradient (log space) up to margins of 1e4. Both kernel orientations (row-major blocks, and
column-major blocks of the transposed view, which TPU's layout of e.g. (2048, 30522) needs)
and several chunks per row are exercised.

The GPU kernel (the second half) is forced the same way (`kernel="gpu-interpret"`), with one
and several chunks per row, one and several rows per program and a partial last program. A
reduced loss without sample weights takes `total_dot_grad`, whose transpose hands either
kernel the cotangent as one scalar: those paths are checked for both kernels. The Triton
program itself is only lowered here (no GPU): `focal-bench aot --target h100` compiles it.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import focal_jax
from focal_jax import _categorical
from focal_jax import _categorical_kernel as kernel

# (rows, classes) -> orientation: column-major views (N a multiple of 128, C not), row-major
# ones; one chunk and several chunks with a padded last one.
SHAPES = {(128, 37): 0, (128, 1100): 0, (24, 300): 1, (20, 4500): 1}
TOL = {"float64": (1e-10, 1e-14), "float32": (2e-4, 1e-6), "bfloat16": (3e-2, 2e-3)}


def _force(monkeypatch, kernel: str):
  """categorical_focal with `kernel` ("tpu-interpret", "gpu-interpret") and the accelerators'
  program (lax.platform_dependent's default branch)."""
  monkeypatch.setattr(jax.lax, "platform_dependent",
                      lambda *args, default, **branches: default(*args))
  options = _categorical.CategoricalOptions
  monkeypatch.setattr(_categorical, "CategoricalOptions",
                      lambda **kw: options(**{"kernel": kernel, **kw}))


@pytest.fixture
def forced(monkeypatch):
  """categorical_focal with the TPU kernel path (interpret mode) and the TPU program's form."""
  _force(monkeypatch, "tpu-interpret")


def _data(n, c, seed, extreme=True):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, c)) * 3
  y = rng.dirichlet(np.ones(c) * 0.5, size=n)
  if extreme:
    z[0, :3] = 1.5  # a three-way tie at the max
    z[1, 2] = 40.0  # s -> 1 at the top class
    z[2] = np.arange(c) * -30.0  # s -> 0 at every other class
    z[3, 5] = 1e4  # a margin of 1e4
    z[4] = -z[4]
    z[4, 1] = -1e4  # a logit 1e4 below the others
    z[5, 7] = -np.inf  # a masked class (no target mass there)
    y[5, 7] = 0.0
    y[5] /= y[5].sum()
  return z, y


def _grad_reference(z, y, alpha, gamma, where):
  """d sum(loss) / dz in float64 NumPy, docs/math.md's closed form in log space:
  g_j = s_j W - w_j, w_j = alpha_j y_j (1 - s_j)^gamma_j (1 + gamma_j s_j r_j),
  r_j = -log s_j / (1 - s_j), W = sum_j w_j; 1 - s at the top class is the other classes'
  mass over the total, and W - w_top is summed directly there."""
  z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
  alpha = np.broadcast_to(np.asarray(alpha, np.float64), z.shape)
  gamma = np.broadcast_to(np.asarray(gamma, np.float64), z.shape)
  top = np.argmax(z, axis=-1)
  is_top = np.arange(z.shape[1])[None, :] == top[:, None]
  x = z - z.max(axis=-1, keepdims=True)
  e = np.exp(x)
  rest = np.where(is_top, 0.0, e).sum(axis=-1, keepdims=True)
  log_s = x - np.log1p(rest)
  s = np.exp(log_s)
  one_m_s = np.where(is_top, rest / (1.0 + rest), 1.0 - s)
  with np.errstate(divide="ignore", invalid="ignore"):
    r = np.where(one_m_s > 0, -np.where(s > 0, log_s, 0.0) / one_m_s, 1.0)
  w = alpha * y * one_m_s ** gamma * (1.0 + gamma * s * r)
  w_sum = w.sum(axis=-1, keepdims=True)
  w_rest = np.where(is_top, 0.0, w).sum(axis=-1, keepdims=True)
  g = np.where(is_top, s * w_rest - one_m_s * w, s * w_sum - w)
  return np.where(where[:, None], g, 0.0)


def _step(alpha, gamma, where):
  """jit(value_and_grad) of the summed losses; the value is the per-row losses."""
  def fn(z, y):
    loss = focal_jax.categorical_focal(z, y, alpha=alpha, gamma=gamma, where=where)
    return jnp.sum(loss), loss
  return jax.jit(jax.value_and_grad(fn, has_aux=True))


@pytest.mark.parametrize("gamma, dtype", [
    (0.0, "float64"), (0.5, "float64"), (2.0, "float64"), ("per_class", "float64"),
    (2.0, "float32"), ("per_class", "float32"), (0.5, "bfloat16")])
@pytest.mark.parametrize("shape", list(SHAPES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_values_and_gradients_match_float64(refs, forced, shape, gamma, dtype):
  n, c = shape
  z, y = _data(n, c, seed=n + c)
  rng = np.random.default_rng(c)
  alpha = 0.25
  if gamma == "per_class":
    gamma, alpha = rng.uniform(0.0, 3.0, size=c), rng.uniform(0.1, 1.0, size=c)
    gamma[:4] = [0.0, 0.5, 1.0, 2.0]
  where = np.arange(n) % 7 != 6
  per_class = np.ndim(gamma) > 0
  cdt = np.float64 if dtype == "float64" else np.float32
  uses_kernel = kernel.plan((n, c), np.dtype(jnp.dtype(dtype)), cdt, per_class,
                            interpret=True) is not None
  # Per-class alpha / gamma take the kernel row-major only (a (C, 1) class vector would pad
  # to 128 lanes in VMEM): the column-major shapes keep the XLA form there.
  assert uses_kernel == (not per_class or SHAPES[shape] == 1)
  zq, yq = jnp.asarray(z, dtype), jnp.asarray(y, dtype)
  step = _step(alpha, gamma, where)
  jaxpr = str(jax.make_jaxpr(step)(zq, yq))
  assert ("categorical_focal_ct_times_grad" in jaxpr) == uses_kernel
  (_, value), grad = step(zq, yq)
  # Inputs as the kernel saw them (rounded to dtype), the references in float64.
  z64, y64 = np.asarray(zq, np.float64), np.asarray(yq, np.float64)
  rtol, atol = TOL[dtype]
  # Row 5's -inf logit (no target mass) is a masked class: the reference of the others.
  rows = np.arange(n) != 5
  want = refs.categorical_focal(z64[rows], y64[rows], alpha=alpha, gamma=gamma,
                                where=where[rows])
  np.testing.assert_allclose(np.asarray(value, np.float64)[rows], want, rtol=rtol, atol=atol)
  others = np.arange(c) != 7
  sub = lambda v: v[others] if np.ndim(v) else v
  want5 = refs.categorical_focal(z64[5:6, others], y64[5:6, others], alpha=sub(alpha),
                                 gamma=sub(gamma))
  np.testing.assert_allclose(np.asarray(value, np.float64)[5:6], want5, rtol=rtol)
  want_g = _grad_reference(z64, y64, alpha, gamma, where)
  got_g = np.asarray(grad, np.float64)
  assert got_g.dtype == np.float64 and grad.dtype == jnp.dtype(dtype)
  scale = np.abs(want_g).max()
  np.testing.assert_allclose(got_g, want_g, rtol=rtol, atol=atol + rtol * scale * 1e-2)
  # The textbook formula's autodiff (independent of docs/math.md's log-space rewrite), away
  # from its cancellations (the first six rows), in float64.
  if dtype == "float64":
    keep = np.arange(n) >= 6
    ref = lambda z, y: refs.jnp_categorical_focal_sum(
        z * where[keep, None], y * where[keep, None], jnp.asarray(alpha), jnp.asarray(gamma))
    np.testing.assert_allclose(got_g[keep], jax.grad(ref)(z64[keep], y64[keep]), rtol=1e-10,
                               atol=1e-14)


def test_the_closed_form_reference_fails_a_wrong_gradient(refs):
  # The reference is able to fail: at gamma 2 it differs from the cross-entropy gradient.
  z, y = _data(8, 12, seed=1, extreme=False)
  where = np.ones(8, bool)
  g2 = _grad_reference(z, y, 1.0, 2.0, where)
  g0 = _grad_reference(z, y, 1.0, 0.0, where)
  np.testing.assert_allclose(g0, np.exp(z) / np.exp(z).sum(-1, keepdims=True) - y, rtol=1e-12,
                             atol=1e-15)
  assert np.abs(g2 - g0).max() > 1e-2


@pytest.mark.parametrize("shape", [(3, 5), (128, 3)], ids=["row-major", "column-major"])
def test_hessian_matches_naive_float64_autodiff(refs, forced, shape):
  n, c = shape
  z, y = _data(n, c, seed=5, extreme=False)
  alpha, gamma = 0.7, 1.5
  if shape == (3, 5):
    z[1] = [1.0, 1.0, 0.0, -1.0, 1.0]  # a three-way tie for the largest logit
    alpha, gamma = np.linspace(0.1, 0.9, c), np.array([0.5, 1.0, 2.0, 3.0, 1.5])
  fn = lambda z: focal_jax.categorical_focal(z, y, alpha=alpha, gamma=gamma, reduction="sum")
  ref = lambda z: refs.jnp_categorical_focal_sum(z, y, jnp.asarray(alpha), jnp.asarray(gamma))
  assert "categorical_focal_ct_times_grad" in str(jax.make_jaxpr(jax.grad(fn))(z))
  np.testing.assert_allclose(jax.jit(jax.grad(fn))(z), jax.jit(jax.grad(ref))(z), rtol=1e-11,
                             atol=1e-14)
  np.testing.assert_allclose(jax.jit(jax.hessian(fn))(z), jax.jit(jax.hessian(ref))(z),
                             rtol=1e-9, atol=1e-12)


def test_forward_mode_and_reverse_over_reverse(refs, forced):
  z, y = _data(3, 5, seed=8, extreme=False)
  fn = lambda z: focal_jax.categorical_focal(z, y, gamma=2.0, reduction="sum")
  ref = lambda z: refs.jnp_categorical_focal_sum(z, y, None, jnp.asarray(2.0))
  v = np.random.default_rng(8).normal(size=z.shape)
  np.testing.assert_allclose(jax.jvp(fn, (z,), (v,))[1], jax.jvp(ref, (z,), (v,))[1],
                             rtol=1e-11)
  hvp = lambda f: jax.grad(lambda z: jnp.vdot(jax.grad(f)(z), v))(z)
  np.testing.assert_allclose(hvp(fn), hvp(ref), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(24, 300), (128, 37)], ids=["row-major", "column-major"])
def test_vmap_of_the_gradient(refs, forced, shape):
  n, c = shape
  batch = [_data(n, c, seed=s, extreme=False) for s in range(3)]
  zs, ys = (np.stack(a) for a in zip(*batch))
  where = np.ones(n, bool)
  grad = jax.grad(lambda z, y, g: focal_jax.categorical_focal(z, y, gamma=g, reduction="sum"))
  got = jax.jit(jax.vmap(grad, in_axes=(0, 0, None)))(zs, ys, 2.0)
  for b in range(3):
    np.testing.assert_allclose(got[b], _grad_reference(zs[b], ys[b], 1.0, 2.0, where),
                               rtol=1e-10, atol=1e-14)
  # A batched gamma (the jnp formula under vmap) and unbatched targets.
  gammas = np.array([0.0, 0.5, 2.0])
  got = jax.jit(jax.vmap(grad, in_axes=(0, None, 0)))(zs, ys[0], gammas)
  for b in range(3):
    np.testing.assert_allclose(got[b], _grad_reference(zs[b], ys[0], 1.0, gammas[b], where),
                               rtol=1e-10, atol=1e-14)


def test_shard_map_over_rows(forced):
  # Data parallel: each of 4 devices holds 128 rows (the column-major kernel) and the mean
  # is over all 512. check_vma=False: Pallas' interpret mode cannot run a kernel whose inputs
  # vary over a manual axis (its grid loop's carry changes type); the TPU compile of the
  # kernel under shard_map with check_vma=True is test_tpu_compile_under_shard_map's.
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
  z, y = _data(512, 37, seed=9, extreme=False)

  def loss(z, y):
    return focal_jax.categorical_focal(z, y, gamma=2.0, reduction="mean", axis_name="d")

  step = jax.jit(jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=(P("d"), P("d")),
                               out_specs=P("d"), check_vma=False))
  assert "categorical_focal_ct_times_grad" in str(jax.make_jaxpr(step)(z, y))
  # Each shard's value is 4 * its sum / 512 (axis_name: pmean over the shards gives the
  # whole batch's mean), so is its gradient.
  want = _grad_reference(z, y, 1.0, 2.0, np.ones(512, bool)) * 4 / 512
  np.testing.assert_allclose(step(z, y), want, rtol=1e-10, atol=1e-16)


def test_the_kernel_ignores_rows_and_classes_outside_the_array():
  # ct * gradient of the kernel itself: a masked row and a NaN row stay in their rows, the
  # padding of the last chunk and of the last block of rows adds nothing.
  n, c = 20, 2100  # row-major: 3 blocks of 8 rows (the last one partial), 2 chunks of 2048
  z, y = _data(n, c, seed=3, extreme=False)
  z[7, 9] = np.nan
  valid = np.arange(n) != 4
  ct = np.linspace(-1.0, 2.0, n)
  got = kernel.kernel_ct_times_grad(
      jnp.asarray(ct)[:, None], jnp.asarray(z), jnp.asarray(y), jnp.asarray(0.5),
      jnp.asarray(2.0), jnp.asarray(valid)[:, None], interpret=True)
  want = ct[:, None] * _grad_reference(z, y, 0.5, 2.0, valid)
  ok = np.arange(n) != 7
  np.testing.assert_allclose(np.asarray(got)[ok], want[ok], rtol=1e-10, atol=1e-15)
  assert np.all(np.isnan(np.asarray(got)[7]))
  assert np.all(np.asarray(got)[4] == 0.0)


def test_layout_rule_and_plans():
  # TPU's default layouts of entry parameters (libtpu 0.0.42.1): column-major where that
  # pads less.
  for shape in [(2048, 30522), (4096, 1000), (2048, 1000), (16384, 91)]:
    assert kernel.column_major(*shape), shape
  for shape in [(2000, 30522), (2048, 32000), (2048, 128256), (1000, 2048)]:
    assert not kernel.column_major(*shape), shape
  f32 = np.dtype(np.float32)
  p = kernel.plan((2048, 30522), f32, f32, per_class=False)
  assert (p.ax, p.rows, p.chunk, p.padded) == (0, 128, 512, 30720)
  p = kernel.plan((2048, 128256), np.dtype(jnp.bfloat16), f32, per_class=True)
  assert (p.ax, p.rows, p.chunk) == (1, 16, 2048) and p.vmem <= kernel.vmem_cap()
  # No kernel: not 2-D, float64 on TPU, per-class vectors column-major, a block over VMEM.
  assert kernel.plan((4, 2048, 1000), f32, f32, per_class=False) is None
  assert kernel.plan((2048, 1000), np.dtype(np.float64), np.float64, per_class=False) is None
  assert kernel.plan((2048, 30522), f32, f32, per_class=True) is None
  assert kernel.plan((4096, 128001), f32, f32, per_class=False) is None  # 128 rows: 394 MB


def test_plans_follow_the_chips_vmem(monkeypatch):
  # A TPU with 64 MiB (v5p, 7) or 16 MiB (v4) of VMEM per core: (2048, 30522) float32 (about
  # 100 MB of blocks) keeps the XLA form, bfloat16 fits in 64 MiB; without a TPU device, a
  # v5e's 128 MiB.
  f32, bf16 = np.dtype(np.float32), np.dtype(jnp.bfloat16)
  assert kernel.vmem_cap() == (128 << 20) - kernel._VMEM_MARGIN
  info = lambda mib: type("Info", (), {"vmem_capacity_bytes": mib << 20})()
  monkeypatch.setattr(kernel.pltpu, "get_tpu_info", lambda: info(64))
  assert kernel.plan((2048, 30522), f32, f32, per_class=False) is None
  assert kernel.plan((2048, 30522), bf16, f32, per_class=False).vmem <= (64 - 8) << 20
  monkeypatch.setattr(kernel.pltpu, "get_tpu_info", lambda: info(16))
  assert kernel.plan((2048, 30522), bf16, f32, per_class=False) is None
  assert kernel.plan((4096, 1000), f32, f32, per_class=False) is None


def test_environment_variable_keeps_the_kernel_out(monkeypatch):
  # FOCAL_JAX_TPU_KERNEL=0: the TPU program without the kernel (XLA's fusions), read at trace.
  fn = lambda z, y: focal_jax.categorical_focal(z, y, gamma=2.0, reduction="mean")
  a = jax.ShapeDtypeStruct((256, 37), jnp.float32)
  monkeypatch.setenv(_categorical.TPU_KERNEL_ENV, "0")
  traced = jax.jit(jax.grad(fn)).trace(a, a)
  assert "tpu_custom_call" not in traced.lower(lowering_platforms=("tpu",)).as_text()
  monkeypatch.setenv(_categorical.TPU_KERNEL_ENV, "1")
  traced = jax.jit(jax.grad(lambda z, y: fn(z, y) * 1.0)).trace(a, a)
  assert "tpu_custom_call" in traced.lower(lowering_platforms=("tpu",)).as_text()


def test_other_platforms_keep_their_program():
  # Off TPU the kernel is not in the lowered program (lax.platform_dependent keeps the CPU
  # and default branches there); for TPU it is.
  fn = lambda z, y: focal_jax.categorical_focal(z, y, gamma=2.0, reduction="mean")
  a = jax.ShapeDtypeStruct((256, 37), jnp.float32)
  traced = jax.jit(jax.grad(fn)).trace(a, a)
  for platform in ("cpu", "cuda"):
    assert "tpu_custom_call" not in traced.lower(lowering_platforms=(platform,)).as_text()
  assert "tpu_custom_call" in traced.lower(lowering_platforms=("tpu",)).as_text()


def test_options_kernel_off_takes_no_kernel(monkeypatch):
  monkeypatch.setattr(jax.lax, "platform_dependent",
                      lambda *args, default, **branches: default(*args))
  options = dataclasses.replace(_categorical.CategoricalOptions(), kernel="off")
  z, y = _data(128, 37, seed=2, extreme=False)
  fn = lambda z: jnp.sum(_categorical._focal_rows(z, y, jnp.asarray(1.0), jnp.asarray(2.0),
                                                  jnp.ones(128, bool), options))
  assert "categorical_focal_ct_times_grad" not in str(jax.make_jaxpr(jax.grad(fn))(z))


_TPU_SCRIPT = """
import json, sys
import numpy as np, jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import focal_jax
from focal_bench import aot
topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
out = {}
for devices, (n, c) in [(1, (2048, 30522)), (4, (256, 1000))]:
  mesh = Mesh(np.array(topo.devices[:devices]), ("d",))
  s = NamedSharding(mesh, P("d"))
  def loss(z, y, axis_name=None if devices == 1 else "d"):
    return focal_jax.categorical_focal(z, y, gamma=2.0, reduction="mean", axis_name=axis_name)
  grad = jax.grad(loss)
  if devices > 1:
    grad = jax.shard_map(grad, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d"))
  a = jax.ShapeDtypeStruct((n, c), jnp.float32, sharding=s)
  compiled = jax.jit(grad).lower(a, a).compile()
  hlo = compiled.as_text()
  out[devices] = [hlo.count('custom_call_target="tpu_custom_call"'),
                  aot.hbm_bytes(hlo) / (n // devices * c * 4)]
# A TPU v4 (16 MiB of VMEM): the (2048, 30522) bfloat16 blocks do not fit; the lowering takes
# the jnp formula (the XLA form's three passes).
topo = topologies.get_topology_desc(platform="tpu", topology_name="v4:2x2x1")
s = NamedSharding(Mesh(np.array(topo.devices[:1]), ("d",)), P())
a = jax.ShapeDtypeStruct((2048, 30522), jnp.bfloat16, sharding=s)
hlo = jax.jit(jax.grad(lambda z, y: focal_jax.categorical_focal(z, y, reduction="mean"))).lower(
    a, a).compile().as_text()
out["v4"] = [hlo.count('custom_call_target="tpu_custom_call"'),
             aot.hbm_bytes(hlo) / (2048 * 30522 * 2)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("x64", [False, True])
def test_tpu_compile_under_shard_map(x64):
  # The kernel compiled for a TPU v5e (no TPU needed; a subprocess loads libtpu, as
  # focal-bench aot does), alone and in a shard_map step with check_vma=True (64 rows of
  # 1000 classes per device): one kernel, the logits and targets read once and the gradient
  # written once (3x the logits of each device, plus the per-row vectors). For a TPU v4 the
  # blocks do not fit its VMEM: the XLA form's 6x, no kernel. With jax_enable_x64 too: a
  # 64-bit value in the kernel (a Python int loop carry) aborted the TPU compiler.
  pytest.importorskip("libtpu", reason="jax[tpu] (the tpu extra) is not installed")
  import json
  import subprocess
  import sys
  from focal_bench import aot
  env = {k: v for k, v in aot.worker_env().items() if k != "JAX_ENABLE_X64"}
  if x64:
    env["JAX_ENABLE_X64"] = "1"
  proc = subprocess.run([sys.executable, "-c", _TPU_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  calls, hbm_x = got.pop("v4")
  assert calls == 0 and hbm_x == pytest.approx(6.0, rel=1e-3), (calls, hbm_x)
  for devices, (calls, hbm_x) in got.items():
    assert calls == 1, (devices, calls)
    assert 2.999 <= hbm_x <= 3.0 * 1.03, (devices, hbm_x)


# --- the GPU kernel (Pallas Triton), and the scalar cotangent of both kernels ------------

# (rows, classes): 3 chunks of 2048 at one row a program; one chunk at 2 rows a program with
# a partial last program (1539 rows); one chunk of 128 (91 classes, padding masked).
GPU_SHAPES = [(20, 4500), (1539, 7), (40, 91)]


@pytest.fixture(params=["gpu-interpret", "tpu-interpret"])
def forced_any(request, monkeypatch):
  _force(monkeypatch, request.param)


@pytest.fixture
def forced_gpu(monkeypatch):
  _force(monkeypatch, "gpu-interpret")


def _hyper(c, per_class):
  if not per_class:
    return 0.25, 2.0
  rng = np.random.default_rng(c)
  gamma, alpha = rng.uniform(0.0, 3.0, size=c), rng.uniform(0.1, 1.0, size=c)
  gamma[:4] = [0.0, 0.5, 1.0, 2.0][:c]
  return alpha, gamma


def test_gpu_plans():
  f32 = np.float32
  assert kernel.gpu_plan((2048, 30522), f32) == kernel.GpuPlan(1, 2048, 15, 8)
  assert kernel.gpu_plan((16384, 91), f32) == kernel.GpuPlan(16, 128, 1, 8)
  assert kernel.gpu_plan((65536, 2), f32) == kernel.GpuPlan(128, 2, 1, 4)
  assert kernel.gpu_plan((1539, 7), f32) == kernel.GpuPlan(2, 8, 1, 4)
  # No kernel: not 2-D, empty, float64 compiled (interpret mode takes it), 2^31 entries.
  assert kernel.gpu_plan((4, 2048, 1000), f32) is None
  assert kernel.gpu_plan((0, 10), f32) is None
  assert kernel.gpu_plan((2048, 1000), np.float64) is None
  assert kernel.gpu_plan((2048, 1000), np.float64, interpret=True) is not None
  assert kernel.gpu_plan((2**16, 2**15), f32) is None


@pytest.mark.parametrize("dtype, per_class", [
    ("float64", True), ("float32", False), ("bfloat16", False)])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_values_and_gradients_match_float64(refs, forced_gpu, shape, per_class, dtype):
  n, c = shape
  z, y = _data(n, c, seed=n + c, extreme=c > 8)
  alpha, gamma = _hyper(c, per_class)
  where = np.arange(n) % 7 != 6

  def fn(z, y):
    loss = focal_jax.categorical_focal(z, y, alpha=alpha, gamma=gamma, where=where)
    return jnp.sum(loss), loss

  zq, yq = jnp.asarray(z, dtype), jnp.asarray(y, dtype)
  step = jax.jit(jax.value_and_grad(fn, has_aux=True))
  assert "categorical_focal_ct_times_grad" in str(jax.make_jaxpr(step)(zq, yq))
  (_, value), grad = step(zq, yq)
  z64, y64 = np.asarray(zq, np.float64), np.asarray(yq, np.float64)
  rtol, atol = TOL[dtype]
  rows = np.arange(n) != 5  # row 5's -inf logit: a masked class (test_categorical_kernel)
  if c <= 8:
    rows[:] = True
  want = refs.categorical_focal(z64[rows], y64[rows], alpha=alpha, gamma=gamma,
                                where=where[rows])
  np.testing.assert_allclose(np.asarray(value, np.float64)[rows], want, rtol=rtol, atol=atol)
  want_g = _grad_reference(z64, y64, alpha, gamma, where)
  assert grad.dtype == jnp.dtype(dtype)
  scale = np.abs(want_g).max()
  np.testing.assert_allclose(np.asarray(grad, np.float64), want_g, rtol=rtol,
                             atol=atol + rtol * scale * 1e-2)


@pytest.mark.parametrize("reduction, masked, weighted", [
    ("sum", False, False), ("mean", False, False), ("mean", True, False),
    ("mean_positive", True, False), ("mean_positive", False, True), ("sum", True, True)],
    ids=lambda v: {False: "-", True: "+"}.get(v, v) if isinstance(v, bool) else v)
def test_reductions_match_float64(refs, forced_any, reduction, masked, weighted):
  # A reduction without sample weights takes `_kernel_total` (the kernel gets a scalar
  # cotangent; without `where` no mask either); with them, the per-row cotangent.
  n, c = 40, 91
  z, y = _data(n, c, seed=11, extreme=False)
  y[::3] = np.eye(c)[0]  # background rows (argmax 0) for mean_positive
  where = np.arange(n) % 5 != 4 if masked else None
  weight = np.linspace(0.5, 2.0, n) if weighted else None
  kw = dict(alpha=0.5, gamma=2.0, reduction=reduction, where=where, sample_weight=weight)
  fn = lambda z: focal_jax.categorical_focal(z, y, **kw)
  jvp = str(jax.make_jaxpr(lambda z, v: jax.jvp(fn, (z,), (v,)))(z, z))
  assert ("categorical_focal_total_dot_grad" in jvp) == (not weighted)
  assert "categorical_focal_ct_times_grad" in str(jax.make_jaxpr(jax.grad(fn))(z))
  value, grad = jax.jit(jax.value_and_grad(fn))(z)
  np.testing.assert_allclose(value, refs.categorical_focal(z, y, **kw), rtol=1e-12)
  valid = np.ones(n, bool) if where is None else where
  g = _grad_reference(z, y, 0.5, 2.0, valid) * (1.0 if weight is None else weight[:, None])
  if reduction == "mean":
    g = g / valid.sum()
  elif reduction == "mean_positive":
    g = g / (valid & (np.argmax(y, axis=-1) != 0)).sum()
  np.testing.assert_allclose(grad, g, rtol=1e-10, atol=1e-16)


def test_gpu_hessian_and_forward_mode(refs, forced_gpu):
  z, y = _data(6, 5, seed=5, extreme=False)
  z[1] = [1.0, 1.0, 0.0, -1.0, 1.0]  # a three-way tie for the largest logit
  alpha, gamma = np.linspace(0.1, 0.9, 5), np.array([0.5, 1.0, 2.0, 3.0, 1.5])
  for reduction in ("sum", "mean"):
    fn = lambda z: focal_jax.categorical_focal(z, y, alpha=alpha, gamma=gamma,
                                               reduction=reduction)
    scale = 1.0 if reduction == "sum" else 1.0 / 6
    ref = lambda z: scale * refs.jnp_categorical_focal_sum(z, y, jnp.asarray(alpha),
                                                           jnp.asarray(gamma))
    np.testing.assert_allclose(jax.jit(jax.grad(fn))(z), jax.jit(jax.grad(ref))(z),
                               rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(jax.jit(jax.hessian(fn))(z), jax.jit(jax.hessian(ref))(z),
                               rtol=1e-9, atol=1e-12)
    v = np.random.default_rng(8).normal(size=z.shape)
    np.testing.assert_allclose(jax.jvp(fn, (z,), (v,))[1], jax.jvp(ref, (z,), (v,))[1],
                               rtol=1e-11)


def test_vmap_of_a_reduced_gradient(forced_any):
  # A batch of reduced losses: the scalar cotangents (one per member) spread over each
  # member's rows; the totals under vmap sum each member's rows.
  n, c = 24, 300
  batch = [_data(n, c, seed=s, extreme=False) for s in range(3)]
  zs, ys = (np.stack(a) for a in zip(*batch))
  fn = lambda z, y: focal_jax.categorical_focal(z, y, gamma=2.0, reduction="mean")
  got = jax.jit(jax.vmap(jax.grad(fn)))(zs, ys)
  for b in range(3):
    want = _grad_reference(zs[b], ys[b], 1.0, 2.0, np.ones(n, bool)) / n
    np.testing.assert_allclose(got[b], want, rtol=1e-10, atol=1e-16)
  v = np.random.default_rng(1).normal(size=zs.shape)
  tangents = jax.vmap(lambda z, y, v: jax.jvp(lambda z: fn(z, y), (z,), (v,))[1])(zs, ys, v)
  for b in range(3):
    want = np.sum(_grad_reference(zs[b], ys[b], 1.0, 2.0, np.ones(n, bool)) / n * v[b])
    np.testing.assert_allclose(tangents[b], want, rtol=1e-10)


def test_gpu_shard_map_over_rows(forced_gpu):
  # Data parallel over 4 devices: each member's kernel takes a scalar cotangent (its share of
  # the global mean). check_vma=False as in test_categorical_kernel (interpret mode).
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
  z, y = _data(512, 37, seed=9, extreme=False)
  loss = lambda z, y: focal_jax.categorical_focal(z, y, gamma=2.0, reduction="mean",
                                                  axis_name="d")
  step = jax.jit(jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=(P("d"), P("d")),
                               out_specs=P("d"), check_vma=False))
  assert "categorical_focal_ct_times_grad" in str(jax.make_jaxpr(step)(z, y))
  want = _grad_reference(z, y, 1.0, 2.0, np.ones(512, bool)) * 4 / 512
  np.testing.assert_allclose(step(z, y), want, rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize("scalar_ct", [False, True], ids=["row_ct", "scalar_ct"])
@pytest.mark.parametrize("shape", [(20, 2100), (1539, 7)], ids=["chunks", "rows"])
def test_the_gpu_kernel_ignores_rows_and_classes_outside_the_array(shape, scalar_ct):
  # ct * gradient of the kernel itself: a masked row and a NaN row stay in their rows, the
  # padding of the last chunk and of the last program's rows adds nothing.
  n, c = shape
  z, y = _data(n, c, seed=3, extreme=False)
  z[7, 5] = np.nan
  valid = np.arange(n) != 4
  ct = np.float64(0.75) if scalar_ct else np.linspace(-1.0, 2.0, n)[:, None]
  got = kernel.gpu_kernel_ct_times_grad(
      jnp.asarray(ct), jnp.asarray(z), jnp.asarray(y), jnp.asarray(0.5), jnp.asarray(2.0),
      jnp.asarray(valid)[:, None], interpret=True)
  want = ct * _grad_reference(z, y, 0.5, 2.0, valid)
  ok = np.arange(n) != 7
  np.testing.assert_allclose(np.asarray(got)[ok], want[ok], rtol=1e-10, atol=1e-15)
  assert np.all(np.isnan(np.asarray(got)[7]))
  assert np.all(np.asarray(got)[4] == 0.0)
  # Unmasked (no `where`): the mask is not read, every row counts.
  got = kernel.gpu_kernel_ct_times_grad(
      jnp.asarray(ct), jnp.asarray(z), jnp.asarray(y), jnp.asarray(0.5), jnp.asarray(2.0),
      jnp.asarray(valid)[:, None], interpret=True, masked=False)
  want = ct * _grad_reference(z, y, 0.5, 2.0, np.ones(n, bool))
  np.testing.assert_allclose(np.asarray(got)[ok], want[ok], rtol=1e-10, atol=1e-15)


def _custom_calls(text: str, target: str) -> list[str]:
  """The operand and result types of each `target` custom call in a lowered module."""
  return re.findall(r"custom_call @" + re.escape(target) + r"\(.*?: \((.*?)\) -> ", text)


def test_the_cuda_program_takes_the_triton_kernel(monkeypatch):
  # For CUDA the gradient is the Triton kernel; under a mean without `where` it reads the
  # logits, the targets and three scalars (alpha, gamma, the cotangent): no per-row vector.
  a = jax.ShapeDtypeStruct((256, 37), jnp.float32)
  mean = lambda z, y: focal_jax.categorical_focal(z, y, gamma=2.0, reduction="mean")
  rows = lambda z, y: jnp.sum(focal_jax.categorical_focal(z, y, gamma=2.0,
                                                          where=jnp.arange(256) > 3))
  lower = lambda fn, platform: jax.jit(jax.grad(fn)).trace(a, a).lower(
      lowering_platforms=(platform,)).as_text()
  triton = "__gpu$xla.gpu.triton"
  assert _custom_calls(lower(mean, "cuda"), triton) == [
      "tensor<3xf32>, tensor<256x37xf32>, tensor<256x37xf32>"]
  # Per-row losses with a mask: the per-row cotangent and the mask.
  assert _custom_calls(lower(rows, "cuda"), triton) == [
      "tensor<2xf32>, tensor<256x37xf32>, tensor<256x37xf32>, tensor<256x1xf32>, "
      "tensor<256x1xi1>"]
  # The TPU kernel takes the same scalar cotangent.
  tpu = _custom_calls(lower(mean, "tpu"), "tpu_custom_call")
  assert len(tpu) == 1 and tpu[0].startswith("tensor<3xf32>, ") and tpu[0].count(",") == 2
  for platform in ("cpu", "tpu"):
    assert triton not in lower(mean, platform)
  monkeypatch.setenv(_categorical.GPU_KERNEL_ENV, "0")
  assert triton not in lower(lambda z, y: mean(z, y) * 1.0, "cuda")
