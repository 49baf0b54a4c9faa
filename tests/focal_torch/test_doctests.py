"""Every example in the focal_torch docstrings runs and prints what it says (issue 13, item
11), as tests/focal_jax/test_package.py does for focal_jax."""

from __future__ import annotations

import doctest

import pytest
import torch

import focal_torch
from focal_torch import _checks
from focal_torch import _linear
from focal_torch import deepspeed
from focal_torch import functional
from focal_torch import modules


@pytest.mark.parametrize("module", [functional, _linear, modules, deepspeed, _checks],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run_and_print_what_they_say(module):
  torch.manual_seed(0)
  result = doctest.testmod(module, extraglobs={"torch": torch, "focal_torch": focal_torch},
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0
  assert result.failed == 0
