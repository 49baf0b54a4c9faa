"""categorical_focal under torch.compile: the extra peak memory of forward + backward.

Compiled, the Function's backward starts from the logits made to depend on its cotangent, so
that the partitioner cannot move the gradient before its multiply into the forward and keep it
(one more (N, C) buffer: 2.0x the logits at every C before, 3.5x at C = 2 with the per-row
vectors). Rows of C <= 4 are computed column by column (no per-row vectors). Issue 11's limit
is 1.5x the logits; the gradient alone is 1.0x.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

_PROBE = textwrap.dedent("""
    import gc, json, sys
    import torch, focal_torch
    from focal_bench import memory
    n, c = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    z = (2 * torch.randn(n, c)).requires_grad_()
    y = 0.9 * torch.nn.functional.one_hot(torch.randint(0, c, (n,)), c).float() + 0.1 / c
    step = torch.compile(lambda z, y: focal_torch.categorical_focal(z, y, gamma=2.0),
                         dynamic=False)
    torch.autograd.grad(step(z, y), z)
    peaks = []
    for _ in range(2):
      gc.collect()
      before = memory.rss_bytes()
      memory.reset_peak_rss()
      torch.autograd.grad(step(z, y), z)
      peaks.append((memory.peak_rss_bytes() - before) / (z.numel() * 4))
    print(json.dumps({"works": memory.rss_peak_works(), "peaks": peaks}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("n,c", [(1 << 21, 2), (1 << 12, 1024)])
def test_compiled_extra_peak_is_at_most_1_5x_the_logits(ref, n, c):
  # The harness's measure (focal_bench.memory, fresh process) of torch.compile(forward +
  # backward of the mean) at 2^22 float32 entries. Before: 3.49x (C = 2), 2.00x (C = 1024).
  peaks = ref.memory_probe(_PROBE, n, c, timeout_s=600)
  assert max(peaks) <= 1.5, peaks
