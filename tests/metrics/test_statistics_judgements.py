import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmed.metrics import max_normalize, two_afc_score

# Tests reuse a few shapes ((9,), (3, 4, 101)): every new shape costs a compilation.


def _lpips_2afc(d0, d1, judge):
  """Per-triplet 2AFC scores as in LPIPS ``score_2afc_dataset``, in float64."""
  return (d0 < d1) * (1.0 - judge) + (d1 < d0) * judge + (d1 == d0) * 0.5


def test_two_afc_hand_example():
  d0, d1 = np.array([1.0, 2.0, 3.0, 0.5]), np.array([2.0, 1.0, 3.0, 0.7])
  judge = np.array([0.2, 0.7, 0.4, 1.0])
  # Agree with the 80% who chose p0; with the 70% who chose p1; tie -> 1/2; disagree with all.
  assert float(two_afc_score(d0, d1, judge)) == pytest.approx((0.8 + 0.7 + 0.5 + 0.0) / 4)


@pytest.mark.parametrize("shape", [(9,), (3, 4, 101)])
def test_two_afc_matches_lpips_formula(shape):
  rng = np.random.default_rng(shape[-1])
  d0 = np.round(rng.uniform(size=shape), 1).astype(np.float32)  # rounding makes ties
  d1 = np.round(rng.uniform(size=shape), 1).astype(np.float32)
  judge = rng.choice([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], size=shape).astype(np.float32)
  ours = np.asarray(two_afc_score(d0, d1, judge))
  assert ours.shape == shape[:-1] and ours.dtype == np.float32
  expected = _lpips_2afc(d0, d1, judge.astype(np.float64)).mean(-1)
  np.testing.assert_allclose(ours, expected, rtol=1e-6)


_unit = st.floats(0, 1, width=32)


@settings(max_examples=25, deadline=None)
@given(d0=hnp.arrays(np.float32, 9, elements=st.integers(0, 4).map(float)),
       data=st.data())
def test_two_afc_swap_symmetry(d0, data):
  d1 = data.draw(hnp.arrays(np.float32, d0.shape, elements=st.integers(0, 4).map(float)))
  judge = data.draw(hnp.arrays(np.float32, d0.shape, elements=_unit))
  score = float(two_afc_score(d0, d1, judge))
  assert score == pytest.approx(float(two_afc_score(d1, d0, 1 - judge)), abs=1e-6)
  assert 0 <= score <= 1
  # Identical distances always score 1/2.
  assert float(two_afc_score(d0, d0, judge)) == pytest.approx(0.5)


def test_max_normalize():
  d = np.array([[2.0, 4.0, 1.0], [0.0, 0.0, 0.0], [0.0, 3.0, 3.0]], np.float32)
  out = np.asarray(max_normalize(d))
  assert out.dtype == np.float32 and out.shape == d.shape
  np.testing.assert_allclose(out, [[0.5, 1.0, 0.25], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
  rng = np.random.default_rng(0)
  d = rng.uniform(0, 50, (3, 4, 101)).astype(np.float32)
  np.testing.assert_allclose(max_normalize(d), d / d.max(-1, keepdims=True), rtol=1e-6)
  assert max_normalize(np.zeros((2, 0))).shape == (2, 0)


def test_bad_input():
  ok = np.array([0.1, 0.2])
  with pytest.raises(ValueError, match="two_afc_score: judge must lie in"):
    two_afc_score(ok, ok, np.array([0.5, 1.5]))
  with pytest.raises(ValueError, match="two_afc_score: judge must lie in"):
    two_afc_score(ok, ok, np.array([-0.1, 0.5]))
  with pytest.raises(ValueError, match=r"two_afc_score: d0 shape \(2,\) != judge shape \(3,\)"):
    two_afc_score(ok, ok, np.zeros(3))
  with pytest.raises(ValueError, match=r"two_afc_score: d0 shape \(2,\) != d1 shape \(1, 2\)"):
    two_afc_score(ok, ok[None], ok)
  with pytest.raises(ValueError, match="two_afc_score: d1 contains NaN"):
    two_afc_score(ok, np.array([np.nan, 0.1]), ok)
  with pytest.raises(ValueError, match="two_afc_score: d0 must be .* at least 1 axis"):
    two_afc_score(0.1, 0.2, 0.5)
  with pytest.raises(ValueError, match="max_normalize: d must be non-negative"):
    max_normalize(np.array([0.3, -0.1]))
  with pytest.raises(ValueError, match="max_normalize: d contains NaN or Inf"):
    max_normalize(np.array([0.3, np.inf]))
  with pytest.raises(ValueError, match="max_normalize: d must be .* at least 1 axis"):
    max_normalize(np.float32(2.0))


def test_under_jit():
  rng = np.random.default_rng(1)
  d0, d1, judge = rng.uniform(size=(3, 9)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(two_afc_score)(d0, d1, judge), two_afc_score(d0, d1, judge))
  np.testing.assert_allclose(jax.jit(max_normalize)(d0), max_normalize(d0))
