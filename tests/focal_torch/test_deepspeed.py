"""The DeepSpeed drop-in against the 42 values recorded from the real module
(``parity_tests/data/deepspeed_focal_loss.npz``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import focal_torch

# Loss tolerances: DeepSpeed's own float32 (1 - probs) loses digits at margin 8, and its
# float64 result at margin 8 is off by ~1e-11 relative; ours is the log-space value.
TOL = {"float32": dict(rtol=1e-5, atol=1e-12), "float64": dict(rtol=1e-10, atol=1e-300)}


def _run(case, alpha=None):
  dtype = torch.float32 if case["dtype"] == "float32" else torch.float64
  if alpha is None and case["alpha"] is not None:
    alpha = torch.from_numpy(case["alpha"])
  module = focal_torch.FocalLoss(case["c"], alpha=alpha, gamma=case["gamma"],
                                 size_average=case["size_average"])
  z = torch.tensor(case["logits"], dtype=dtype, requires_grad=True)
  loss = module(z, torch.from_numpy(case["targets"]))
  loss.backward()
  assert loss.dtype == dtype and z.grad.dtype == dtype
  return loss.detach().numpy(), z.grad.numpy()


def _load_cases():
  """The recorded cases, each a dict of its ``meta`` entry and its arrays."""
  path = Path(__file__).resolve().parents[2] / "parity_tests" / "data" / (
      "deepspeed_focal_loss.npz")
  with np.load(path) as data:
    cases = []
    for meta in json.loads(str(data["meta"])):
      case = dict(meta)
      for key in ("logits", "targets", "loss", "grad", "alpha"):
        name = f"{meta['case']}/{key}"
        case[key] = data[name] if name in data else None
      cases.append(case)
  return cases


CASES = _load_cases()
IDS = [f"case{c['case']}-{c['dtype']}-{c['alpha_kind']}-g{c['gamma']}-s{c['logit_scale']:g}"
       for c in CASES]


def test_all_42_cases_are_loaded():
  assert len(CASES) == 42
  assert sum(c["alpha_kind"] == "vec" for c in CASES) == 12
  assert sum(not (c["loss_finite"] and c["grad_finite"]) for c in CASES) == 2


@pytest.mark.parametrize("case", [c for c in CASES if c["alpha_kind"] != "vec"],
                         ids=[i for c, i in zip(CASES, IDS) if c["alpha_kind"] != "vec"])
def test_same_loss_and_gradient_where_deepspeed_is_finite(ref, case):
  loss, grad = _run(case)
  assert np.isfinite(loss) and np.isfinite(grad).all()
  if case["loss_finite"]:
    np.testing.assert_allclose(loss, case["loss"], **TOL[case["dtype"]])
  finite = np.isfinite(case["grad"])
  assert finite.any()
  # DeepSpeed's float32 gradient carries its own rounding (1 - probs): compare entries to the
  # gradient's scale.
  scale = np.abs(case["grad"][finite]).max()
  tol = TOL[case["dtype"]]["rtol"]
  np.testing.assert_allclose(grad[finite], case["grad"][finite], rtol=tol,
                             atol=tol * scale + TOL[case["dtype"]]["atol"])
  # And ours is the float64 value of the same inputs, to float32 rounding.
  alpha = None if case["alpha"] is None else case["alpha"].reshape(-1)
  want, want_grad = ref.softmax_focal(case["logits"].astype(np.float64), case["targets"],
                                      alpha=alpha, gamma=case["gamma"],
                                      reduction="mean" if case["size_average"] else "sum")
  # float32 rounds logits of size |z| by |z| * 6e-8: that much relative error in exp(z - lse).
  rtol = 1e-7 * max(16.0, np.abs(case["logits"]).max()) if case["dtype"] == "float32" else 1e-12
  np.testing.assert_allclose(loss, want, rtol=rtol)
  np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=rtol * np.abs(want_grad).max())


@pytest.mark.parametrize("case", [c for c in CASES if not c["loss_finite"]],
                         ids=[i for c, i in zip(CASES, IDS) if not c["loss_finite"]])
def test_finite_and_equal_to_float64_truth_where_deepspeed_overflows(ref, case):
  # DeepSpeed gives an inf loss and NaN gradients here (float32, margins of 60 and 120).
  assert not np.isfinite(case["loss"]) and not np.isfinite(case["grad"]).all()
  alpha = case["alpha"].reshape(-1)
  want, want_grad = ref.softmax_focal(case["logits"].astype(np.float64), case["targets"],
                                      alpha=alpha, gamma=case["gamma"],
                                      reduction="mean" if case["size_average"] else "sum")
  loss, grad = _run(case)
  rtol = 1e-7 * np.abs(case["logits"]).max()  # float32 rounding of logits this large
  np.testing.assert_allclose(loss, want, rtol=rtol)
  np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=rtol * np.abs(want_grad).max())


@pytest.mark.parametrize("case", [c for c in CASES if c["alpha_kind"] == "vec"],
                         ids=[i for c, i in zip(CASES, IDS) if c["alpha_kind"] == "vec"])
def test_vector_alpha_is_per_class_a_documented_divergence(ref, case):
  logits = case["logits"].astype(np.float64)
  targets, alpha = case["targets"], case["alpha"].astype(np.float64)
  reduction = "mean" if case["size_average"] else "sum"
  # DeepSpeed's N x N broadcast, computed independently: alpha_t[i] * f[j] over all (i, j).
  f, f_grad = ref.softmax_focal(logits, targets, gamma=case["gamma"], reduction="none")
  alpha_t = alpha[targets]
  pool = np.mean if case["size_average"] else np.sum
  broadcast = pool(alpha_t) * pool(f)
  broadcast_grad = pool(alpha_t) * f_grad / (len(targets) if case["size_average"] else 1)
  np.testing.assert_allclose(case["loss"], broadcast, **TOL[case["dtype"]])
  tol = TOL[case["dtype"]]["rtol"]  # DeepSpeed's (1 - probs) rounding: relative to the scale
  np.testing.assert_allclose(case["grad"], broadcast_grad, rtol=tol,
                             atol=tol * np.abs(broadcast_grad).max())
  # Ours: per-class weights, the same as a (C, 1) alpha and as the float64 reference.
  want, want_grad = ref.softmax_focal(logits, targets, alpha=alpha, gamma=case["gamma"],
                                      reduction=reduction)
  loss, grad = _run(case)
  np.testing.assert_allclose(loss, want, **TOL[case["dtype"]])
  # The reference's -expm1(log p) keeps ~1e-16 absolute, not relative, accuracy near p = 1.
  np.testing.assert_allclose(grad, want_grad, rtol=tol, atol=tol * np.abs(want_grad).max())
  col_loss, col_grad = _run(case, alpha=torch.from_numpy(case["alpha"]).reshape(-1, 1))
  np.testing.assert_array_equal(col_loss, loss)
  np.testing.assert_array_equal(col_grad, grad)
  if len(targets) > 1:  # with one row the broadcast is the same number
    assert not np.isclose(loss, case["loss"], rtol=1e-3, atol=0)


@pytest.mark.parametrize("gamma", [0.5, 0.25])
def test_finite_where_deepspeed_gradient_is_nan_for_small_gamma(ref, gamma):
  # p rounds to 1 in float32 (margin 20): (1 - p) ** gamma has an infinite derivative there.
  logits = np.array([[20.0, 0.0, -3.0], [0.0, 2.0, 1.0]], np.float32)
  targets = np.array([0, 1])
  z = torch.tensor(logits, requires_grad=True)
  naive = -(1 - torch.softmax(z, 1)[[0, 1], targets]) ** gamma * torch.log_softmax(z, 1)[
      [0, 1], targets]
  naive.mean().backward()
  assert torch.isnan(z.grad).any()  # what a probability-space implementation gives
  case = dict(dtype="float32", alpha=None, c=3, gamma=gamma, size_average=True,
              logits=logits, targets=targets)
  loss, grad = _run(case)
  want, want_grad = ref.softmax_focal(logits.astype(np.float64), targets, gamma=gamma)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32_loss_like_deepspeed(ref, dtype):
  rng = np.random.default_rng(0)
  z = torch.tensor(rng.normal(0, 3, (6, 4))).to(dtype).requires_grad_()
  targets = torch.tensor(rng.integers(0, 4, 6))
  loss = focal_torch.FocalLoss(4)(z, targets)
  assert loss.dtype == torch.float32
  loss.backward()
  assert z.grad.dtype == dtype
  want, want_grad = ref.softmax_focal(z.detach().double().numpy(), targets.numpy())
  np.testing.assert_allclose(loss.item(), want, rtol=1e-6)
  np.testing.assert_allclose(z.grad.double().numpy(), want_grad, rtol=2 ** -7, atol=1e-4)


def test_constructor_defaults_and_buffers_match_deepspeed():
  module = focal_torch.FocalLoss(5)
  assert module.alpha.shape == (5, 1) and (module.alpha == 1).all()
  assert module.gamma == 2 and module.size_average is True and module.class_num == 5
  assert dict(module.state_dict()) == {}  # DeepSpeed keeps alpha as a plain attribute
  module.double()
  assert module.alpha.dtype == torch.float64
  targets_col = torch.tensor([[1], [2]])  # DeepSpeed takes targets.view(-1, 1)
  z = torch.randn(2, 5, dtype=torch.float64)
  assert torch.equal(module(z, targets_col), module(z, targets_col.reshape(-1)))


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match=r"FocalLoss: alpha must have shape \(3, 1\) or \(3,\) "
                                       r"\(class_num=3\), got \(4,\)"):
    focal_torch.FocalLoss(3, alpha=torch.ones(4))
  with pytest.raises(ValueError, match=r"FocalLoss: gamma must be >= 0, got -1"):
    focal_torch.FocalLoss(3, gamma=-1)
  with pytest.raises(ValueError, match=r"FocalLoss: class_num must be >= 1, got 0"):
    focal_torch.FocalLoss(0)
  module = focal_torch.FocalLoss(3)
  with pytest.raises(ValueError, match=r"FocalLoss: inputs must have shape \(N, class_num\) = "
                                       r"\(N, 3\), got \(2, 3, 4\)"):
    module(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
  with pytest.raises(ValueError, match=r"FocalLoss: inputs must have shape .* got \(2, 4\)"):
    module(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
  with pytest.raises(ValueError, match=r"FocalLoss: targets must have shape \(2,\) or \(2, 1\)"):
    module(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))
  with pytest.raises(ValueError, match=r"FocalLoss: labels must be in \[0, 3\), got label -100 "
                                       r"\(C=3\)"):
    module(torch.randn(2, 3), torch.tensor([0, -100]))
  with pytest.raises(TypeError, match=r"FocalLoss: inputs must be a floating-point tensor"):
    module(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
