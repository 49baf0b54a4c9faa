"""Hypothesis strategies for the parity tests (importable: test modules cannot import each
other under ``--import-mode=importlib``).

Shapes come from ``cases.LAYOUTS`` (with both spellings of the class axis of a 2-D array), so
each test compiles a handful of shapes and spends its examples on values, hyperparameters,
masks, reductions and dtypes. Hyperparameters are multiples of 1/64, exact in every dtype.
"""

from __future__ import annotations

from hypothesis import strategies as st

from parity_tests.cases import DTYPES, LAYOUTS, REDUCTIONS, Case
from parity_tests.deepspeed_checks import DSConfig

_EXACT = st.integers(1, 4 * 64).map(lambda k: k / 64)  # (0, 4], exact in float16 too
# Scalar hyperparameters are static under jit (one compile per value): drawn from small sets so
# that examples share compiled code and spend their time on structure and data.
_GAMMAS = st.sampled_from((0.0, 0.25, 0.5, 1.0, 2.0, 3.5, 5.0))
_ALPHAS = st.sampled_from((0.25, 0.5, 1.0, 2.0))
_SMOOTHING = st.sampled_from((0.0, 0.05, 0.1, 0.3))


def _layouts(big: bool):
  (n_c, _), four_d, many = LAYOUTS
  out = [(n_c, -1), (n_c, 1), four_d]
  return out + [many] if big else out


@st.composite
def cases(draw, fns=("softmax_focal", "sigmoid_focal", "categorical_focal"), dtypes=DTYPES,
          reductions=REDUCTIONS, big: bool = False, scales=(0.5, 3.0, 8.0)) -> Case:
  """Any call of the three losses that both packages accept."""
  fn = draw(st.sampled_from(fns))
  shape, axis = draw(st.sampled_from(_layouts(big)))
  c = shape[axis]
  if fn == "sigmoid_focal":
    alpha = draw(st.none() | st.sampled_from((0.0, 0.25, 0.5, 0.75, 1.0)))
    gamma = draw(_GAMMAS)
  else:
    alpha = draw(st.none() | _ALPHAS | st.tuples(*[_EXACT] * c))
    gamma = draw(_GAMMAS | st.tuples(*[st.integers(0, 5 * 16).map(lambda k: k / 16)] * c))
  eps = 0.0
  if fn != "categorical_focal":
    eps = draw(_SMOOTHING)
  if fn == "softmax_focal":
    mask = draw(st.sampled_from(("none", "where", "ignore", "both")))
  else:
    mask = draw(st.sampled_from(("none", "where")))
  background = draw(st.integers(0, c - 1)) if fn != "sigmoid_focal" else 0
  return Case(fn, shape, axis=axis, dtype=draw(st.sampled_from(dtypes)), alpha=alpha,
              gamma=gamma, label_smoothing=eps, reduction=draw(st.sampled_from(reductions)),
              mask=mask, background_class=background, soft=draw(st.booleans()),
              scale=draw(st.sampled_from(scales)), seed=draw(st.integers(0, 2**31 - 1)))


@st.composite
def deepspeed_configs(draw, alpha_kinds=("none", "col"), dtypes=("float32", "float64")):
  """DeepSpeed-style calls on the sweep's (N, C) shapes."""
  n, c = draw(st.sampled_from(((16, 7), (8, 91))))
  return DSConfig(n=n, c=c, dtype=draw(st.sampled_from(dtypes)),
                  alpha_kind=draw(st.sampled_from(alpha_kinds)),
                  gamma=draw(_GAMMAS),
                  size_average=draw(st.booleans()),
                  scale=draw(st.sampled_from((0.5, 3.0, 8.0))),
                  seed=draw(st.integers(0, 2**31 - 1)))
