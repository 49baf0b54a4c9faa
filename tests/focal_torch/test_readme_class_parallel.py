"""README's torch tensor-parallel example ("Classes split across devices"), run as written.

The snippet runs under ``torch.distributed.run`` with 4 gloo ranks on loopback (2 data replicas
x 2 class ranks), then each rank saves its loss and its parameters' gradients. They must equal
one process on the whole problem in float64 (``focal_reference``'s formula through torch
autograd, the full (V, H) head): the loss each rank returns is the data-parallel share
``DP * sum_d / N_total`` (docs/design.md, "Across devices and processes"), the trunk's gradient
(DDP-averaged, after the hook summed ``hidden``'s shares over the class group) is the whole
batch's, and each rank's head slice holds its rows of the whole head gradient.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import focal_reference

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
ROOT = README.parent

pytestmark = [pytest.mark.xdist_group("procs"),
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="torch.distributed is not available")]

_DUMP = """

# ---- appended by the test: what each rank holds after the step
import sys as _sys
_m = model.module
torch.save({"loss": loss.detach(), "head_w": _m.head.weight.grad, "head_b": _m.head.bias.grad,
            "trunk_w": _m.trunk[0].weight.grad, "trunk_b": _m.trunk[0].bias.grad,
            "lo": lo, "hi": hi, "d": d},
           f"{_sys.argv[1]}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


def _snippet() -> str:
  text = README.read_text()
  start = text.index("### torch: `class_process_group=`")
  end = text.find("\n## ", start)
  blocks = re.findall(r"```python\n(.*?)```", text[start:end if end >= 0 else None], re.S)
  (snippet,) = [b for b in blocks if "class_process_group=class_group" in b]
  return snippet


def test_readme_torch_tensor_parallel_example(tmp_path, ref):
  script = tmp_path / "train.py"
  script.write_text(_snippet() + _DUMP)
  cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4",
         "--master-addr=127.0.0.1", f"--master-port={ref.free_port()}", str(script),
         str(tmp_path)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]

  # One process, float64: the same initialization and data as the snippet.
  feat, hid, vocab, rows = 64, 512, 32000, 256
  torch.manual_seed(0)
  trunk = nn.Sequential(nn.Linear(feat, hid), nn.GELU()).double()
  full = nn.Linear(hid, vocab).double()
  xs, ls = [], []
  for d in range(2):
    g = torch.Generator().manual_seed(100 + d)
    xs.append(torch.randn(rows, feat, generator=g))
    ls.append(torch.randint(0, vocab, (rows,), generator=g))
  x, labels = torch.cat(xs).double(), torch.cat(ls)
  z = full(trunk(x))
  per_row = focal_reference.softmax_focal(z, labels, gamma=2.0, label_smoothing=0.1)
  per_row.mean().backward()
  per_row = per_row.detach()

  def close(got, want, what):
    want = want.detach().numpy()
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max(), err_msg=what)

  for r, got in enumerate(ranks):
    d, lo, hi = got["d"], got["lo"], got["hi"]
    share = 2 * per_row[d * rows:(d + 1) * rows].sum() / (2 * rows)
    close(got["loss"], share, f"rank {r}: loss")
    close(got["trunk_w"], trunk[0].weight.grad, f"rank {r}: trunk weight gradient")
    close(got["trunk_b"], trunk[0].bias.grad, f"rank {r}: trunk bias gradient")
    close(got["head_w"], full.weight.grad[lo:hi], f"rank {r}: head weight rows {lo}:{hi}")
    close(got["head_b"], full.bias.grad[lo:hi], f"rank {r}: head bias entries {lo}:{hi}")
