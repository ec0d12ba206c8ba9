import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from jaxmed.evaluate import linear_probe

# One (N, F) shape for every fit: the Newton solver compiles once per shape and class count.
N, F = 60, 5
SCALES = np.array([1.0, 10.0, 0.1, 3.0, 50.0])


def _data(kind, seed=0):
  """Features of very different scales and offsets, and labels: "separable" (a noiseless linear
  rule, two classes), "noisy" (two classes, overlapping), "three" (three classes)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(N, F))
  x = z * SCALES + 5.0
  score = z @ np.array([1.5, -1.0, 0.5, 0.0, 2.0])
  if kind == "separable":
    y = (score > 0).astype(int)
  elif kind == "noisy":
    y = (rng.random(N) < 1 / (1 + np.exp(-0.5 * score))).astype(int)
  else:
    y = np.digitize(score + rng.normal(size=N), [-1.0, 1.0])
  return x, y


def _sklearn(x, y, C, standardize):
  xs = StandardScaler().fit(x).transform(x) if standardize else x
  return SklearnLogisticRegression(C=C, tol=1e-10, max_iter=100_000).fit(xs, y), xs


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("C", [0.05, 1.0, 50.0])
@pytest.mark.parametrize("kind", ["separable", "noisy", "three"])
def test_matches_sklearn_logistic_regression(kind, C, standardize):
  x, y = _data(kind)
  model = linear_probe.fit_logistic_regression(x, y, C=C, standardize=standardize)
  ref, xs = _sklearn(x, y, C, standardize)
  assert model.coef.shape == ref.coef_.shape and model.intercept.shape == ref.intercept_.shape
  scale = np.max(np.abs(ref.coef_))
  np.testing.assert_allclose(model.coef, ref.coef_, rtol=1e-3, atol=1e-3 * scale)
  np.testing.assert_allclose(model.intercept, ref.intercept_, rtol=1e-3,
                             atol=1e-3 * max(1.0, np.max(np.abs(ref.intercept_))))
  np.testing.assert_array_equal(model.predict(x), ref.predict(xs))
  np.testing.assert_allclose(model.predict_proba(x), ref.predict_proba(xs), atol=1e-4)
  assert model.n_iter < 100  # converged, not stopped by max_iter


def test_standardisation_uses_training_statistics():
  x, y = _data("noisy")
  model = linear_probe.fit_logistic_regression(x, y, C=1.0)
  np.testing.assert_allclose(model.mean, x.mean(axis=0))
  np.testing.assert_allclose(model.scale, x.std(axis=0))
  # Held-out rows are standardised with the training statistics, as sklearn's pipeline does.
  ref, _ = _sklearn(x, y, 1.0, True)
  x_new = _data("noisy", seed=1)[0] * 1.5
  scaler = StandardScaler().fit(x)
  np.testing.assert_allclose(model.decision_function(x_new),
                             ref.decision_function(scaler.transform(x_new)), rtol=1e-3,
                             atol=1e-3)


def test_labels_of_any_type_and_constant_features():
  x, y = _data("three")
  x[:, 3] = 2.0  # a constant feature gets scale 1 and a zero weight
  names = np.array(["low", "mid", "high"])[y]
  model = linear_probe.fit_logistic_regression(x, names, C=1.0)
  assert list(model.classes) == ["high", "low", "mid"]
  assert set(model.predict(x)) <= set(names)
  assert model.scale[3] == 1.0 and np.all(np.abs(model.coef[:, 3]) < 1e-6)
  np.testing.assert_allclose(model.intercept.sum(), 0.0, atol=1e-5)  # sklearn's symmetric form


def test_linear_probe_metrics_match_sklearn():
  x, y = _data("noisy")
  train, test = slice(0, 40), slice(40, None)
  # Flip some test labels so the probe is imperfect.
  y_test = y[test].copy()
  y_test[::4] = 1 - y_test[::4]
  out = linear_probe.linear_probe(x[train], y[train], x[test], y_test, C=0.5)
  ref, _ = _sklearn(x[train], y[train], 0.5, True)
  xs = StandardScaler().fit(x[train]).transform(x[test])
  pred = ref.predict(xs)
  assert 0.4 < out["accuracy"] < 1.0
  np.testing.assert_allclose(out["accuracy"], accuracy_score(y_test, pred), atol=1e-6)
  np.testing.assert_allclose(out["balanced_accuracy"], balanced_accuracy_score(y_test, pred),
                             atol=1e-6)
  np.testing.assert_allclose(out["roc_auc"], roc_auc_score(y_test, ref.decision_function(xs)),
                             atol=1e-6)


def test_multiclass_metrics_have_no_auc_and_balanced_accuracy_matches_sklearn():
  y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 5])
  y_pred = np.array([0, 0, 1, 0, 1, 2, 2, 2, 0, 0])
  out = linear_probe.classification_metrics(y_true, y_pred)
  assert set(out) == {"accuracy", "balanced_accuracy"}
  np.testing.assert_allclose(out["accuracy"], accuracy_score(y_true, y_pred))
  np.testing.assert_allclose(out["balanced_accuracy"], balanced_accuracy_score(y_true, y_pred))
  # One class in the held-out labels: ROC AUC is undefined (nan), not an error.
  one = linear_probe.classification_metrics(np.ones(4, int), np.array([1, 0, 1, 1]),
                                            np.array([0.5, -1.0, 2.0, 1.0]), classes=[0, 1])
  assert np.isnan(one["roc_auc"]) and one["balanced_accuracy"] == 0.75


def test_invalid_inputs_raise():
  x, y = _data("noisy")
  with pytest.raises(ValueError, match="at least two classes"):
    linear_probe.fit_logistic_regression(x, np.zeros(N, int))
  with pytest.raises(ValueError, match="C must be positive"):
    linear_probe.fit_logistic_regression(x, y, C=0.0)
  with pytest.raises(ValueError, match=r"y must be \(60,\)"):
    linear_probe.fit_logistic_regression(x, y[:-1])
  with pytest.raises(ValueError, match=r"x must be \(N, F\)"):
    linear_probe.fit_logistic_regression(x[:, 0], y)
  x_bad = x.copy()
  x_bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    linear_probe.fit_logistic_regression(x_bad, y)
