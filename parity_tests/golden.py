"""Loaders for the recorded reference values in ``parity_tests/data``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
DEEPSPEED_NPZ = DATA_DIR / "deepspeed_focal_loss.npz"
TORCHVISION_NPZ = DATA_DIR / "torchvision_sigmoid_focal.npz"


@dataclasses.dataclass(frozen=True)
class DeepSpeedCase:
  """One call of the real DeepSpeed ``FocalLoss``: its inputs and what it returned."""

  case: int
  logits: np.ndarray  # (n, c), float32 or float64
  targets: np.ndarray  # (n,), int64
  alpha: np.ndarray | None  # (c, 1) "col", (c,) "vec", None "none"
  alpha_kind: str
  gamma: float
  size_average: bool
  logit_scale: float
  loss: np.ndarray  # ()
  grad: np.ndarray  # (n, c)
  loss_finite: bool
  grad_finite: bool

  @property
  def dtype(self) -> np.dtype:
    return self.logits.dtype

  @property
  def finite(self) -> bool:
    return self.loss_finite and self.grad_finite


def load_deepspeed_cases(path: Path | str = DEEPSPEED_NPZ) -> list[DeepSpeedCase]:
  """All recorded DeepSpeed cases, in recording order."""
  with np.load(path) as data:
    meta = json.loads(str(data["meta"]))
    cases = []
    for m in meta:
      i = m["case"]
      alpha = data[f"{i}/alpha"] if f"{i}/alpha" in data else None
      cases.append(DeepSpeedCase(
          case=i, logits=data[f"{i}/logits"], targets=data[f"{i}/targets"], alpha=alpha,
          alpha_kind=m["alpha_kind"], gamma=float(m["gamma"]),
          size_average=bool(m["size_average"]), logit_scale=float(m["logit_scale"]),
          loss=data[f"{i}/loss"], grad=data[f"{i}/grad"],
          loss_finite=bool(m["loss_finite"]), grad_finite=bool(m["grad_finite"])))
  return cases


@dataclasses.dataclass(frozen=True)
class TorchvisionCase:
  """One call of torchvision's ``sigmoid_focal_loss``: inputs, cotangent and outputs."""

  case: int
  logits: np.ndarray
  labels: np.ndarray
  cotangent: np.ndarray
  alpha: float  # -1.0: no weighting
  gamma: float
  reduction: str
  soft: bool
  loss: np.ndarray
  grad: np.ndarray

  @property
  def dtype(self) -> np.dtype:
    return self.logits.dtype


def load_torchvision_cases(path: Path | str = TORCHVISION_NPZ) -> list[TorchvisionCase]:
  """All recorded torchvision cases, in recording order."""
  with np.load(path) as data:
    meta = json.loads(str(data["meta"]))
    return [TorchvisionCase(
        case=m["case"], logits=data[f"{m['case']}/logits"], labels=data[f"{m['case']}/labels"],
        cotangent=data[f"{m['case']}/cotangent"], alpha=float(m["alpha"]),
        gamma=float(m["gamma"]), reduction=m["reduction"], soft=bool(m["soft"]),
        loss=data[f"{m['case']}/loss"], grad=data[f"{m['case']}/grad"]) for m in meta]
