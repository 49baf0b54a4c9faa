"""``linear_softmax_focal`` (fused linear + softmax focal, never materializing the logits):
JAX and torch agree with each other and with float64 ``softmax_focal(hidden @ kernel + bias)``
in value and in the gradients w.r.t. hidden, kernel and bias."""

from hypothesis import given, strategies as st

from parity_tests.cases import DTYPES, REDUCTIONS
from parity_tests.linear_checks import LinearCase, checks_linear, torch_has_linear

V = 50
_EXACT = st.integers(1, 4 * 64).map(lambda k: k / 64)


@st.composite
def linear_cases(draw):
  return LinearCase(
      n=24, h=16, v=V, dtype=draw(st.sampled_from(DTYPES)),
      alpha=draw(st.none() | _EXACT | st.just(tuple(0.25 + (i % 7) / 4 for i in range(V)))),
      gamma=draw(st.sampled_from([0.0, 0.5, 2.0, tuple(float(i % 4) for i in range(V))])),
      label_smoothing=draw(st.sampled_from([0.0, 0.1])),  # few static values: shared compiles
      mask=draw(st.sampled_from(["none", "where", "ignore", "both"])),
      reduction=draw(st.sampled_from(REDUCTIONS)),
      background_class=draw(st.integers(0, V - 1)), bias=draw(st.booleans()),
      chunk_size=draw(st.sampled_from([None, 5, 24])),
      seed=draw(st.integers(0, 2**31 - 1)))


def _assert_all_ok(checks):
  bad = [c.message() for c in checks if not c.ok]
  assert not bad, "\n".join(bad)


@given(linear_cases())
def test_linear_softmax_focal_jax_and_torch_agree_on_loss_and_grads(case):
  """JAX vs torch and each vs float64 (JAX alone vs float64 while focal_torch lacks it)."""
  with_torch = torch_has_linear()
  checks = checks_linear(case, with_torch=with_torch)
  assert len(checks) == (3 if with_torch else 1)
  _assert_all_ok(checks)
