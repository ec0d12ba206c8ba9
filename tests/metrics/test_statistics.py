import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from jaxmed.metrics import linear_cka, pearson, spearman

# Tests reuse a few shapes ((8,), (3, 4, n), (8, 4) / (8, 5)): every new shape costs a compilation.


def _rows(*arrays):
  return zip(*(a.reshape(-1, a.shape[-1]) for a in arrays))


@pytest.mark.parametrize("n", [8, 101])
def test_pearson_spearman_match_scipy(n):
  rng = np.random.default_rng(n)
  noise = rng.normal(size=(4, n))
  ints = rng.integers(0, 4, (4, n))
  ints[:, 0], ints[:, -1] = 0, 3  # not constant
  x = np.stack([noise, 1e3 + noise, ints])  # plain, large offset, integer values with ties
  y = np.stack([0.6 * noise + rng.normal(size=(4, n)), 1e3 - 0.3 * noise + rng.normal(size=(4, n)),
                ints + rng.integers(0, 3, (4, n))])
  x, y = x.astype(np.float32), y.astype(np.float32)
  # scipy on the same float32 values, computed in float64.
  for ours, ref in ((pearson(x, y), lambda a, b: stats.pearsonr(a, b).statistic),
                    (spearman(x, y), lambda a, b: stats.spearmanr(a, b).statistic)):
    ours = np.asarray(ours)
    assert ours.shape == (3, 4) and ours.dtype == np.float32
    expected = [ref(a.astype(np.float64), b.astype(np.float64)) for a, b in _rows(x, y)]
    np.testing.assert_allclose(ours.reshape(-1), expected, rtol=1e-5, atol=1e-6)


def test_constant_input_is_nan():
  x = np.full(8, 0.1, np.float32)
  y = np.arange(8, dtype=np.float32)
  for fn in (pearson, spearman):
    assert np.isnan(float(fn(x, y))) and np.isnan(float(fn(y, x)))
  assert np.isnan(float(pearson(np.ones(1), np.ones(1))))  # n = 1


def _cka_reference(x, y):
  """Feature-space linear CKA in float64."""
  x = x - x.mean(0)
  y = y - y.mean(0)
  fro = np.linalg.norm
  return fro(y.T @ x) ** 2 / (fro(x.T @ x) * fro(y.T @ y))


def _cka_hsic(x, y):
  """The HSIC form tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)) with linear kernels, in float64."""
  n = x.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = x @ x.T, y @ y.T
  return np.trace(k @ h @ l @ h) / np.sqrt(np.trace(k @ h @ k @ h) * np.trace(l @ h @ l @ h))


@pytest.mark.parametrize("n, p, q", [(5, 3, 2), (9, 30, 4)])
def test_linear_cka_matches_reference_forms(n, p, q):
  rng = np.random.default_rng(n + p + q)
  x = rng.normal(size=(2, 3, n, p)).astype(np.float32)
  mix = rng.normal(size=(p, q))
  y = (x @ mix + rng.normal(size=(2, 3, n, q))).astype(np.float32)
  x[1] += 1e3  # a large offset, removed by centering
  ours = np.asarray(linear_cka(x, y))
  assert ours.shape == (2, 3) and ours.dtype == np.float32
  for idx in np.ndindex(2, 3):
    a, b = x[idx].astype(np.float64), y[idx].astype(np.float64)
    assert ours[idx] == pytest.approx(_cka_reference(a, b), rel=1e-5, abs=1e-6)
    assert ours[idx] == pytest.approx(_cka_hsic(a, b), rel=1e-5, abs=1e-6)


def test_linear_cka_invariances():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(8, 4)).astype(np.float32)
  y = np.tanh(x @ rng.normal(size=(4, 5))).astype(np.float32)
  rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  base = float(linear_cka(x, y))
  for xt in ((x @ rotation).astype(np.float32), 250.0 * x, x + 7.0):
    assert float(linear_cka(xt, y)) == pytest.approx(base, rel=1e-5)
  assert np.isnan(float(linear_cka(np.ones((8, 4)), y)))


_floats = hnp.arrays(np.float32, 8, elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False))


@settings(max_examples=25, deadline=None)
@given(x=_floats, data=st.data())
def test_correlation_properties(x, data):
  y = data.draw(hnp.arrays(np.float32, x.shape, elements=st.floats(-1e3, 1e3, width=32,
                                                                   allow_subnormal=False)))
  assume(np.ptp(x) > 1e-2 and np.ptp(y) > 1e-2)
  for fn in (pearson, spearman):
    assert float(fn(x, y)) == pytest.approx(float(fn(y, x)), abs=1e-6)
    assert float(fn(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(fn(x, -x)) == pytest.approx(-1.0, abs=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_linear_cka_properties(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(8, 4)).astype(np.float32)
  y = rng.normal(size=(8, 5)).astype(np.float32)
  cka = float(linear_cka(x, y))
  assert cka == pytest.approx(float(linear_cka(y, x)), abs=1e-6)
  assert -1e-6 <= cka <= 1 + 1e-6
  assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-5)
  assert float(linear_cka(x, 3.0 * x)) == pytest.approx(1.0, abs=1e-5)


def test_bad_input():
  with pytest.raises(ValueError, match=r"pearson: x shape \(3,\) != y shape \(4,\)"):
    pearson(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match="spearman: x must be .* at least 1 axis"):
    spearman(np.float32(1.0), np.float32(2.0))
  with pytest.raises(ValueError, match="pearson: y contains NaN or Inf"):
    pearson(np.zeros(3), np.array([0.0, np.inf, 1.0]))
  with pytest.raises(ValueError, match="linear_cka: x must be .* at least 2 axes"):
    linear_cka(np.zeros(5), np.zeros(5))
  with pytest.raises(ValueError, match=r"linear_cka: x shape \(5, 2\) and y shape \(4, 2\)"):
    linear_cka(np.zeros((5, 2)), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="linear_cka: y contains NaN"):
    linear_cka(np.zeros((5, 2)), np.full((5, 3), np.nan))
  with pytest.raises(ValueError, match="spearman: x must be numeric or bool"):
    spearman(np.array(["a", "b"]), np.zeros(2))


def test_under_jit():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(2, 8)).astype(np.float32)
  for fn in (pearson, spearman):
    np.testing.assert_allclose(jax.jit(fn)(x, y), fn(x, y), rtol=1e-6)
  a, b = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 5)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(linear_cka)(a, b), linear_cka(a, b), rtol=1e-6)
