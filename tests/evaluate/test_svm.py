import functools

import numpy as np
import pytest
from sklearn.metrics import recall_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score

from jaxmed.evaluate import svm
from jaxmed.metrics import roc_auc

N, F = 48, 4
CS = (0.1, 1.0, 5.0, 10.0)


def _data(kind, seed=0):
  """``(x (N, F), y (N,))``: "separable" (classes 6 standard deviations apart on feature 0),
  "noisy" (a weak linear signal on features of different scales) or "random" (labels
  independent of the features). 20 positives, 28 negatives."""
  rng = np.random.default_rng(seed)
  y = rng.permutation(np.r_[np.ones(20, int), np.zeros(N - 20, int)])
  x = rng.normal(size=(N, F)) * np.array([1.0, 10.0, 0.1, 3.0]) + 2.0
  if kind == "separable":
    x[:, 0] += 6.0 * (2 * y - 1)
  elif kind == "noisy":
    x[:, 0] += 0.8 * y
    x[:, 2] -= 0.05 * y
  return x, y


@functools.cache
def _run(kind, **kwargs):
  x, y = _data(kind)
  return x, y, svm.nested_cv_linear_svm(x, y, **kwargs)


def test_separable_data_is_classified_perfectly_on_every_fold():
  _, _, result = _run("separable")
  assert len(result["folds"]) == 5
  for fold in result["folds"]:
    assert fold["auc"] == 1.0 and fold["sensitivity"] == 1.0 and fold["specificity"] == 1.0
    # Every C separates the inner folds perfectly: the tie goes to the smallest C.
    assert fold["inner_auc"] == {c: 1.0 for c in CS} and fold["c"] == 0.1
  for metric in ("auc", "sensitivity", "specificity"):
    assert result[metric] == (1.0, 0.0)


def test_random_labels_give_chance_auc():
  _, _, result = _run("random")
  assert abs(result["auc"][0] - 0.5) < 0.2
  assert all(0.0 <= f["auc"] <= 1.0 for f in result["folds"])


def test_no_outer_test_index_reaches_the_inner_selection():
  x, y, result = _run("noisy")
  tests = [f["test"] for f in result["folds"]]
  np.testing.assert_array_equal(np.sort(np.concatenate(tests)), np.arange(N))  # a partition
  for fold in result["folds"]:
    train, test = fold["train"], fold["test"]
    assert not np.intersect1d(train, test).size
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(N))
    # Stratified: each class is split as evenly as possible over the 5 test folds.
    for cls, count in ((1, 20), (0, N - 20)):
      assert np.sum(y[test] == cls) in (count // 5, -(-count // 5))
    assert len(fold["inner"]) == 3
    for split in fold["inner"]:
      used = np.concatenate([split["train"], split["test"]])
      assert not np.intersect1d(used, test).size
      assert np.all(np.isin(used, train))
      assert not np.intersect1d(split["train"], split["test"]).size
    inner_tests = np.concatenate([s["test"] for s in fold["inner"]])
    np.testing.assert_array_equal(np.sort(inner_tests), np.sort(train))
    assert len(fold["decision"]) == len(test)


def test_chosen_c_matches_cross_val_score_on_the_outer_training_part():
  x, y, result = _run("noisy")
  for fold in result["folds"][:2]:
    train = fold["train"]
    inner = StratifiedKFold(3, shuffle=True, random_state=0)
    means = {c: np.mean(cross_val_score(svm.make_linear_svm(c), x[train], y[train], cv=inner,
                                        scoring="roc_auc"))
             for c in CS}
    assert fold["inner_auc"] == pytest.approx(means, abs=1e-12)
    best = max(CS, key=lambda c: (means[c], -c))  # the largest mean; ties -> the smaller C
    assert fold["c"] == best
  # The selection is not trivial on this data: the inner AUCs differ between Cs.
  assert any(len(set(f["inner_auc"].values())) > 1 for f in result["folds"])


def test_fold_scores_match_sklearn_and_jaxmed_metrics():
  x, y, result = _run("noisy")
  aucs = []
  for fold in result["folds"]:
    train, test = fold["train"], fold["test"]
    model = svm.make_linear_svm(fold["c"]).fit(x[train], y[train])
    np.testing.assert_allclose(fold["decision"], model.decision_function(x[test]), atol=1e-9)
    assert fold["auc"] == roc_auc_score(y[test], fold["decision"])
    assert fold["auc"] == pytest.approx(float(roc_auc(fold["decision"], y[test])), abs=1e-6)
    pred = (fold["decision"] >= 0).astype(int)
    assert fold["sensitivity"] == pytest.approx(recall_score(y[test], pred, pos_label=1))
    assert fold["specificity"] == pytest.approx(recall_score(y[test], pred, pos_label=0))
    aucs.append(fold["auc"])
  assert result["auc"] == pytest.approx((np.mean(aucs), np.std(aucs)))  # ddof=0
  assert 0.5 < result["auc"][0] <= 1.0  # the weak signal is found


def test_deterministic_for_a_seed():
  x, y, first = _run("noisy")
  second = svm.nested_cv_linear_svm(x, y)
  for a, b in zip(first["folds"], second["folds"]):
    np.testing.assert_array_equal(a["test"], b["test"])
    np.testing.assert_array_equal(a["decision"], b["decision"])
    assert a["c"] == b["c"] and a["inner_auc"] == b["inner_auc"]
  assert {k: first[k] for k in svm.METRICS} == {k: second[k] for k in svm.METRICS}
  other = svm.nested_cv_linear_svm(x, y, seed=1, cs=(1.0,))
  assert any(not np.array_equal(a["test"], b["test"])
             for a, b in zip(first["folds"], other["folds"]))


def test_probability_threshold():
  x, y, result = _run("noisy", threshold="probability")
  _, _, decision = _run("noisy")
  for fold, ref in zip(result["folds"], decision["folds"]):
    assert 0.0 <= fold["sensitivity"] <= 1.0 and 0.0 <= fold["specificity"] <= 1.0
    p = fold["probability"]
    assert p.shape == fold["test"].shape and np.all((p >= 0) & (p <= 1))
    pred = (p >= 0.65).astype(int)
    assert fold["sensitivity"] == pytest.approx(recall_score(y[fold["test"]], pred))
    # Platt scaling does not change the SVM's fit: same C, same decision values and AUC.
    assert fold["c"] == ref["c"]
    np.testing.assert_allclose(fold["decision"], ref["decision"], atol=1e-9)
    assert fold["auc"] == ref["auc"]
  # Platt scaling is seeded: a refit with the same seed gives the same probabilities.
  fold = result["folds"][0]
  model = svm.make_linear_svm(fold["c"], probability=True, seed=0)
  model.fit(x[fold["train"]], y[fold["train"]])
  np.testing.assert_allclose(model.predict_proba(x[fold["test"]])[:, 1], fold["probability"],
                             atol=1e-12)


def test_without_standardisation():
  x, y = _data("separable")
  result = svm.nested_cv_linear_svm(x, y, standardize=False, outer_folds=3, cs=(1.0,))
  assert result["auc"] == (1.0, 0.0)
  fold = result["folds"][0]
  model = svm.make_linear_svm(1.0, standardize=False).fit(x[fold["train"]], y[fold["train"]])
  assert len(model.steps) == 1
  np.testing.assert_allclose(fold["decision"], model.decision_function(x[fold["test"]]))


@pytest.mark.parametrize("change, match", [
    (dict(features=np.zeros((N,))), r"features must be \(n, F\).*shape \(48,\)"),
    (dict(features=np.full((N, F), np.nan)), r"features \(48, 4\) hold non-finite"),
    (dict(features=np.array([["a"] * F] * N)), r"features must be real numbers.*dtype"),
    (dict(labels=np.zeros((N, 1), int)), r"labels must be \(48,\).*shape \(48, 1\)"),
    (dict(labels=np.zeros(N - 1, int)), r"labels must be \(48,\).*shape \(47,\)"),
    (dict(labels=np.arange(N) % 3), r"labels must be binary"),
    (dict(labels=np.r_[np.ones(3, int), np.zeros(N - 3, int)]), r"class 1 has 3 members.*"
                                                                 r"outer_folds=5"),
    (dict(labels=np.r_[np.ones(5, int), np.zeros(N - 5, int)], inner_folds=5),
     r"class 1 has 5 members.*keeps only 4.*inner_folds=5"),
    (dict(labels=np.r_[np.ones(6, int), np.zeros(N - 6, int)], threshold="probability"),
     r"class 1 has 6 members.*keeps only 4.*the 5 folds of Platt scaling"),
    (dict(cs=()), r"cs must hold at least one"),
    (dict(cs=(1.0, 0.0)), r"every C in cs must be positive.*0\.0"),
    (dict(cs=(-1.0,)), r"every C in cs must be positive"),
    (dict(cs=(float("inf"),)), r"every C in cs must be positive and finite"),
    (dict(threshold="p65"), r"threshold must be one of.*'p65'"),
    (dict(outer_folds=1), r"outer_folds must be an int >= 2; got 1"),
    (dict(inner_folds=1), r"inner_folds must be an int >= 2; got 1"),
    (dict(outer_folds=2.5), r"outer_folds must be an int >= 2"),
])
def test_validation_errors(change, match):
  x, y = _data("random")
  kwargs = dict(features=x, labels=y)
  kwargs.update(change)
  features, labels = kwargs.pop("features"), kwargs.pop("labels")
  with pytest.raises(ValueError, match=match):
    svm.nested_cv_linear_svm(features, labels, **kwargs)


def test_bool_labels_are_accepted():
  x, y = _data("separable")
  result = svm.nested_cv_linear_svm(x, y.astype(bool), outer_folds=2, inner_folds=2, cs=1.0)
  assert result["auc"] == (1.0, 0.0) and [f["c"] for f in result["folds"]] == [1.0, 1.0]


def test_svm_table():
  results = {"ViT-AE": {"auc": (0.8123, 0.0456), "sensitivity": (0.7, 0.1),
                        "specificity": (0.65, 0.05)},
             "ViT-AE++": {"auc": (0.9, 0.0), "sensitivity": (1.0, 0.0),
                          "specificity": (0.875, 0.125)}}
  assert svm.svm_table(results) == (
      "| Method | AUC | Sensitivity | Specificity |\n"
      "|:---|---:|---:|---:|\n"
      "| ViT-AE | 0.812 ± 0.046 | 0.700 ± 0.100 | 0.650 ± 0.050 |\n"
      "| ViT-AE++ | 0.900 ± 0.000 | 1.000 ± 0.000 | 0.875 ± 0.125 |")
  assert svm.svm_table({"a": results["ViT-AE"]}, digits=1).splitlines()[-1] == (
      "| a | 0.8 ± 0.0 | 0.7 ± 0.1 | 0.7 ± 0.1 |")
  with pytest.raises(ValueError, match="non-empty mapping"):
    svm.svm_table({})
  with pytest.raises(ValueError, match=r"results\['x'\] is not a nested_cv_linear_svm result"):
    svm.svm_table({"x": {"auc": (1.0, 0.0)}})
