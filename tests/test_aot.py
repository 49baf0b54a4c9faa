"""The jit(grad) step compiled for a TPU v5e (no TPU needed): HBM bytes and temporaries held to
budgets at issue 11's shapes, plus the ratios and verdicts of ``focal-bench aot``.

The compiled figures are deterministic for a given jax / libtpu (pinned by the ``tpu`` extra), so
a change of the library that adds a pass over the logits, or a logits-sized temporary, fails
here. Budgets are in units of the logits' size. Where today's code meets issue 11's target the
budget IS the target; where it misses, the budget is today's measured value plus 2 % (a
regression guard), commented with the target it misses: tighten it when the library gets there.
The compiles run in a subprocess (``python -m focal_bench.aot --worker``) with JAX on the CPU,
as ``focal-bench aot`` runs them; this process never loads libtpu.
"""

import pytest

from focal_bench import aot

# (loss, N, C, dtype) -> (bytes accessed / logits, temporaries / logits): at most.
# Measured with jax 0.10.2, libtpu 0.0.42.1 at 24477e5 (BENCHMARKS.md, "Accelerators, compiled
# without a device").
TPU_BUDGETS = {
    # Measured 3.001x: the target, 1.5x the 2x floor plus the per-row vectors (labels, loss,
    # row statistics: aot.ROW_SLACK, 2 %), held. Temporaries: target held.
    ("softmax", 2048, 30522, "float32"): (3.0 * aot.ROW_SLACK, aot.TEMP_LIMIT),
    # Measured 3.002x, no temporaries (the bf16 logits are converted inside the fusions): bytes
    # as float32 above; temporaries: target held.
    ("softmax", 2048, 30522, "bfloat16"): (3.0 * aot.ROW_SLACK, aot.TEMP_LIMIT),
    # At its floor (3x): the target.
    ("sigmoid", 2048, 30522, "bfloat16"): (3.0 * aot.SIGMOID_FACTOR, aot.TEMP_LIMIT),
    # Measured 7.62x: the target 10.72x (1.25x optax's 8.57x) held. Temporaries: held.
    ("softmax", 16384, 91, "float32"): (10.72, aot.TEMP_LIMIT),
    # Measured 17.52x at b26be13: optax 14.01x, so a hair over the target 17.51x (1.25x optax);
    # today's value + 2 %. Was 600x before the one-pass row statistics. Temporaries: held.
    ("softmax", 65536, 2, "float32"): (17.87, aot.TEMP_LIMIT),
}
# Sigmoid at its measured floor (the program `z * y` at the same shape: one read of each
# input, one write), plus the per-row slack: aot.SIGMOID_FACTOR. At (16384, 91) TPU's (8, 128)
# tiles store 96 rows of the minor dimension for 91 (the layout is {0,1}), so the floor itself
# is 3 * 96 / 91 = 3.16x, and so was the sigmoid step (BENCHMARKS.md).
TPU_SIGMOID_AT_FLOOR = [("sigmoid", 16384, 91, "float32"), ("sigmoid", 2048, 30522, "bfloat16")]
# HBM traffic read from the optimized program's layouts (aot.hbm_bytes), where XLA's bytes
# accessed also count the on-chip copies a step prefetches: key -> the most it may be, in
# units of the logits, or ("optax", factor) for factor x optax's HBM traffic at that shape.
TPU_HBM_BUDGETS = {
    # The Pallas gradient kernel (focal_jax._categorical_kernel; a custom call, which XLA's
    # bytes accessed counts as nothing): HBM 3.0006x at (2048, 30522) float32 and bfloat16
    # (was 6.00x with three row passes of XLA fusions), 3.0000x at (2048, 128256) (6.00x),
    # 3.0000x at (4096, 1000) (5.00x): at the 3x floor plus the per-row vectors, under the
    # target 4.5x. Temporaries: none.
    ("categorical", 2048, 30522, "float32"): 3.0 * aot.ROW_SLACK,
    ("categorical", 2048, 30522, "bfloat16"): 3.0 * aot.ROW_SLACK,
    ("categorical", 2048, 128256, "bfloat16"): 3.0 * aot.ROW_SLACK,
    ("categorical", 4096, 1000, "float32"): 3.0 * aot.ROW_SLACK,
    # bytes accessed 7.02x (the 16 MB of logits prefetched on chip); HBM 3.00x: the target
    # 1.5x the 2x floor + per-row held.
    ("softmax", 4096, 1000, "float32"): 2.0 * aot.FLOOR_FACTOR * aot.ROW_SLACK,
    # bytes accessed 17.52x / 28.04x; HBM 3.0x / 4.0x against optax's 2.5x / 4.0x: the target
    # 1.25x optax held.
    ("softmax", 65536, 2, "float32"): ("optax", aot.OPTAX_FACTOR),
    ("softmax", 65536, 2, "bfloat16"): ("optax", aot.OPTAX_FACTOR),
}


@pytest.fixture(scope="module")
def tpu_records():
  pytest.importorskip("libtpu", reason="jax[tpu] (the tpu extra) is not installed")
  keys = {**TPU_BUDGETS, **dict.fromkeys(TPU_SIGMOID_AT_FLOOR), **TPU_HBM_BUDGETS}
  cases = [aot.Case(loss, "focal", n, c, dtype) for loss, n, c, dtype in keys]
  cases += [aot.Case("optax_int", "optax", n, c, dtype) for _, n, c, dtype in TPU_HBM_BUDGETS]
  header, records = aot.run_worker("tpu", aot.with_floors(cases), timeout_s=1200)
  assert header["device"]["device_kind"].startswith("TPU v5")
  return {(r["case"]["loss"], r["case"]["n"], r["case"]["c"], r["case"]["dtype"]): r
          for r in records}


@pytest.mark.parametrize("key", list(TPU_HBM_BUDGETS),
                         ids=lambda k: f"{k[0]}-{k[1]}x{k[2]}-{k[3]}")
def test_tpu_v5e_hbm_traffic_within_budget(tpu_records, key):
  rec = tpu_records[key]
  assert "error" not in rec, rec.get("error")
  budget = TPU_HBM_BUDGETS[key]
  if isinstance(budget, tuple):
    peer = tpu_records[("optax_int",) + key[1:]]
    budget = budget[1] * peer["hbm_bytes"] / peer["logits_bytes"]
  hbm_x = rec["hbm_bytes"] / rec["logits_bytes"]
  assert hbm_x <= budget, f"{key}: HBM {hbm_x:.3f}x the logits, budget {budget:.3f}x"
  assert hbm_x >= aot.floor_x(key[0]) * 0.999  # reads the logits, writes the gradient
  assert rec["temp_bytes"] / rec["logits_bytes"] <= aot.TEMP_LIMIT


def test_tpu_v5e_hbm_traffic_equals_bytes_accessed_where_nothing_is_prefetched(tpu_records):
  # At (2048, 30522) the step streams the logits from HBM (no on-chip copy): the count from
  # the layouts must agree with XLA's own cost analysis.
  for key in [("softmax", 2048, 30522, "float32"), ("sigmoid", 2048, 30522, "bfloat16"),
              ("floor3", 16384, 91, "float32")]:
    rec = tpu_records[key]
    assert rec["hbm_bytes"] == pytest.approx(rec["bytes_accessed"], rel=2e-3), key


@pytest.mark.parametrize("key", TPU_SIGMOID_AT_FLOOR, ids=lambda k: f"{k[0]}-{k[1]}x{k[2]}-{k[3]}")
def test_tpu_v5e_sigmoid_step_at_its_measured_floor(tpu_records, key):
  rec, floor = tpu_records[key], tpu_records[("floor3",) + key[1:]]
  assert "error" not in rec and "error" not in floor, (rec.get("error"), floor.get("error"))
  bytes_x = rec["bytes_accessed"] / rec["logits_bytes"]
  floor_x = floor["bytes_accessed"] / floor["logits_bytes"]
  # The floor program pays the tiled layout's padding of the minor dimension to 8 or 128.
  n, c = key[1:3]
  assert floor_x == pytest.approx(3 * (-(-c // 8) * 8) / c, rel=1e-3) or floor_x == (
      pytest.approx(3 * (-(-c // 128) * 128) / c, rel=1e-3)), floor_x
  assert bytes_x <= floor_x * aot.SIGMOID_FACTOR, (f"{key}: {bytes_x:.3f}x the logits, floor "
                                                   f"{floor_x:.3f}x; {rec['big_buffers']}")
  assert rec["temp_bytes"] / rec["logits_bytes"] <= aot.TEMP_LIMIT


@pytest.mark.parametrize("key", list(TPU_BUDGETS), ids=lambda k: f"{k[0]}-{k[1]}x{k[2]}-{k[3]}")
def test_tpu_v5e_bytes_and_temporaries_within_budget(tpu_records, key):
  rec = tpu_records[key]
  assert "error" not in rec, rec.get("error")
  max_bytes, max_temp = TPU_BUDGETS[key]
  bytes_x = rec["bytes_accessed"] / rec["logits_bytes"]
  temp_x = rec["temp_bytes"] / rec["logits_bytes"]
  assert bytes_x <= max_bytes, (f"{key}: {bytes_x:.3f}x the logits accessed, budget "
                                f"{max_bytes}x; logits-sized buffers: {rec['big_buffers']}")
  assert temp_x <= max_temp, (f"{key}: temporaries {temp_x:.3f}x the logits, budget "
                              f"{max_temp}x; logits-sized buffers: {rec['big_buffers']}")
  # A step cannot read less than the logits and write less than the gradient.
  assert bytes_x >= aot.floor_x(key[0]) * 0.999


# --- the report's arithmetic (no compile) ----------------------------------------------------

def _rec(loss, impl, n, c, dtype, bytes_x, temp_x, h=0):
  case = aot.Case(loss, impl, n, c, dtype, h)
  lb = case.logits_bytes
  return {"key": case.key, "case": {"loss": loss, "impl": impl, "n": n, "c": c,
                                    "dtype": dtype, "h": h},
          "bytes_accessed": bytes_x * lb, "temp_bytes": int(temp_x * lb), "logits_bytes": lb,
          "big_buffers": []}


def test_plan_compiles_each_loss_and_one_optax_peer_per_shape_and_dtype():
  cases = aot.plan(losses=("softmax", "categorical", "sigmoid"), dtypes=("float32",),
                   shapes=((8, 4),), linear=True, linear_shape=(8, 4, 16))
  keys = [c.key for c in cases]
  assert keys == ["softmax/focal/8x4/float32", "categorical/focal/8x4/float32",
                  "sigmoid/focal/8x4/float32", "optax_int/optax/8x4/float32",
                  "optax_prob/optax/8x4/float32", "linear/focal/8x4x16/bfloat16",
                  "optax_linear/optax/8x4x16/bfloat16"]
  assert aot.Case("softmax", "focal", 2048, 30522, "bfloat16").logits_bytes == 2048 * 30522 * 2


def test_judge_ratios_targets_and_verdicts():
  recs = [
      _rec("softmax", "focal", 64, 30522, "float32", 2.9, 0.0),      # <= 1.5 x 2x floor
      _rec("categorical", "focal", 64, 30522, "float32", 4.6, 0.0),  # > 1.5 x 3x floor + 2 %
      _rec("optax_int", "optax", 64, 30522, "float32", 4.0, 0.0),
      _rec("optax_prob", "optax", 64, 30522, "float32", 6.0, 0.0),
      _rec("softmax", "focal", 1024, 91, "bfloat16", 10.0, 0.05),    # <= 1.25 x optax's 8.0
      _rec("softmax", "focal", 1024, 2, "bfloat16", 10.1, 0.0),      # > 1.25 x 8.0
      _rec("categorical", "focal", 1024, 91, "bfloat16", 5.0, 0.2),  # temporaries too large
      _rec("optax_int", "optax", 1024, 91, "bfloat16", 8.0, 0.0),
      _rec("optax_int", "optax", 1024, 2, "bfloat16", 8.0, 0.0),
      _rec("optax_prob", "optax", 1024, 91, "bfloat16", 4.5, 0.0),
      _rec("sigmoid", "focal", 1024, 91, "float32", 3.05, 0.0),
      _rec("linear", "focal", 64, 256, "bfloat16", 0.0, 0.925, h=4),
  ]
  rows = {r["key"]: r for r in aot.judge(recs)}
  assert len(rows) == 7  # the focal lines only
  r = rows["softmax/focal/64x30522/float32"]
  assert r["floor_x"] == 2.0 and r["bytes_x_floor"] == pytest.approx(1.45)
  assert r["bytes_x_optax"] == pytest.approx(2.9 / 4.0) and r["verdict"] == "held"
  r = rows["categorical/focal/64x30522/float32"]
  assert r["floor_x"] == 3.0 and r["bytes_limit_x"] == pytest.approx(4.5 * aot.ROW_SLACK)  # 4.59
  assert r["verdict"] == "MISSED"
  assert rows["softmax/focal/1024x91/bfloat16"]["bytes_limit_x"] == pytest.approx(10.0)
  assert rows["softmax/focal/1024x91/bfloat16"]["verdict"] == "held"
  assert rows["softmax/focal/1024x2/bfloat16"]["verdict"] == "MISSED"
  assert rows["categorical/focal/1024x91/bfloat16"]["verdict"] == "MISSED"  # temp 0.2x
  assert rows["sigmoid/focal/1024x91/float32"]["verdict"] == "held"
  lin = rows["linear/focal/64x4x256/bfloat16"]
  # temporaries: 0.8x + the f32 kernel gradient (4 x 256 x 4 bytes = 0.125x the bf16 logits)
  assert lin["temp_beyond_kernel_grad_x"] == pytest.approx(0.8, abs=1e-3)
  assert lin["verdict"] == "MISSED"
  text = aot.markdown({"target": "tpu", "rows": aot.judge(recs),
                       "header": {"device": {"platform": "tpu", "device_kind": "TPU v5 lite",
                                             "topology": "v5e:2x2"},
                                  "versions": {"jax": "0.10.2", "libtpu": "0.0.42.1"}}})
  assert "TPU v5 lite" in text and "libtpu 0.0.42.1" in text
  assert "3 of 7 targets held." in text


def test_judge_sets_targets_against_the_measured_floor():
  recs = [
      _rec("sigmoid", "focal", 1024, 91, "float32", 3.2, 0.0),
      _rec("floor3", "floor", 1024, 91, "float32", 3 * 96 / 91, 0.0),
      _rec("sigmoid", "focal", 1024, 90, "float32", 3.2, 0.0),  # no floor compiled: nominal 3x
      _rec("softmax", "focal", 64, 1000, "float32", 3.2, 0.0),
      _rec("floor2", "floor", 64, 1000, "float32", 2.1, 0.0),
  ]
  rows = {r["key"]: r for r in aot.judge(recs)}
  assert len(rows) == 3  # the floors are not rows
  r = rows["sigmoid/focal/1024x91/float32"]
  assert r["floor_x"] == pytest.approx(3 * 96 / 91) and r["floor_nominal_x"] == 3.0
  assert r["bytes_limit_x"] == pytest.approx(3 * 96 / 91 * aot.SIGMOID_FACTOR)
  assert r["verdict"] == "held"
  assert rows["sigmoid/focal/1024x90/float32"]["verdict"] == "MISSED"  # 3.2 > 3.06
  r = rows["softmax/focal/64x1000/float32"]
  assert r["bytes_limit_x"] == pytest.approx(2.1 * 1.5 * aot.ROW_SLACK) and r["verdict"] == "held"


def test_judge_allows_a_few_scalar_bytes_over_a_limit_and_no_more():
  lb = 1024 * 16 * 4
  recs = [_rec("optax_prob", "optax", 1024, 16, "float32", 4.0, 0.0),
          _rec("categorical", "focal", 1024, 16, "float32", 5.0 + 24 / lb, 0.0),
          _rec("optax_prob", "optax", 1024, 8, "float32", 4.0, 0.0),
          _rec("categorical", "focal", 1024, 8, "float32", 5.0 + 4096 / (lb / 2), 0.0)]
  rows = {r["key"]: r for r in aot.judge(recs)}
  assert rows["categorical/focal/1024x16/float32"]["verdict"] == "held"  # 24 bytes over 5.0x
  assert rows["categorical/focal/1024x8/float32"]["verdict"] == "MISSED"  # 4 KiB over


def test_with_floors_adds_one_floor_program_per_shape_dtype_and_kind():
  cases = aot.plan(losses=("softmax", "categorical", "sigmoid"), dtypes=("float32",),
                   shapes=((8, 4),), linear=True, linear_shape=(8, 4, 16))
  added = [c.key for c in aot.with_floors(cases)[len(cases):]]
  assert added == ["floor2/floor/8x4/float32", "floor3/floor/8x4/float32"]


def test_hbm_bytes_counts_hbm_operands_and_results_at_their_tiled_size():
  hlo = """HloModule m

%f (p: f32[16,91]) -> f32[16,91] {
  %p = f32[16,91]{0,1:T(8,128)} parameter(0)
  ROOT %n = f32[16,91]{0,1:T(8,128)} negate(%p)
}

ENTRY %main (z: f32[16,91], t: s32[16]) -> f32[16,91] {
  %z = f32[16,91]{0,1:T(8,128)} parameter(0)
  %t = s32[16]{0:T(1024)} parameter(1)
  %cs = (f32[16,91]{0,1:T(8,128)S(1)}, f32[16,91]{0,1:T(8,128)}, u32[]{:S(2)}) copy-start(%z)
  %ss = ((f32[16,91]{0,1:T(8,128)}), f32[8,91]{0,1:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%z), slice={[0:8], [0:91]}
  %sd = f32[8,91]{0,1:T(8,128)S(1)} slice-done(%ss)
  %r = (f32[16]{0:T(1024)S(1)}, f32[16]{0:T(1024)}) fusion(%z, %t), kind=kLoop, calls=%f
  %r0 = f32[16]{0:T(1024)S(1)} get-tuple-element(%r), index=0
  %cd = f32[16,91]{0,1:T(8,128)S(1)} copy-done(%cs)
  ROOT %g = f32[16,91]{0,1:T(8,128)} fusion(%cd, %r0), kind=kLoop, calls=%f
}
"""
  # (16, 91) laid out minor-to-major {0,1} in (8, 128) tiles: 96 x 128 elements.
  z = 96 * 128 * 4
  t = row = 1024 * 4
  # copy-start: z read; slice-start: 8 of z's 16 rows read, (91, 8) physically, padded to
  # the same (96, 128) tiles as z; fusion r: z and t read, its HBM result written; g: the
  # gradient written (its operands are on chip).
  half = 96 * 128 * 4
  assert aot.hbm_bytes(hlo) == z + half + (z + t + row) + z
  # Without a layout: dense, row-major, in HBM.
  assert aot.hbm_bytes("ENTRY %e {\n  %a = f32[3,5] parameter(0)\n"
                       "  ROOT %b = f32[3,5] negate(%a)\n}\n") == 2 * 15 * 4


def test_custom_call_bytes_counts_each_kernel_operand_and_result_once():
  # The H100's cost analysis counts none of a custom call's bytes: a Triton kernel reading
  # the logits and targets and writing the gradient (a GPU program's ENTRY, no layouts
  # beyond the default) is 3x a (64, 32) float32 array plus its scalars; the fusion beside it
  # and the kernel in a nested computation are not counted here.
  hlo = """HloModule m

%inner (a: f32[64,32]) -> f32[64,32] {
  %a = f32[64,32]{1,0} parameter(0)
  ROOT %k = f32[64,32]{1,0} custom-call(%a), custom_call_target="__gpu$xla.gpu.triton"
}

ENTRY %main (z: f32[64,32], y: f32[64,32]) -> f32[64,32] {
  %z = f32[64,32]{1,0} parameter(0)
  %y = f32[64,32]{1,0} parameter(1)
  %h = f32[3]{0} fusion(), kind=kLoop, calls=%inner
  ROOT %g = f32[64,32]{1,0} custom-call(%h, %z, %y), custom_call_target="__gpu$xla.gpu.triton"
}
"""
  assert aot.custom_call_bytes(hlo) == 3 * 64 * 32 * 4 + 3 * 4
  # The record's bytes: XLA's figure plus the custom calls' (no hbm_bytes off TPU).
  rec = {"bytes_accessed": 100.0, "custom_call_bytes": 24}
  assert aot._traffic(rec) == 124.0
  assert aot._traffic({**rec, "hbm_bytes": 7}) == 7.0


def test_entry_big_buffers_lists_logits_sized_results_of_the_entry_computation():
  hlo = """HloModule m

%fused (p: f32[8,4]) -> f32[8,4] {
  %p = f32[8,4]{1,0} parameter(0)
  ROOT %n = f32[8,4]{1,0} negate(%p)
}

ENTRY %main (z: f32[8,4], t: s32[8]) -> f32[8,4] {
  %z = f32[8,4]{1,0} parameter(0)
  %t = s32[8]{0} parameter(1)
  %r = f32[8]{0} reduce(%z), dimensions={1}
  %c = (f32[8]{0}, bf16[8,4]{1,0}) fusion(%z), kind=kLoop
  ROOT %g = f32[8,4]{1,0} fusion(%z, %r), kind=kLoop, calls=%fused
}
"""
  got = aot._entry_big_buffers(hlo, aot.Case("softmax", "focal", 8, 4, "float32"))
  assert got == ["z f32[8,4]", "c bf16[8,4]", "g f32[8,4]"]
