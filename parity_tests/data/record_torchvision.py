"""Record ``torchvision.ops.sigmoid_focal_loss`` values into ``torchvision_sigmoid_focal.npz``.

torchvision's Linux wheels on PyPI are built against CUDA torch; with a CPU-only torch its
package ``__init__`` fails to register its compiled operators (``operator torchvision::nms does
not exist``), so CI cannot import it. Its focal loss is pure Python, so this script records
what that function returns, once, as data (like the DeepSpeed file):

    pip install --no-deps --target /tmp/tv torchvision==0.28.0
    python parity_tests/data/record_torchvision.py /tmp/tv

If ``import torchvision.ops`` works (a matching torch + torchvision), that is used. Otherwise
the function is loaded from ``<site>/torchvision/ops/focal_loss.py`` itself, with a stand-in
for the one helper it imports (``torchvision.utils._log_api_usage_once``, an API-usage logger
that does not touch the numbers). The recorded function is torchvision's own code either way.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "torchvision_sigmoid_focal.npz"


def load_sigmoid_focal_loss(site: str | None):
  try:
    if site:
      sys.path.insert(0, site)
    from torchvision.ops import sigmoid_focal_loss
    import torchvision
    return sigmoid_focal_loss, torchvision.__version__, "import torchvision.ops"
  except Exception as e:  # noqa: BLE001 (any import failure: fall back to the file)
    reason = f"{type(e).__name__}: {e}"
  for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[mod]
  root = Path(site) / "torchvision"
  pkg = types.ModuleType("torchvision")
  pkg.__path__ = [str(root)]
  ops = types.ModuleType("torchvision.ops")
  ops.__path__ = [str(root / "ops")]
  utils = types.ModuleType("torchvision.utils")
  utils._log_api_usage_once = lambda obj: None
  sys.modules.update({"torchvision": pkg, "torchvision.ops": ops, "torchvision.utils": utils})
  spec = importlib.util.spec_from_file_location("torchvision.ops.focal_loss",
                                                root / "ops" / "focal_loss.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  version = (root / "version.py").read_text().split("__version__ = ")[1].split("\n")[0]
  return module.sigmoid_focal_loss, version.strip("'\""), f"focal_loss.py ({reason})"


def main(argv: list[str]) -> None:
  site = argv[1] if len(argv) > 1 else None
  fn, version, how = load_sigmoid_focal_loss(site)
  rng = np.random.default_rng(20240601)
  shapes = [(16,), (8, 5), (2, 3, 4, 4)]
  grid = itertools.product(shapes, ("float32", "float64"), (-1.0, 0.25, 0.6),
                           (0.0, 0.5, 2.0, 3.0), ("none", "mean", "sum"), (False, True))
  arrays, meta = {}, []
  for i, (shape, dtype, alpha, gamma, reduction, soft) in enumerate(grid):
    if rng.random() > 0.25:  # a quarter of the full grid keeps the file small
      continue
    k = len(meta)
    scale = float(rng.choice([0.5, 2.0, 4.0]))
    x64 = (rng.standard_normal(shape) * scale).astype(np.float32).astype(np.float64)
    y = (np.round(rng.random(shape) * 8) / 8) if soft else (rng.random(shape) < 0.3) * 1.0
    w = np.round(rng.uniform(0.5, 1.5, shape) * 32) / 32 if reduction == "none" else np.ones(())
    td = getattr(torch, dtype)
    x = torch.tensor(x64, dtype=td, requires_grad=True)
    loss = fn(x, torch.tensor(y, dtype=td), alpha=alpha, gamma=gamma, reduction=reduction)
    loss.backward(torch.tensor(w, dtype=td))
    arrays.update({f"{k}/logits": x64.astype(dtype), f"{k}/labels": y.astype(dtype),
                   f"{k}/cotangent": w.astype(dtype), f"{k}/loss": loss.detach().numpy(),
                   f"{k}/grad": x.grad.numpy()})
    meta.append({"case": k, "shape": list(shape), "dtype": dtype, "alpha": alpha,
                 "gamma": gamma, "reduction": reduction, "soft": soft, "logit_scale": scale})
  arrays["meta"] = np.array(json.dumps(meta))
  arrays["source"] = np.array(json.dumps({"torchvision": version, "torch": torch.__version__,
                                          "loaded_by": how}))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {len(meta)} cases to {OUT} (torchvision {version}, torch {torch.__version__}, "
        f"via {how})")


if __name__ == "__main__":
  main(sys.argv)
