"""categorical_focal eager and under torch.compile: the extra peak memory of forward +
backward of the mean, against issue 11's limit of 1.5x the logits (the gradient alone is 1.0x).

Eager, each chunk of 2^20 entries works in place (log s becomes s, then the gradient, in the
gradient's own memory; the focal factor and w reuse one buffer each): two chunk-sized buffers
beside the gradient, where there were about eight (a fixed 32 MiB: 2.0x at 2^23 entries, 3.0x
at 2^22). Compiled, the Function's backward starts from inputs made to depend on its cotangent,
so that the partitioner cannot move the gradient before its multiply into the forward and keep
it (one more (N, C) buffer: 2.0x the logits at every C before, 3.5x at C = 2 with the per-row
vectors); the targets, not the row statistics, so that with ``where=`` log s does not read
more buffers than inductor fuses (it was stored whole: 2.0x). Rows of C <= 4 are computed
column by column (no per-row vectors). A few long rows (C > 300 N) and rows of 5 to 8 classes
get W = sum_c w_c from a matrix product, so that the gradient takes w's buffer.
"""

from __future__ import annotations

import sys

import pytest

_PROBE = """
    masked = "WHERE" == "1"
    compiled = c < 0
    c = abs(c)
    torch.manual_seed(0)
    z = (2 * torch.randn(n, c)).requires_grad_()
    y = 0.9 * torch.nn.functional.one_hot(torch.randint(0, c, (n,)), c).float() + 0.1 / c
    where = torch.rand(n) < 0.9 if masked else None
    step = lambda z, y: focal_torch.categorical_focal(z, y, gamma=2.0, where=where)
    if compiled:
      step = torch.compile(step, dynamic=False)
    torch.autograd.grad(step(z, y), z)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("n,c", [(1 << 22, 2), (1 << 13, 1024)])
def test_eager_extra_peak_is_at_most_1_5x_the_logits(ref, n, c):
  # The harness's measure (focal_bench.memory, fresh process) of forward + backward at 2^23
  # float32 entries (32 MiB; 1.25x expected). Before: 2.0x at both.
  peaks = ref.memory_probe(_PROBE, n, c, timeout_s=600)
  assert max(peaks) <= 1.5, peaks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("n,c", [(1 << 21, 2), (1 << 12, 1024), (32, 1 << 17), (838860, 5),
                                 (599186, 7)])
def test_compiled_extra_peak_is_at_most_1_5x_the_logits(ref, n, c):
  # As above, torch.compile(forward + backward) at 2^22 float32 entries. Before: 3.49x
  # (C = 2), 2.00x (C = 1024); 1.99x at (32, 131072), rows more than CPU_LONG_ROWS times as
  # long as there are rows, and 2.33x at C = 6, where inductor unrolls the row sum W: in both
  # it kept w in an (N, C) buffer beside the gradient. Rows of 5 and 6 classes with the two
  # row statistics kept and W were 1.59x and 1.50x (three float32 per row: 3/C of the
  # logits); they are computed column by column now (0.99x). C = 7 keeps them: 1.43x.
  peaks = ref.memory_probe(_PROBE, n, -c, timeout_s=600)
  assert max(peaks) <= 1.5, peaks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("n,c", [(1 << 12, 1024), (1 << 18, 16)])
def test_compiled_extra_peak_with_where_is_at_most_1_5x_the_logits(ref, n, c):
  # As above with where= (90 % of the rows), the mean over them. Before: 1.99x (C = 1024),
  # 2.18x (C = 16): the cotangent, then with the mask and the mean's count, entered log s
  # through the row statistics, five reads, and inductor stored log s whole.
  peaks = ref.memory_probe(_PROBE.replace('"WHERE"', '"1"'), n, -c, timeout_s=600)
  assert max(peaks) <= 1.5, peaks
