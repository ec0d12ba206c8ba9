import itertools

import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from jaxmed.metrics import linear_cka, paired_t_test, pearson, spearman

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


def test_paired_t_test_matches_scipy():
  rng = np.random.default_rng(7)
  a = rng.normal(size=(3, 4, 9))
  # Per row a different true shift (none, small, large) and a 1e3 offset on the middle batch.
  b = a + rng.normal(size=a.shape) * 0.5 + np.array([0.0, 0.3, -2.0])[:, None, None]
  a[1] += 1e3
  b[1] += 1e3
  # |t| ~ 1e-3 on 200 pairs: p ~ 0.999, where df / (df + t^2) rounds to 1 in float32.
  e, noise = rng.normal(size=(2, 200))
  cases = [(a.astype(np.float32), b.astype(np.float32)),  # batched (3, 4, 9)
           (a[0, 0, :2].astype(np.float32), b[0, 0, :2].astype(np.float32)),  # n = 2
           (e.astype(np.float32), (e - noise + noise.mean() - 1e-4).astype(np.float32))]
  for (x, y), alternative in itertools.product(cases, ["two-sided", "less", "greater"]):
    t, p = paired_t_test(x, y, alternative=alternative)
    assert t.shape == p.shape == x.shape[:-1] and t.dtype == p.dtype == np.float32
    ref = stats.ttest_rel(x.astype(np.float64), y.astype(np.float64), axis=-1,
                          alternative=alternative)
    np.testing.assert_allclose(t, ref.statistic, rtol=2e-4)
    np.testing.assert_allclose(p, ref.pvalue, rtol=2e-4, atol=1e-7, err_msg=alternative)
  jitted = jax.jit(lambda x, y: paired_t_test(x, y, alternative="less"))
  for ours, eager in zip(jitted(*cases[0]), paired_t_test(*cases[0], alternative="less")):
    np.testing.assert_allclose(ours, eager, rtol=1e-6)
  with jax.enable_x64(True):  # float64 input computes in float64: scipy to ~1e-12
    t, p = paired_t_test(a, b)
    ref = stats.ttest_rel(a, b, axis=-1)
    assert p.dtype == np.float64
    np.testing.assert_allclose(t, ref.statistic, rtol=1e-10)
    np.testing.assert_allclose(p, ref.pvalue, rtol=1e-10)


@pytest.mark.filterwarnings("ignore")  # scipy warns on every degenerate case
def test_paired_t_test_degenerate_cases_match_scipy():
  a = np.arange(9, dtype=np.float32).reshape(1, 9) * 0.25 + np.zeros((3, 1), np.float32)
  # Equal arrays (t = 0 / 0), a constant positive and a constant negative difference.
  b = a - np.array([[0.0], [0.5], [-1.5]], np.float32)
  t, p = paired_t_test(a, b)
  ref = stats.ttest_rel(a.astype(np.float64), b.astype(np.float64), axis=-1)
  np.testing.assert_array_equal(t, ref.statistic)  # [nan, inf, -inf]
  np.testing.assert_array_equal(p, ref.pvalue)  # [nan, 0, 0]
  assert np.isnan(t[0]) and np.isposinf(t[1]) and np.isneginf(t[2])
  for alternative in ("less", "greater"):  # [nan, 1, 0] and [nan, 0, 1]
    ref = stats.ttest_rel(a, b, axis=-1, alternative=alternative).pvalue
    np.testing.assert_array_equal(paired_t_test(a, b, alternative=alternative)[1], ref)
  ref = stats.ttest_rel(a[:, :1], b[:, :1], axis=-1)  # n = 1: NaN
  for ours, theirs in zip(paired_t_test(a[:, :1], b[:, :1]), ref):
    assert np.isnan(ours).all() and np.isnan(theirs).all()


def test_paired_t_test_bad_input():
  with pytest.raises(ValueError, match=r"paired_t_test: a shape \(3,\) != b shape \(4,\)"):
    paired_t_test(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match="paired_t_test: b contains NaN or Inf"):
    paired_t_test(np.zeros(3), np.array([0.0, np.nan, 1.0]))
  with pytest.raises(ValueError, match="paired_t_test: a must be real"):
    paired_t_test(np.zeros(3, np.complex64), np.zeros(3, np.complex64))
  with pytest.raises(ValueError, match="alternative must be one of .*'two_sided'"):
    paired_t_test(np.zeros(3), np.ones(3), alternative="two_sided")
