"""Two gloo ranks under DistributedDataParallel on loopback, positives spread unevenly: the
group-averaged value and the DDP gradients equal the single-process ones on the whole batch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_ddp_worker.py")
TIMEOUT_S = 180


def _load_worker():
  spec = importlib.util.spec_from_file_location("_focal_torch_ddp_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_gloo_ranks_under_ddp_equal_single_process(ref, tmp_path):
  worker = _load_worker()
  ranks = ref.spawn_ranks(WORKER, 2, tmp_path, TIMEOUT_S)

  want = worker.single_process()
  assert set(ranks[0]) == set(want) and len(want) == 18
  for name, (value, grads) in want.items():
    for got in ranks:
      got_value, got_grads = got[name]
      torch.testing.assert_close(got_value, value, rtol=1e-13, atol=1e-15, msg=name)
      for g_got, g_want in zip(got_grads, grads):
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-15, msg=name)
    assert value.abs() > 0 and any((g != 0).any() for g in grads)  # a real signal, not 0 = 0
