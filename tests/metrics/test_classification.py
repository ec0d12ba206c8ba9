import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

from jaxmed.metrics import accuracy, roc_auc, sensitivity_specificity

# Tests reuse a few shapes ((9,) and (3, 4, n)) because every new shape costs a compilation.


def _both_classes(rng, shape):
  """Random {0, 1} labels with both classes in every row."""
  labels = rng.integers(0, 2, shape)
  labels[..., 0], labels[..., 1] = 0, 1
  return rng.permuted(labels, axis=-1)


def _rows(*arrays):
  return zip(*(a.reshape(-1, a.shape[-1]) for a in arrays))


@pytest.mark.parametrize("n", [2, 9, 101])
def test_roc_auc_matches_sklearn(n):
  rng = np.random.default_rng(n)
  scores = np.stack([rng.normal(size=(4, n)),  # no ties
                     rng.integers(0, 4, (4, n)),  # integer scores, many ties
                     np.round(rng.normal(size=(4, n)), 1)])  # rounded scores, some ties
  scores = scores.astype(np.float32)
  labels = _both_classes(rng, scores.shape)
  ours = np.asarray(roc_auc(scores, labels))
  assert ours.shape == (3, 4) and ours.dtype == np.float32
  ref = [roc_auc_score(y, s) for s, y in _rows(scores, labels)]
  np.testing.assert_allclose(ours.reshape(-1), ref, rtol=1e-5, atol=1e-6)


def test_roc_auc_ties_and_dtypes():
  # Integer scores, float labels: one tied positive/negative pair of four counts 1/2.
  scores, labels = np.array([1, 5, 5, 9]), np.array([0.0, 0.0, 1.0, 1.0])
  assert float(roc_auc(scores, labels)) == 0.875 == roc_auc_score(labels, scores)
  # bool scores and labels
  assert float(roc_auc(scores > 3, labels > 0)) == 0.75 == roc_auc_score(labels, scores > 3)


def test_roc_auc_one_class_is_nan():
  scores = np.arange(9, dtype=np.float32)
  assert np.isnan(float(roc_auc(scores, np.ones(9, int))))
  assert np.isnan(float(roc_auc(scores, np.zeros(9, int))))
  assert float(roc_auc(scores, (scores > 4).astype(int))) == 1.0
  assert np.isnan(float(roc_auc(np.zeros(0), np.zeros(0))))


@pytest.mark.parametrize("shape", [(9,), (3, 4, 101)])
def test_sensitivity_specificity_match_sklearn(shape):
  rng = np.random.default_rng(shape[-1])
  pred, labels = rng.integers(0, 2, (2,) + shape)
  labels[(0,) * (len(shape) - 1)] = 0  # a first row without positives: sensitivity nan
  sens, spec = map(np.asarray, sensitivity_specificity(pred, labels))
  assert sens.shape == spec.shape == shape[:-1] and sens.dtype == np.float32
  for i, (p, y) in enumerate(_rows(pred, labels)):
    for ours, pos_label in ((sens.reshape(-1)[i], 1), (spec.reshape(-1)[i], 0)):
      if np.any(y == pos_label):
        assert np.isclose(ours, recall_score(y, p, pos_label=pos_label), rtol=1e-6)
      else:
        assert np.isnan(ours)


def test_sensitivity_specificity_empty_class_is_nan():
  sens, spec = sensitivity_specificity(np.arange(9) % 2, np.zeros(9, int))
  assert np.isnan(float(sens)) and float(spec) == pytest.approx(5 / 9)
  sens, spec = sensitivity_specificity(np.arange(9) % 2 == 0, np.ones(9, bool))
  assert float(sens) == pytest.approx(5 / 9) and np.isnan(float(spec))


@pytest.mark.parametrize("shape", [(9,), (3, 4, 101)])
def test_accuracy_matches_sklearn(shape):
  rng = np.random.default_rng(shape[-1])
  pred, labels = rng.integers(0, 4, (2,) + shape)
  ours = np.asarray(accuracy(pred, labels))
  assert ours.shape == shape[:-1] and ours.dtype == np.float32
  ref = [accuracy_score(y, p) for p, y in _rows(pred, labels)]
  np.testing.assert_allclose(ours.reshape(-1), ref, rtol=1e-6)
  assert float(accuracy(np.array([True, False]), np.array([True, True]))) == 0.5


_tied_scores = hnp.arrays(np.float32, 9, elements=st.integers(-5, 5).map(float))


@settings(max_examples=25, deadline=None)
@given(scores=_tied_scores, labels=hnp.arrays(np.int64, 9, elements=st.integers(0, 1)))
def test_roc_auc_flips(scores, labels):
  assume(0 < labels.sum() < labels.size)
  auc = float(roc_auc(scores, labels))
  # Negating the scores or the labels mirrors the ROC curve; tied pairs stay at 1/2.
  assert np.isclose(float(roc_auc(-scores, labels)), 1 - auc, atol=1e-6)
  assert np.isclose(float(roc_auc(scores, 1 - labels)), 1 - auc, atol=1e-6)
  # A strictly increasing transform changes nothing.
  assert np.isclose(float(roc_auc(2 * scores + 7, labels)), auc, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(labels=hnp.arrays(np.int64, 9, elements=st.integers(0, 9)))
def test_accuracy_of_identical_labels_is_one(labels):
  assert float(accuracy(labels, labels)) == 1.0


def test_bad_input():
  with pytest.raises(ValueError, match=r"roc_auc: scores shape \(3,\) != labels shape \(4,\)"):
    roc_auc(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match="roc_auc: scores must be .* at least 1 axis"):
    roc_auc(np.float32(0.5), np.int32(1))
  with pytest.raises(ValueError, match="roc_auc: scores contains NaN or Inf"):
    roc_auc(np.array([0.1, np.nan]), np.array([0, 1]))
  with pytest.raises(ValueError, match="roc_auc: labels must be a binary"):
    roc_auc(np.array([0.1, 0.2]), np.array([0, 2]))
  with pytest.raises(ValueError, match="sensitivity_specificity: pred must be a binary"):
    sensitivity_specificity(np.array([0.3, 1.0]), np.array([0, 1]))
  with pytest.raises(ValueError, match="sensitivity_specificity: pred shape"):
    sensitivity_specificity(np.zeros((2, 3)), np.zeros((3, 2)))
  with pytest.raises(ValueError, match="accuracy: pred must hold integer or bool class labels"):
    accuracy(np.array([0.0, 1.0]), np.array([0, 1]))
  with pytest.raises(ValueError, match="accuracy: pred shape"):
    accuracy(np.zeros(3, int), np.zeros(2, int))


def test_under_jit():
  rng = np.random.default_rng(1)
  shape = (9,)
  scores, labels = rng.normal(size=shape).astype(np.float32), _both_classes(rng, shape)
  np.testing.assert_allclose(jax.jit(roc_auc)(scores, labels), roc_auc(scores, labels))
  pred = rng.integers(0, 2, shape)
  for jitted, eager in zip(jax.jit(sensitivity_specificity)(pred, labels),
                           sensitivity_specificity(pred, labels)):
    np.testing.assert_allclose(jitted, eager)
  np.testing.assert_allclose(jax.jit(accuracy)(pred, labels), accuracy(pred, labels))
