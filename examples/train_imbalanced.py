"""Cross-entropy vs focal loss on long-tailed handwritten digits, in JAX and in torch.

The data is scikit-learn's digits (8x8 images, 10 classes, ships with scikit-learn: no
download). A balanced held-out set (TEST_PER_CLASS images per digit) is split off first; the
rest is made long-tailed by keeping ``round(HEAD * imbalance ** (-k / 9))`` training images of
digit k (digit 0 keeps HEAD=100, digit 9 keeps 100 / imbalance; 50:1 by default), subsampled
deterministically from ``--data-seed``.

The same MLP (64-128-10, ReLU) is trained from the same initial weights on the same minibatches
in Flax NNX + optax and in torch, with three losses:

- ``ce``: plain cross-entropy (``optax.softmax_cross_entropy_with_integer_labels``,
  ``F.cross_entropy``);
- ``wce``: cross-entropy weighted by alpha (the framework's own cross-entropy times
  ``alpha[label]``, mean over the batch), to separate what alpha does from what gamma does;
- ``focal``: ``focal_jax.softmax_focal`` / ``focal_torch.SoftmaxFocalLoss`` with gamma 2 and
  the same alpha.

alpha comes from inverse class frequency, ``alpha_c = N / (C * n_c)`` (mean 1 over the
training samples, so the loss scale stays comparable to cross-entropy). Metrics on the held-out
set:
per-class recall, balanced accuracy (the mean of the recalls) and macro-F1, averaged over
``--seeds`` training seeds (initial weights and minibatch order; the data split is fixed).

Usage:
  python examples/train_imbalanced.py --out out/imbalanced            # 5 seeds, 200 epochs
  python examples/train_imbalanced.py --out out/imbalanced --quick    # 1 seed, 60 epochs

Writes ``loss_curves.png``, ``per_class_recall.png`` and ``metrics.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score
from tqdm.auto import tqdm

import focal_jax
import focal_torch

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

HEAD = 100
TEST_PER_CLASS = 50
HIDDEN = 128
N_CLASSES = 10
LOSSES = ("ce", "wce", "focal")
FRAMEWORKS = ("jax", "torch")
RUNS = [(fw, loss) for fw in FRAMEWORKS for loss in LOSSES]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/train_imbalanced"),
                 help="folder for the PNG plots and metrics.json")
  p.add_argument("--quick", action="store_true", help="1 seed, 60 epochs (under a minute)")
  p.add_argument("--imbalance", type=float, default=50.0,
                 help="training images of digit 0 / of digit 9 (default 50)")
  p.add_argument("--seeds", type=int, default=None, help="training seeds (default 5; quick 1)")
  p.add_argument("--epochs", type=int, default=None, help="epochs (default 200; quick 60)")
  p.add_argument("--gamma", type=float, default=2.0, help="focal gamma (default 2)")
  p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--data-seed", type=int, default=0, help="seed of the split and subsampling")
  args = p.parse_args(argv)
  if args.seeds is None:
    args.seeds = 1 if args.quick else 5
  if args.epochs is None:
    args.epochs = 60 if args.quick else 200
  return args


# --------------------------------------------------------------------------------------- data


def long_tailed_digits(imbalance: float, seed: int) -> tuple[np.ndarray, ...]:
  """(x_train, y_train, x_test, y_test, train_counts): balanced test set, long-tailed train."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)  # pixel values 0..16 -> 0..1
  y = digits.target.astype(np.int64)
  rng = np.random.default_rng(seed)
  counts = [int(round(HEAD * imbalance ** (-k / (N_CLASSES - 1)))) for k in range(N_CLASSES)]
  train_idx, test_idx = [], []
  for k in range(N_CLASSES):
    idx = rng.permutation(np.flatnonzero(y == k))
    test_idx.append(idx[:TEST_PER_CLASS])
    train_idx.append(idx[TEST_PER_CLASS:TEST_PER_CLASS + counts[k]])
  train_idx = np.concatenate(train_idx)
  test_idx = np.concatenate(test_idx)
  return x[train_idx], y[train_idx], x[test_idx], y[test_idx], np.array(counts)


def inverse_frequency_alpha(counts: np.ndarray) -> np.ndarray:
  """alpha_c = N / (C * n_c): inverse class frequency, mean 1 over the training samples."""
  return (counts.sum() / (len(counts) * counts)).astype(np.float32)


def init_weights(seed: int) -> list[np.ndarray]:
  """He-uniform weights [W1 (64, H), b1, W2 (H, 10), b2], shared by both frameworks."""
  rng = np.random.default_rng(seed)
  def dense(n_in: int, n_out: int) -> np.ndarray:
    bound = np.sqrt(6.0 / n_in)
    return rng.uniform(-bound, bound, size=(n_in, n_out)).astype(np.float32)
  return [dense(64, HIDDEN), np.zeros(HIDDEN, np.float32), dense(HIDDEN, N_CLASSES),
          np.zeros(N_CLASSES, np.float32)]


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[np.ndarray]]:
  """Minibatch indices for every epoch (the last batch of an epoch may be smaller)."""
  rng = np.random.default_rng(seed + 1000)
  return [np.array_split(perm, range(batch_size, n, batch_size))
          for perm in (rng.permutation(n) for _ in range(epochs))]


# ---------------------------------------------------------------------------------- training


class MLP(nnx.Module):
  """64-HIDDEN-10 ReLU MLP in Flax NNX (torch: Linear, ReLU, Linear)."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, HIDDEN, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, N_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(jax.nn.relu(self.hidden(x)))


def train_jax(loss: str, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray,
              x_test: np.ndarray, batches: list[list[np.ndarray]], alpha: np.ndarray,
              gamma: float, lr: float, progress: tqdm) -> tuple[np.ndarray, np.ndarray]:
  """Flax NNX + optax. Returns (mean training loss per epoch, held-out predictions)."""
  model = MLP(nnx.Rngs(0))
  for var, w in zip([model.hidden.kernel, model.hidden.bias, model.out.kernel, model.out.bias],
                    weights):
    var[...] = jnp.asarray(w)
  optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
  alpha = jnp.asarray(alpha)

  def loss_fn(model, xb, yb):
    logits = model(xb)
    if loss == "ce":
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    if loss == "wce":
      return (alpha[yb] * optax.softmax_cross_entropy_with_integer_labels(logits, yb)).mean()
    return focal_jax.softmax_focal(logits, yb, alpha=alpha, gamma=gamma, reduction="mean")

  @nnx.jit
  def step(model, optimizer, xb, yb):
    value, grads = nnx.value_and_grad(loss_fn)(model, xb, yb)
    optimizer.update(model, grads)
    return value

  curve = []
  for epoch in batches:
    total = 0.0
    for idx in epoch:
      total += float(step(model, optimizer, jnp.asarray(x[idx]), jnp.asarray(y[idx]))) * len(idx)
    curve.append(total / len(y))
    progress.set_postfix_str(f"jax/{loss} loss {curve[-1]:.4f}", refresh=False)
    progress.update(1)
  predictions = np.asarray(jnp.argmax(model(jnp.asarray(x_test)), axis=-1))
  return np.array(curve), predictions


def train_torch(loss: str, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray,
                x_test: np.ndarray, batches: list[list[np.ndarray]], alpha: np.ndarray,
                gamma: float, lr: float, progress: tqdm) -> tuple[np.ndarray, np.ndarray]:
  """torch + focal_torch. Returns (mean training loss per epoch, held-out predictions)."""
  hidden, out = torch.nn.Linear(64, HIDDEN), torch.nn.Linear(HIDDEN, N_CLASSES)
  model = torch.nn.Sequential(hidden, torch.nn.ReLU(), out)
  with torch.no_grad():
    for p, w in zip([hidden.weight, hidden.bias, out.weight, out.bias], weights):
      p.copy_(torch.from_numpy(w.T.copy() if w.ndim == 2 else w))  # torch stores (out, in)
  optimizer = torch.optim.Adam(model.parameters(), lr=lr)
  alpha_t = torch.from_numpy(alpha)
  xt, yt = torch.from_numpy(x), torch.from_numpy(y)
  if loss == "ce":
    criterion = torch.nn.CrossEntropyLoss()
  elif loss == "wce":  # not CrossEntropyLoss(weight=): that divides by the sum of the weights
    def criterion(logits, labels):
      return (alpha_t[labels] * F.cross_entropy(logits, labels, reduction="none")).mean()
  else:
    criterion = focal_torch.SoftmaxFocalLoss(alpha=alpha_t, gamma=gamma, reduction="mean")

  curve = []
  for epoch in batches:
    total = 0.0
    for idx in epoch:
      idx = torch.from_numpy(idx)
      value = criterion(model(xt[idx]), yt[idx])
      optimizer.zero_grad()
      value.backward()
      optimizer.step()
      total += value.item() * len(idx)
    curve.append(total / len(y))
    progress.set_postfix_str(f"torch/{loss} loss {curve[-1]:.4f}", refresh=False)
    progress.update(1)
  with torch.no_grad():
    predictions = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
  return np.array(curve), predictions


# ----------------------------------------------------------------------------------- metrics


def metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
  labels = list(range(N_CLASSES))
  return {
      "recall": recall_score(y_true, y_pred, labels=labels, average=None,
                             zero_division=0).tolist(),
      "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
      "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro",
                                 zero_division=0)),
  }


def summarize(per_seed: dict[str, list[dict]]) -> dict:
  """Mean and standard deviation over seeds of every metric of every run."""
  out = {}
  for run, ms in per_seed.items():
    recall = np.array([m["recall"] for m in ms])
    bacc = np.array([m["balanced_accuracy"] for m in ms])
    f1 = np.array([m["macro_f1"] for m in ms])
    out[run] = {"recall_mean": recall.mean(0).tolist(), "recall_std": recall.std(0).tolist(),
                "balanced_accuracy_mean": float(bacc.mean()),
                "balanced_accuracy_std": float(bacc.std()),
                "macro_f1_mean": float(f1.mean()), "macro_f1_std": float(f1.std()),
                "per_seed": ms}
  return out


def print_report(summary: dict, counts: np.ndarray, seeds: int) -> None:
  names = [f"{fw}/{loss}" for fw, loss in RUNS]
  print(f"\nheld-out results, mean over {seeds} seed(s)"
        + (" (± std over seeds)" if seeds > 1 else ""))
  print(f"{'digit (n_train)':<17}" + "".join(f"{n:>13}" for n in names))
  for k in range(N_CLASSES):
    print(f"{f'recall {k} ({counts[k]})':<17}" + "".join(
        f"{summary[n]['recall_mean'][k]:>13.3f}" for n in names))
  for label, key in (("balanced accuracy", "balanced_accuracy"), ("macro-F1", "macro_f1")):
    cells = []
    for n in names:
      cell = f"{summary[n][key + '_mean']:.3f}"
      if seeds > 1:
        cell += f"±{summary[n][key + '_std']:.3f}"
      cells.append(f"{cell:>13}")
    print(f"{label:<17}" + "".join(cells))


# ------------------------------------------------------------------------------------- plots


def plot(out: pathlib.Path, curves: dict[str, np.ndarray], summary: dict, counts: np.ndarray,
         imbalance: float, seeds: int) -> list[pathlib.Path]:
  titles = {"ce": "cross-entropy", "wce": "alpha-weighted cross-entropy",
            "focal": "focal (gamma 2, same alpha)"}
  paths = []
  fig, axes = plt.subplots(1, len(LOSSES), figsize=(13, 4))
  for ax, loss in zip(axes, LOSSES):
    for fw, style, color, lw in (("jax", "-", "tab:blue", 3.0), ("torch", "--", "tab:orange", 1.5)):
      c = curves[f"{fw}/{loss}"]  # (seeds, epochs)
      ax.plot(np.arange(1, c.shape[1] + 1), c.mean(0), style, color=color, lw=lw,
              label="Flax NNX + optax" if fw == "jax" else "torch")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss")
    ax.set_title(titles[loss])
    ax.grid(alpha=0.3, which="both")
    ax.legend()
  fig.suptitle(f"Training loss: same initial weights and minibatches in both frameworks "
               f"(mean over {seeds} seed(s))")
  fig.tight_layout()
  paths.append(out / "loss_curves.png")
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(12, 4.8))
  width = 0.27
  xs = np.arange(N_CLASSES)
  colors = {"ce": "0.6", "wce": "tab:blue", "focal": "tab:orange"}
  for i, loss in enumerate(LOSSES):
    jx, tr = summary[f"jax/{loss}"], summary[f"torch/{loss}"]
    pos = xs + (i - 1) * width
    ax.bar(pos, jx["recall_mean"], width, yerr=jx["recall_std"] if seeds > 1 else None,
           color=colors[loss], edgecolor="black", linewidth=0.5, capsize=2, ecolor="0.3",
           label=f"{titles[loss]}: balanced accuracy {jx['balanced_accuracy_mean']:.3f} (JAX), "
                 f"{tr['balanced_accuracy_mean']:.3f} (torch)")
    ax.plot(pos, tr["recall_mean"], "k_", ms=14, mew=2,
            label="torch (bars: JAX)" if i == len(LOSSES) - 1 else None)
  ax.set_xticks(xs, [f"{k}\nn={counts[k]}" for k in range(N_CLASSES)])
  ax.set_xlabel("digit (training images)")
  ax.set_ylabel("held-out recall")
  ax.set_ylim(0, 1.3)
  ax.set_title(f"Per-class recall on a balanced held-out set ({TEST_PER_CLASS} per digit); "
               f"training set {imbalance:g}:1 long-tailed; mean over {seeds} seed(s)")
  ax.legend(loc="upper right", fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  paths.append(out / "per_class_recall.png")
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  return paths


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  start = time.perf_counter()
  # Tiny matmuls: extra intra-op threads only add synchronization overhead.
  torch.set_num_threads(1)
  x, y, x_test, y_test, counts = long_tailed_digits(args.imbalance, args.data_seed)
  alpha = inverse_frequency_alpha(counts)
  print(f"digits, long-tailed training set: {len(y)} images, imbalance "
        f"{counts.max() / counts.min():g}:1, per digit 0..9: {' '.join(map(str, counts))}")
  print(f"balanced held-out set: {len(y_test)} images ({TEST_PER_CLASS} per digit)")
  print(f"focal: gamma {args.gamma:g}, alpha = N / (C n_c): "
        f"{' '.join(f'{a:.2f}' for a in alpha)}")
  print(f"MLP 64-{HIDDEN}-10, Adam lr {args.lr:g}, batch {args.batch_size}, "
        f"{args.epochs} epochs, {args.seeds} seed(s); frameworks: Flax NNX + optax, torch")

  per_seed = {f"{fw}/{loss}": [] for fw, loss in RUNS}
  curves = {f"{fw}/{loss}": [] for fw, loss in RUNS}
  trainers = {"jax": train_jax, "torch": train_torch}
  with tqdm(total=args.seeds * len(RUNS) * args.epochs, unit="epoch", file=sys.stderr,
            desc="training", mininterval=1.0) as progress:
    for seed in range(args.seeds):
      weights = init_weights(seed)
      batches = epoch_batches(len(y), args.batch_size, args.epochs, seed)
      for fw, loss in RUNS:
        curve, pred = trainers[fw](loss, weights, x, y, x_test, batches, alpha, args.gamma,
                                   args.lr, progress)
        curves[f"{fw}/{loss}"].append(curve)
        per_seed[f"{fw}/{loss}"].append(metrics(y_test, pred))

  summary = summarize(per_seed)
  print_report(summary, counts, args.seeds)
  args.out.mkdir(parents=True, exist_ok=True)
  curves = {k: np.stack(v) for k, v in curves.items()}
  paths = plot(args.out, curves, summary, counts, args.imbalance, args.seeds)
  with open(args.out / "metrics.json", "w") as f:
    json.dump({"config": {k: str(v) if isinstance(v, pathlib.Path) else v
                          for k, v in vars(args).items()},
               "train_counts": counts.tolist(), "alpha": alpha.tolist(),
               "results": summary,
               "loss_curves": {k: v.mean(0).tolist() for k, v in curves.items()}}, f, indent=1)
  paths.append(args.out / "metrics.json")
  print(f"\nwrote {', '.join(str(p) for p in paths)} "
        f"(training, evaluation and plots took {time.perf_counter() - start:.1f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
