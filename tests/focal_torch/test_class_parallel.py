"""Classes split over gloo ranks on loopback (``class_process_group``, vocabulary parallelism).

Each rank holds a contiguous slice of the classes (logits columns; rows of the linear head's
weight and bias) and, in the 2 x 2 layout, a slice of the rows too (``process_group``, the data
group, with DistributedDataParallel over it in the ``ddp-*`` cases). Every rank's value and
the gradient of its slice must equal the single-process float64 result of the whole problem,
computed here from ``focal_reference`` (the formulas, no code shared with focal_torch), to
1e-10.

One spawn per world size (2 and 4 ranks) runs every case; run as a script, this file is the
worker: ``python test_class_parallel.py RANK WORLD PORT OUT``.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pytest
import torch

import focal_reference
import focal_torch

N, H, C = 10, 5, 12
ROWS = ((0, 3), (3, 10))  # the data ranks' rows (uneven); rows 0-2 hold no positive
F64 = torch.float64
TIMEOUT_S = 240
REDUCTIONS = ("none", "sum", "mean", "mean_positive")


def make_data() -> dict:
  g = torch.Generator().manual_seed(0)
  z = 3 * torch.randn(N, C, generator=g, dtype=F64)
  # Labels crowd the first classes: with 4 ranks of 3 classes, rank 0 owns most targets,
  # rank 2 none. Rows 0-2 (data rank 0 of the 2 x 2 layout) are background or ignored.
  labels = torch.tensor([0, 0, -100, 1, 2, 10, 4, 2, -100, 1])
  z[4, 2] += 8.0  # a confident row (the float64 reference keeps 1e-10 up to q ~ 1e-6)
  where = torch.ones(N, dtype=torch.bool)
  where[7] = False
  z3 = 2 * torch.randn(N, C, 2, generator=g, dtype=F64)
  labels3 = torch.randint(0, C, (N, 2), generator=g)
  labels3[1, 0] = -100
  probs = torch.softmax(2 * torch.randn(N, C, generator=g, dtype=F64), 1)
  probs[0] = 0.02
  probs[0, 0] = 1 - 0.02 * (C - 1)  # background rows
  probs[1] = probs[0]
  probs[4] = 0.0
  probs[4, 0] = probs[4, 7] = 0.5  # a tie across ranks: argmax 0 (the first), background
  soft = torch.rand(N, C, generator=g, dtype=F64)
  soft[soft < 0.5] = 0.0  # soft labels, some hard 0 (positives: label > 0)
  soft[:3] = 0.0  # no positive on data rank 0 of the 2 x 2 layout
  z_nf = z.clone()
  z_nf[5, 0] = float("nan")  # a valid row (label 10): NaN on every rank
  z_nf[7, 11] = float("nan")  # a masked row (where False): 0 loss, 0 gradient
  z_nf[3, 6:] = float("-inf")  # the last ranks' slices of a row hold no finite logit
  return dict(
      z=z, z_nf=z_nf, labels=labels, soft=soft, where=where, z3=z3, labels3=labels3, probs=probs,
      sw=2 * torch.rand(N, generator=g, dtype=F64),
      alpha=0.25 + torch.rand(C, generator=g, dtype=F64),
      gamma=torch.tensor([2.0, 0.0, 0.5, 1.0, 3.0, 2.0, 1.5, 0.25, 2.0, 1.0, 4.0, 2.0],
                         dtype=F64),
      x=torch.randn(N, H, generator=g, dtype=F64),
      w=torch.randn(C, H, generator=g, dtype=F64),
      b=torch.randn(C, generator=g, dtype=F64))


FLOATS = ("z", "z_nf", "z3", "probs", "x", "w", "b")
# Tolerances per input dtype (those of the single-process tests, conftest.TOL).
TOL = {F64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=2 ** -7, atol=2 ** -8)}


def cast(d: dict, dtype: torch.dtype) -> dict:
  """The data with its logits, targets and linear head in ``dtype``."""
  return {k: v.to(dtype) if k in FLOATS else v for k, v in d.items()}


def cases(d: dict) -> list[tuple[str, str, dict]]:
  """(name, kind, keywords of the loss); tensors are the global ones (the worker cuts the
  per-row ones to its rows; ``alpha``/``gamma`` stay global, as the API asks)."""
  out = []
  for r in REDUCTIONS:
    out.append((f"softmax-{r}", "softmax", dict(
        alpha=d["alpha"], gamma=d["gamma"], label_smoothing=0.1, where=d["where"],
        sample_weight=d["sw"], reduction=r, ignore_index=-100)))
  out.append(("softmax-3d-mean", "softmax3d", dict(
      alpha=0.25, gamma=0.0, sample_weight=2.0, reduction="mean", ignore_index=-100)))
  out.append(("softmax-3d-smooth-mean_positive", "softmax3d", dict(
      gamma=0.5, label_smoothing=0.2, reduction="mean_positive", ignore_index=-100,
      background_class=3)))
  out.append(("softmax-nonfinite-none", "softmax-nf", dict(
      alpha=d["alpha"], gamma=d["gamma"], where=d["where"], reduction="none",
      ignore_index=-100)))
  out.append(("softmax-float32-mean", "softmax", dict(
      alpha=d["alpha"], gamma=d["gamma"], label_smoothing=0.1, reduction="mean",
      dtype=torch.float32)))
  out.append(("softmax-bfloat16-mean_positive", "softmax", dict(
      gamma=d["gamma"], where=d["where"], reduction="mean_positive", dtype=torch.bfloat16)))
  out.append(("module-softmax-mean", "module-softmax", dict(
      alpha=d["alpha"], gamma=d["gamma"], label_smoothing=0.05, reduction="mean",
      ignore_index=-100)))
  for r in REDUCTIONS:
    out.append((f"categorical-{r}", "categorical", dict(
        alpha=d["alpha"], gamma=d["gamma"], where=d["where"], sample_weight=d["sw"],
        reduction=r)))
  out.append(("module-categorical-mean_positive", "module-categorical", dict(
      gamma=1.5, reduction="mean_positive")))
  out.append(("categorical-bfloat16-mean_positive", "categorical", dict(
      gamma=d["gamma"], reduction="mean_positive", dtype=torch.bfloat16)))
  for r in REDUCTIONS:
    out.append((f"linear-{r}", "linear", dict(
        alpha=d["alpha"], gamma=d["gamma"], label_smoothing=0.1, where=d["where"],
        sample_weight=d["sw"], reduction=r, ignore_index=-100, chunk_size=3)))
  out.append(("linear-nobias-mean", "linear-nobias", dict(gamma=2.0, reduction="mean")))
  out.append(("linear-float32-none", "linear", dict(
      alpha=d["alpha"], gamma=0.5, label_smoothing=0.1, reduction="none", chunk_size=4,
      dtype=torch.float32)))
  # DistributedDataParallel over the data group (2 x 2 layout only): a column-parallel
  # nn.Linear whose rows are this rank's classes, the loss called from forward.
  # sigmoid_focal needs no class group: process_group is the group of every rank that
  # holds entries; the loss divided by the class group's size (see the worker).
  for r in ("mean_positive", "none"):
    out.append((f"sigmoid-{r}", "sigmoid", dict(
        alpha=0.25, gamma=1.5, label_smoothing=0.1, reduction=r)))
  out.append(("ddp-softmax-mean_positive", "ddp-softmax", dict(
      alpha=d["alpha"], gamma=0.5, label_smoothing=0.1, where=d["where"],
      reduction="mean_positive", ignore_index=-100)))
  out.append(("ddp-linear-mean", "ddp-linear", dict(
      gamma=d["gamma"], sample_weight=d["sw"], reduction="mean", ignore_index=-100,
      chunk_size=4)))
  out.append(("ddp-categorical-mean", "ddp-categorical", dict(
      alpha=d["alpha"], gamma=1.5, where=d["where"], reduction="mean")))
  return out


# ------------------------------------------------------------------------------ the truth


def _reference_softmax(z, labels, kw):
  return focal_reference.softmax_focal(
      z, labels, alpha=kw.get("alpha"), gamma=kw.get("gamma", 2.0),
      label_smoothing=kw.get("label_smoothing", 0.0), axis=1, where=kw.get("where"),
      ignore_index=kw.get("ignore_index", -100), reduction=kw.get("reduction", "mean"),
      background_class=kw.get("background_class", 0), sample_weight=kw.get("sample_weight"))


def reference(kind: str, kw: dict, d: dict) -> tuple[torch.Tensor, dict]:
  """Value and gradients of the whole problem in one process, float64 autograd of the
  reference formulas (for ``"none"``, of the sum of the per-entry losses); a case in a
  lower precision: of its inputs rounded to that precision."""
  kw = dict(kw)
  d = cast(cast(d, kw.pop("dtype", F64)), F64)
  if kind in ("softmax", "module-softmax", "softmax3d", "softmax-nf"):
    key, lab = {"softmax3d": ("z3", "labels3"), "softmax-nf": ("z_nf", "labels")}.get(
        kind, ("z", "labels"))
    z = d[key].clone().requires_grad_()
    out = _reference_softmax(z, d[lab], kw)
    (g,) = torch.autograd.grad(out.sum(), z)
    out = out.detach()
    if kind == "softmax-nf":
      # Row 3's -inf logits are masked classes (design.md): its loss is that of classes
      # 0-5 alone (the formula's 0 * sum(log s) is NaN there with eps = 0).
      z_row = d[key][3:4, :6].clone().requires_grad_()
      row = _reference_softmax(z_row, d[lab][3:4], dict(
          kw, alpha=kw["alpha"][:6], gamma=kw["gamma"][:6], where=None))
      (g_row,) = torch.autograd.grad(row.sum(), z_row)
      out[3], g[3, :6] = row.detach()[0], g_row[0]
    return out, {"z": g}
  if kind in ("categorical", "module-categorical"):
    z = d["z"].clone().requires_grad_()
    out = focal_reference.categorical_focal(
        z, d["probs"], alpha=kw.get("alpha"), gamma=kw.get("gamma", 2.0), axis=1,
        where=kw.get("where"), reduction=kw.get("reduction", "mean"),
        background_class=kw.get("background_class", 0), sample_weight=kw.get("sample_weight"))
    (g,) = torch.autograd.grad(out.sum(), z)
    return out.detach(), {"z": g}
  if kind == "sigmoid":
    z = d["z"].clone().requires_grad_()
    out = focal_reference.sigmoid_focal(
        z, d["soft"], alpha=kw["alpha"], gamma=kw["gamma"],
        label_smoothing=kw["label_smoothing"], reduction=kw["reduction"])
    (g,) = torch.autograd.grad(out.sum(), z)
    return out.detach(), {"z": g}
  x, w, b = (d[k].clone().requires_grad_() for k in ("x", "w", "b"))
  z = x @ w.t() + (0 if kind == "linear-nobias" else b)
  if kind == "ddp-categorical":
    out = focal_reference.categorical_focal(
        z, d["probs"], alpha=kw.get("alpha"), gamma=kw["gamma"], axis=1,
        where=kw.get("where"), reduction=kw["reduction"])
  else:
    out = _reference_softmax(z, d["labels"], kw)
  if kind == "linear-nobias":
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    return out.detach(), {"x": gx, "w": gw}
  gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
  if kind.startswith("ddp-"):
    return out.detach(), {"w": gw, "b": gb}
  return out.detach(), {"x": gx, "w": gw, "b": gb}


# ------------------------------------------------------------------------------ the worker


class Layout:
  """Rank ``d * kc + c`` holds data slice ``d`` (of ``nd``) and class slice ``c`` (of
  ``kc``); groups: the class group (same ``d``), the data group (same ``c``; None if
  ``nd == 1``)."""

  def __init__(self, rank: int, nd: int, kc: int) -> None:
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel
    self.nd, self.kc = nd, kc
    self.d, self.c = divmod(rank, kc)
    # Every rank creates every group, in the same order.
    class_groups = [dist.new_group([d * kc + c for c in range(kc)]) for d in range(nd)]
    data_groups = [dist.new_group([d * kc + c for d in range(nd)]) for c in range(kc)]
    world = nd * kc == dist.get_world_size()
    self.class_group = class_groups[self.d]
    # The modules take "world" when the class group is the whole world.
    self.class_arg = "world" if nd == 1 and world else self.class_group
    self.data_group = data_groups[self.c] if nd > 1 else None
    self.rows = slice(*ROWS[self.d]) if nd > 1 else slice(0, N)
    per = C // kc
    self.cols = slice(self.c * per, (self.c + 1) * per)


class _Net(torch.nn.Module):
  """This rank's rows of the head as an ``nn.Linear``; forward returns a loss of it (DDP
  syncs the gradients of what forward uses)."""

  def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
    super().__init__()
    self.linear = torch.nn.Linear(w.shape[1], w.shape[0], dtype=F64)
    with torch.no_grad():
      self.linear.weight.copy_(w)
      self.linear.bias.copy_(b)

  def forward(self, fn):
    return fn(self.linear)


def _rows_of(kw: dict, rows: slice) -> dict:
  out = dict(kw)
  for key in ("where", "sample_weight"):
    value = kw.get(key)
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == N:
      out[key] = value[rows]
  return out


def run_case(kind: str, kw: dict, d: dict, lay: Layout) -> dict:
  import torch.distributed as dist  # pylint: disable=import-outside-toplevel
  kw = _rows_of(kw, lay.rows)
  d = cast(d, kw.pop("dtype", F64))
  groups = dict(class_process_group=lay.class_group, process_group=lay.data_group)
  grads = {}
  if kind in ("softmax", "softmax3d", "module-softmax", "softmax-nf"):
    key, lab = {"softmax3d": ("z3", "labels3"), "softmax-nf": ("z_nf", "labels")}.get(
        kind, ("z", "labels"))
    z = d[key][lay.rows][:, lay.cols].clone().requires_grad_()
    if kind == "module-softmax":
      where = kw.pop("where", None)
      fn = focal_torch.SoftmaxFocalLoss(**kw, class_process_group=lay.class_arg,
                                        process_group=lay.data_group)
      loss = fn(z, d[lab][lay.rows], where)
    else:
      loss = focal_torch.softmax_focal(z, d[lab][lay.rows], **kw, **groups)
    loss.sum().backward()
    grads["z"] = z.grad
  elif kind in ("categorical", "module-categorical"):
    z = d["z"][lay.rows][:, lay.cols].clone().requires_grad_()
    y = d["probs"][lay.rows][:, lay.cols]
    if kind == "module-categorical":
      fn = focal_torch.CategoricalFocalLoss(**kw, class_process_group=lay.class_arg,
                                            process_group=lay.data_group)
      loss = fn(z, y)
    else:
      loss = focal_torch.categorical_focal(z, y, **kw, **groups)
    loss.sum().backward()
    grads["z"] = z.grad
  elif kind == "sigmoid":
    z = d["z"][lay.rows][:, lay.cols].clone().requires_grad_()
    loss = focal_torch.sigmoid_focal(z, d["soft"][lay.rows][:, lay.cols], **kw,
                                     process_group=dist.group.WORLD)
    if loss.ndim == 0:
      # Every rank returns world * local_sum / denominator: divided by the class group's
      # size, the gradient of each slice is what averaging over the data group expects,
      # and the whole loss is the class group's sum.
      loss = loss / lay.kc
    loss.sum().backward()
    grads["z"] = z.grad
    value = loss.detach().clone()
    if value.ndim == 0:
      dist.all_reduce(value, group=lay.class_group)
    else:
      value = value.contiguous()
    if value.ndim == 0 and lay.data_group is not None:
      dist.all_reduce(value, group=lay.data_group)
      value /= lay.nd
    return dict(value=value, grads=grads)
  elif kind in ("linear", "linear-nobias"):
    x = d["x"][lay.rows].clone().requires_grad_()
    w = d["w"][lay.cols].clone().requires_grad_()
    b = None if kind == "linear-nobias" else d["b"][lay.cols].clone().requires_grad_()
    loss = focal_torch.linear_softmax_focal(x, w, d["labels"][lay.rows], bias=b, **kw,
                                            **groups)
    loss.sum().backward()
    # The caller's step: hidden's gradient summed over the class group.
    dist.all_reduce(x.grad, group=lay.class_group)
    grads["x"] = x.grad
    for key, p in (("w", w), ("b", b)):
      if p is None:
        continue
      if lay.data_group is not None:  # the data-parallel step DDP would take
        dist.all_reduce(p.grad, group=lay.data_group)
        p.grad /= lay.nd if loss.ndim == 0 else 1
      grads[key] = p.grad
  elif kind.startswith("ddp-"):
    if lay.data_group is None:
      return None
    from torch.nn.parallel import DistributedDataParallel  # pylint: disable=import-outside-toplevel
    net = DistributedDataParallel(_Net(d["w"][lay.cols], d["b"][lay.cols]),
                                  process_group=lay.data_group)
    x = d["x"][lay.rows]
    if kind == "ddp-softmax":
      target = d["labels"][lay.rows]
      fn = lambda m: focal_torch.softmax_focal(m(x), target, **kw, **groups)
    elif kind == "ddp-categorical":
      target = d["probs"][lay.rows][:, lay.cols]
      fn = lambda m: focal_torch.categorical_focal(m(x), target, **kw, **groups)
    else:
      target = d["labels"][lay.rows]
      fn = lambda m: focal_torch.linear_softmax_focal(x, m.weight, target, bias=m.bias, **kw,
                                                      **groups)
    loss = net(fn)
    loss.backward()
    grads["w"] = net.module.linear.weight.grad
    grads["b"] = net.module.linear.bias.grad
  else:
    raise AssertionError(kind)
  value = loss.detach().clone()
  if value.ndim == 0 and lay.data_group is not None:
    dist.all_reduce(value, group=lay.data_group)  # the usual recipe: average over the data
    value /= lay.nd
  return dict(value=value, grads=grads)


def _caught(f) -> str | None:
  try:
    f()
  except (ValueError, TypeError, RuntimeError) as e:
    return f"{type(e).__name__}: {e}"
  return None


def run_errors(d: dict, lay: Layout) -> dict:
  """Errors raised together on every rank (none leaves another rank waiting in a
  collective), and a bad label with the value checks off."""
  cg, per = lay.class_group, C // lay.kc
  z = d["z"][:, lay.cols].contiguous()
  nine = torch.ones(9, dtype=F64)  # C = 9 splits over neither 2 nor 4 ranks
  out = {
      "softmax-alpha": _caught(lambda: focal_torch.softmax_focal(
          z, d["labels"], alpha=[1.0] * 9, class_process_group=cg)),
      "categorical-gamma": _caught(lambda: focal_torch.categorical_focal(
          z, d["probs"][:, lay.cols], gamma=nine, class_process_group=cg)),
      "linear-alpha": _caught(lambda: focal_torch.linear_softmax_focal(
          d["x"], d["w"][lay.cols], d["labels"], alpha=nine, class_process_group=cg)),
      "module-gamma": _caught(lambda: focal_torch.SoftmaxFocalLoss(
          gamma=nine, class_process_group=cg)),
      "module-categorical-alpha": _caught(lambda: focal_torch.CategoricalFocalLoss(
          alpha=nine, class_process_group=cg)),
  }
  # Rank 0 of each class group holds one class more than the others.
  uneven = d["z"][:, :per + (1 if lay.c == 0 else 0)]
  out["uneven"] = _caught(lambda: focal_torch.softmax_focal(
      uneven.contiguous(), d["labels"], class_process_group=cg))
  leaf = z.clone().requires_grad_()
  loss = focal_torch.softmax_focal(leaf, d["labels"], class_process_group=cg)
  out["create_graph"] = _caught(lambda: torch.autograd.grad(loss, leaf, create_graph=True))
  bad = d["labels"].clone()
  bad[6] = C  # out of range for the whole C (every rank's slice is in range of C/k)
  with focal_torch.value_checks(False):
    out["bad-label"] = focal_torch.softmax_focal(z, bad, reduction="none",
                                                 class_process_group=cg)
  return out


def run_layout(rank: int, nd: int, kc: int) -> dict:
  lay = Layout(rank, nd, kc)
  d = make_data()
  out = {name: run_case(kind, kw, d, lay) for name, kind, kw in cases(d)}
  out["errors"] = run_errors(d, lay)
  return out


def layouts(world: int) -> list[tuple[int, int]]:
  """(data ranks, class ranks) of each layout run with ``world`` processes."""
  return [(1, 2)] if world == 2 else [(1, 4), (2, 2)]


def main(rank: int, world: int, port: int, out_file: str) -> None:
  import torch.distributed as dist  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(1)
  dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                          world_size=world, timeout=datetime.timedelta(seconds=60))
  try:
    torch.save({lt: run_layout(rank, *lt) for lt in layouts(world)}, out_file)
  finally:
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ the tests


def _check(world: int, got: list[dict]) -> int:
  """Compares every rank's results with the truth; returns the number of comparisons."""
  d = make_data()
  truth = {name: (kind, kw, reference(kind, kw, d)) for name, kind, kw in cases(d)}
  # The non-finite case holds what it should: a NaN row, a masked row of 0 (NaN logit),
  # and a row with no finite logit on some ranks that is finite.
  nf_value, nf_grads = truth["softmax-nonfinite-none"][2]
  assert nf_value[5].isnan() and nf_value[7] == 0 and (nf_grads["z"][7] == 0).all()
  assert nf_value[3].isfinite() and (nf_grads["z"][3, 6:] == 0).all()
  checked = 0
  for nd, kc in layouts(world):
    for rank in range(nd * kc):
      dd, c = divmod(rank, kc)
      rows = slice(*ROWS[dd]) if nd > 1 else slice(0, N)
      per = C // kc
      cols = slice(c * per, (c + 1) * per)
      for name, (kind, kw, (value, grads)) in truth.items():
        res = got[rank][(nd, kc)][name]
        if res is None:  # a DDP case in a layout without a data group
          assert kind.startswith("ddp-") and nd == 1
          continue
        where = f"{name}, layout {nd}x{kc}, rank {rank}"
        reduced = value.ndim == 0
        want_value = value if reduced else value[rows]
        if kind == "sigmoid" and not reduced:  # one loss per entry: this rank's classes
          want_value = want_value[:, cols]
        dtype = kw.get("dtype", F64)
        assert res["value"].dtype == dtype, where
        torch.testing.assert_close(res["value"].to(F64), want_value, **TOL[dtype],
                                   equal_nan=True, msg=lambda m, w=where: f"{w}: {m}")
        # Each data rank returns n * local_sum / global_denominator (DDP averages the
        # gradients of the parameters over the data group; a leaf logit is not averaged).
        scale = nd if reduced and nd > 1 else 1
        for key, g in grads.items():
          # Logits: this rank's rows and classes; hidden: its rows (summed over the class
          # group by the caller); weight and bias: its classes (averaged over the data).
          want = {"z": lambda: g[rows][:, cols] * scale, "x": lambda: g[rows] * scale,
                  "w": lambda: g[cols], "b": lambda: g[cols]}[key]()
          assert res["grads"][key].dtype == dtype, where
          torch.testing.assert_close(res["grads"][key].to(F64), want, **TOL[dtype],
                                     equal_nan=True,
                                     msg=lambda m, w=where, k=key: f"{w}, d/d{k}: {m}")
          assert (want != 0).any(), where  # a real signal, not 0 = 0
          checked += 1
      _check_errors(got[rank][(nd, kc)]["errors"], f"layout {nd}x{kc}, rank {rank}")
  return checked


def _check_errors(errors: dict, where: str) -> None:
  for key in ("softmax-alpha", "categorical-gamma", "linear-alpha", "module-gamma",
              "module-categorical-alpha"):
    assert errors[key] is not None and errors[key].startswith("ValueError"), (where, key)
    assert "class_process_group" in errors[key] and "not divisible" in errors[key], (
        where, errors[key])
  assert errors["uneven"] is not None and errors["uneven"].startswith("ValueError: "), where
  assert "every rank of class_process_group must hold the same number of classes" in (
      errors["uneven"]), (where, errors["uneven"])
  assert errors["create_graph"] is not None, where
  assert errors["create_graph"].startswith("RuntimeError") and "create_graph" in (
      errors["create_graph"]), (where, errors["create_graph"])
  bad = errors["bad-label"]
  assert bad[6].isnan() and bad[torch.arange(N) != 6].isfinite().all(), (where, bad)


def _run(world: int, ref, tmp_path: Path) -> None:
  got = ref.spawn_ranks(__file__, world, tmp_path, TIMEOUT_S)
  assert _check(world, got) >= len(cases(make_data())) * world


def test_two_ranks_split_the_classes(ref, tmp_path):
  _run(2, ref, tmp_path)


def test_four_ranks_split_the_classes_and_two_by_two_data_by_class(ref, tmp_path):
  _run(4, ref, tmp_path)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])


def test_class_process_group_is_checked_without_torch_distributed():
  assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
  z, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
  x, w = torch.randn(4, 2), torch.randn(3, 2)
  calls = {
      "softmax_focal": lambda g: focal_torch.softmax_focal(z, labels, class_process_group=g),
      "categorical_focal": lambda g: focal_torch.categorical_focal(
          z, torch.softmax(z, 1), class_process_group=g),
      "linear_softmax_focal": lambda g: focal_torch.linear_softmax_focal(
          x, w, labels, class_process_group=g),
  }
  for fn, call in calls.items():
    with pytest.raises(ValueError, match=f"{fn}: class_process_group='world' needs "
                       "torch.distributed to be initialized"):
      call("world")
    with pytest.raises(ValueError, match=f"{fn}: class_process_group must be None, 'world' "
                       "or a torch.distributed.ProcessGroup, got 'all'"):
      call("all")
    with pytest.raises(ValueError, match=f"{fn}: class_process_group was given but "
                       "torch.distributed is not initialized"):
      call(object())
  # Modules keep "world" until called (built before init_process_group).
  module = focal_torch.SoftmaxFocalLoss(alpha=torch.ones(9), class_process_group="world")
  with pytest.raises(ValueError, match="softmax_focal: class_process_group='world' needs"):
    module(z, labels)
  categorical = focal_torch.CategoricalFocalLoss(class_process_group="world")
  with pytest.raises(ValueError, match="categorical_focal: class_process_group='world'"):
    categorical(z, torch.softmax(z, 1))
  with pytest.raises(ValueError, match="CategoricalFocalLoss: class_process_group must be"):
    focal_torch.CategoricalFocalLoss(class_process_group="classes")
