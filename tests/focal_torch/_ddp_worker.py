"""One rank of the 2-process gloo DDP test (run as a script by test_distributed.py).

Usage: python _ddp_worker.py RANK WORLD PORT OUT_FILE

Every rank builds the same global batch and model, takes its (uneven) shard of rows, runs
each loss configuration under DistributedDataParallel with ``process_group=WORLD``, and
saves the group-averaged loss and the (DDP-averaged) parameter gradients to OUT_FILE.
The test computes the same configurations in one process on the whole batch.
"""

from __future__ import annotations

import datetime
import sys

import torch

import focal_torch

N, H, C = 11, 4, 3
# Rank 0 gets 3 rows, rank 1 the other 8; rank 0 has no positive for "mean_positive".
SPLIT = (3, 8)


def make_data():
  g = torch.Generator().manual_seed(0)
  x = torch.randn(N, H, generator=g, dtype=torch.float64)
  labels = torch.tensor([0, 0, -100, 1, 2, 2, 0, 1, -100, 2, 1])
  where = torch.ones(N, dtype=torch.bool)
  where[6] = False
  soft = torch.rand(N, C, generator=g, dtype=torch.float64)
  soft[:3] = 0.0  # no sigmoid positive on rank 0 either
  soft[5, 1] = 1.0
  probs = torch.softmax(3 * torch.randn(N, C, generator=g, dtype=torch.float64), 1)
  probs[:3] = torch.tensor([0.8, 0.1, 0.1], dtype=torch.float64)  # background rows on rank 0
  sw = torch.rand(N, generator=g, dtype=torch.float64) * 2  # sample weights per row
  sw_entry = torch.rand(N, C, generator=g, dtype=torch.float64) * 2  # and per entry
  return x, labels, where, soft, probs, sw, sw_entry


class Net(torch.nn.Module):
  """A linear layer whose forward returns one configuration's loss (DDP syncs gradients of
  what forward uses, so the fused linear loss must be called from forward too)."""

  def __init__(self):
    super().__init__()
    self.linear = torch.nn.Linear(H, C).double()

  def forward(self, x, data, group, fn):
    return fn(self.linear, x, data, group)


def make_model():
  torch.manual_seed(1)
  return Net()


def configs(built_before_init=None):
  """(name, function(linear, x, rows, group) -> loss) for every reduction that reduces.

  ``built_before_init``: a ``SoftmaxFocalLoss(process_group="world")`` built before
  ``init_process_group`` (the ranks), used when a group is given; without a group the same
  loss without one (the single process)."""
  alpha = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
  out = []
  for reduction in ("sum", "mean", "mean_positive"):
    out.append((f"softmax-{reduction}", lambda m, x, d, g, r=reduction: focal_torch.softmax_focal(
        m(x), d["labels"], alpha=alpha, gamma=0.5, label_smoothing=0.1, where=d["where"],
        reduction=r, process_group=g)))
    out.append((f"sigmoid-{reduction}", lambda m, x, d, g, r=reduction: focal_torch.sigmoid_focal(
        m(x), d["soft"], alpha=0.25, gamma=2.0, reduction=r, process_group=g)))
    out.append((f"categorical-{reduction}",
                lambda m, x, d, g, r=reduction: focal_torch.categorical_focal(
                    m(x), d["probs"], gamma=1.5, where=d["where"], reduction=r,
                    process_group=g)))
    out.append((f"linear-{reduction}",
                lambda m, x, d, g, r=reduction: focal_torch.linear_softmax_focal(
                    x, m.weight, d["labels"], bias=m.bias, chunk_size=2, alpha=alpha,
                    gamma=0.5, label_smoothing=0.1, where=d["where"], reduction=r,
                    process_group=g)))
  out.append(("module-softmax-mean_positive", lambda m, x, d, g: focal_torch.SoftmaxFocalLoss(
      gamma=2.0, reduction="mean_positive", process_group=g)(m(x), d["labels"])))
  plain = focal_torch.SoftmaxFocalLoss(gamma=2.0, reduction="mean_positive")
  out.append(("module-built-before-init", lambda m, x, d, g: (
      plain if g is None else built_before_init)(m(x), d["labels"])))
  # sample_weight: weights scale each entry; the denominators stay the counts.
  out.append(("softmax-sample_weight-mean_positive",
              lambda m, x, d, g: focal_torch.softmax_focal(
                  m(x), d["labels"], alpha=alpha, gamma=0.5, where=d["where"],
                  sample_weight=d["sw"], reduction="mean_positive", process_group=g)))
  out.append(("sigmoid-sample_weight-mean", lambda m, x, d, g: focal_torch.sigmoid_focal(
      m(x), d["soft"], alpha=0.25, sample_weight=d["sw_entry"], reduction="mean",
      process_group=g)))
  out.append(("categorical-sample_weight-mean",
              lambda m, x, d, g: focal_torch.categorical_focal(
                  m(x), d["probs"], gamma=1.5, where=d["where"], sample_weight=d["sw"],
                  reduction="mean", process_group=g)))
  out.append(("linear-sample_weight-mean", lambda m, x, d, g: focal_torch.linear_softmax_focal(
      x, m.weight, d["labels"], bias=m.bias, chunk_size=2, gamma=0.5, where=d["where"],
      sample_weight=d["sw"], reduction="mean", process_group=g)))
  return out


def rows(lo: int, hi: int):
  x, labels, where, soft, probs, sw, sw_entry = make_data()
  return x[lo:hi], dict(labels=labels[lo:hi], where=where[lo:hi], soft=soft[lo:hi],
                        probs=probs[lo:hi], sw=sw[lo:hi], sw_entry=sw_entry[lo:hi])


def single_process():
  """Value and parameter gradients of every configuration on the whole batch."""
  model = make_model()
  x, data = rows(0, N)
  results = {}
  for name, fn in configs():
    model.zero_grad()
    loss = model(x, data, None, fn)
    loss.backward()
    results[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
  return results


def main(rank: int, world: int, port: int, out_file: str) -> None:
  import torch.distributed as dist  # pylint: disable=import-outside-toplevel
  from torch.nn.parallel import DistributedDataParallel  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(1)
  # Built before init (in a LightningModule's __init__, say): "world" is resolved at call.
  built_before_init = focal_torch.SoftmaxFocalLoss(gamma=2.0, reduction="mean_positive",
                                                   process_group="world")
  dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                          world_size=world, timeout=datetime.timedelta(seconds=60))
  try:
    model = DistributedDataParallel(make_model())
    lo = sum(SPLIT[:rank])
    x, data = rows(lo, lo + SPLIT[rank])
    results = {}
    for name, fn in configs(built_before_init):
      model.zero_grad()
      loss = model(x, data, dist.group.WORLD, fn)
      loss.backward()
      value = loss.detach().clone()
      dist.all_reduce(value)  # the usual recipe: average the value over the group
      results[name] = (value / world, [p.grad.clone() for p in model.module.parameters()])
    torch.save(results, out_file)
  finally:
    dist.destroy_process_group()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
