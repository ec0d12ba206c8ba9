"""Linear SVM on frozen features with stratified nested cross-validation (the ViT-AE++ 3D
evaluation, vit_ae_plus_plus Sec. 4 "Evaluation strategy, classifier, and metrics").

The outer loop is a stratified k-fold split (5 folds: 80 % of each class trains, 20 % tests).
Inside each outer fold, on its training part only, an inner stratified k-fold split chooses the
SVM's ``C`` by mean inner ROC AUC; the model is then refitted on the whole outer-training part
and scored once on the outer test fold. No outer test sample is ever fitted or scored during the
selection, so the outer scores are free of selection bias. Features are standardised inside each
fit (a ``StandardScaler`` + ``SVC`` pipeline), so the scaler never sees the rows it is scored on.

The reference code (``SVC(probability=True, class_weight='balanced')``, C in {0.1, 1, 5, 10} and
kernel in {linear, rbf} chosen by accuracy; sensitivity and specificity at ``p >= 0.65``) differs
on purpose: the kernel is linear only (the paper's "linear SVM"), C is chosen by AUC (the metric
reported), and the decision threshold is the SVM's own ``decision >= 0`` by default.
``threshold="probability"`` restores the reference's ``p >= 0.65`` on Platt probabilities.

Everything here is numpy and scikit-learn on the host: features in, numbers and dicts out.
"""

from __future__ import annotations

import collections.abc
import math
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from jaxmed.metrics import sensitivity_specificity

# The reference code's decision rule on Platt probabilities of the positive class.
PROBABILITY_THRESHOLD = 0.65
# Folds of the internal cross-validation that fits Platt scaling (libsvm's and sklearn's 5).
PLATT_FOLDS = 5
THRESHOLDS = ("decision", "probability")
METRICS = ("auc", "sensitivity", "specificity")


def make_linear_svm(C: float, *, standardize: bool = True, probability: bool = False,
                    seed: int = 0):
  """``[StandardScaler +] SVC(kernel="linear", C=C, class_weight="balanced")`` (a pipeline).

  With ``probability``, the pipeline wrapped in Platt scaling: ``CalibratedClassifierCV(...,
  method="sigmoid", ensemble=False)`` whose sigmoid is fitted on decision values predicted by an
  internal ``StratifiedKFold(5, shuffle=True, random_state=seed)`` cross-validation of the
  training rows, the SVM itself being fitted on all of them. This is scikit-learn's replacement
  for ``SVC(probability=True)`` (deprecated in 1.9, removed in 1.11), which does the same with
  libsvm's own seeded 5-fold split. Use `decision_function` for the SVM's scores of either form.
  """
  steps = [StandardScaler()] if standardize else []
  model = make_pipeline(*steps, SVC(kernel="linear", C=float(C), class_weight="balanced"))
  if not probability:
    return model
  return CalibratedClassifierCV(
      model, method="sigmoid", ensemble=False,
      cv=StratifiedKFold(PLATT_FOLDS, shuffle=True, random_state=seed))


def decision_function(model, x) -> np.ndarray:
  """``(n,)`` SVM decision values of a fitted `make_linear_svm` model (> 0: class 1)."""
  if isinstance(model, CalibratedClassifierCV):
    model = model.calibrated_classifiers_[0].estimator
  return model.decision_function(x)


def nested_cv_linear_svm(features, labels, *, outer_folds: int = 5, inner_folds: int = 3,
                         cs=(0.1, 1.0, 5.0, 10.0), seed: int = 0, threshold: str = "decision",
                         standardize: bool = True) -> dict[str, Any]:
  """Linear SVM with stratified nested cross-validation: AUC, sensitivity and specificity.

  For each outer fold of ``StratifiedKFold(outer_folds, shuffle=True, random_state=seed)``, on
  the outer-training part only: every ``C`` in ``cs`` is scored by its mean ROC AUC (of the
  decision function) over ``StratifiedKFold(inner_folds, shuffle=True, random_state=seed)`` of
  that part; the best ``C`` (ties: the smaller) is refitted on the whole outer-training part and
  scored on the outer test fold. The model is `make_linear_svm` (scaler fitted on training rows
  only, balanced class weights).

  Args:
    features: ``(n, F)`` finite float features, one row per subject.
    labels: ``(n,)`` binary labels (bool or {0, 1}; 1 is the positive class). Each class needs
      at least ``outer_folds`` members, and enough that every outer-training part keeps at
      least ``inner_folds`` of them (and 5 with ``threshold="probability"``).
    outer_folds: outer folds, >= 2 (the paper: 5).
    inner_folds: inner folds for choosing ``C``, >= 2.
    cs: candidate ``C`` values, each positive and finite (the reference's {0.1, 1, 5, 10}).
    seed: ``random_state`` of both splitters (and of Platt scaling).
    threshold: how predictions are made for sensitivity and specificity.
      ``"decision"`` (recommended): ``decision_function >= 0``, the SVM's own boundary.
      ``"probability"``: the reference code's rule ``p >= 0.65`` on Platt probabilities of
      class 1 (the reference's ``SVC(probability=True)``; here its scikit-learn replacement,
      see `make_linear_svm`). Platt scaling is itself fitted by an internal stratified 5-fold
      cross-validation of the outer-training part, shuffled with ``seed``, so its
      probabilities can disagree with the sign of the decision function, and every class
      needs at least 5 members in each outer-training part. ROC AUC and the choice of ``C``
      always use the decision function, which Platt scaling does not change.
    standardize: standardise features (``StandardScaler``) inside every fit.

  Returns:
    ``{"auc": (mean, std), "sensitivity": (mean, std), "specificity": (mean, std),
    "folds": [...]}``: mean and population standard deviation (``ddof=0``, like sklearn's
    ``GridSearchCV.cv_results_["std_test_score"]``) over the outer folds. Each fold is a dict:
    ``"train"``, ``"test"`` (sorted int index arrays into ``features``), ``"c"`` (the chosen
    ``C``), ``"auc"``, ``"sensitivity"``, ``"specificity"`` (floats on the test fold),
    ``"inner_auc"`` (``{C: mean inner AUC}``), ``"inner"`` (a list of ``{"train", "test"}``
    index arrays into ``features``: every inner split the selection fitted and scored on),
    ``"decision"`` (``(len(test),)`` decision values of the refitted model on ``test``) and,
    with ``threshold="probability"``, ``"probability"`` (its ``p`` of class 1 on ``test``).

  Raises:
    ValueError: features not ``(n, F)`` or non-finite; labels not ``(n,)``, not binary, or a
      class too small for the folds; ``cs`` empty or holding a non-positive ``C``; an unknown
      ``threshold``; ``outer_folds`` or ``inner_folds`` < 2.
  """
  x, y, cs = _validate(features, labels, outer_folds, inner_folds, cs, threshold)
  probability = threshold == "probability"
  outer = StratifiedKFold(int(outer_folds), shuffle=True, random_state=seed)
  folds = []
  for train, test in outer.split(x, y):
    # Inner splits of the outer-training rows only, as indices into ``features``.
    splitter = StratifiedKFold(int(inner_folds), shuffle=True, random_state=seed)
    inner = [{"train": train[a], "test": train[b]} for a, b in splitter.split(x[train], y[train])]
    inner_auc = {}
    for c in cs:
      scores = [roc_auc_score(y[s["test"]], decision_function(_fit(x, y, s["train"], c,
                                                                   standardize), x[s["test"]]))
                for s in inner]
      inner_auc[c] = float(np.mean(scores))
    best = cs[0]
    for c in cs[1:]:  # ascending, strict improvement: a tie keeps the smaller C
      if inner_auc[c] > inner_auc[best]:
        best = c
    model = _fit(x, y, train, best, standardize, probability=probability, seed=seed)
    decision = decision_function(model, x[test])
    fold = {"train": train, "test": test, "c": best, "inner_auc": inner_auc, "inner": inner,
            "decision": decision}
    if probability:
      fold["probability"] = model.predict_proba(x[test])[:, 1]  # classes_ == [0, 1]
      pred = fold["probability"] >= PROBABILITY_THRESHOLD
    else:
      pred = decision >= 0
    sens, spec = sensitivity_specificity(pred, y[test].astype(bool))
    fold.update(auc=float(roc_auc_score(y[test], decision)), sensitivity=float(sens),
                specificity=float(spec))
    folds.append(fold)
  out: dict[str, Any] = {m: (float(np.mean([f[m] for f in folds])),
                             float(np.std([f[m] for f in folds]))) for m in METRICS}
  out["folds"] = folds
  return out


def svm_table(results: collections.abc.Mapping[str, collections.abc.Mapping],
              *, digits: int = 3) -> str:
  """A markdown table of `nested_cv_linear_svm` results: one row per method, columns AUC,
  sensitivity and specificity as ``mean ± std`` over the outer folds (Table 2/3's layout).

  Args:
    results: ``{method name: nested_cv_linear_svm(...) result}`` (insertion order kept).
    digits: decimals.

  Returns:
    The table as a string (lines joined by newlines, no trailing newline).
  """
  if not isinstance(results, collections.abc.Mapping) or not results:
    raise ValueError(f"svm_table: results must be a non-empty mapping method -> "
                     f"nested_cv_linear_svm result; got {type(results).__name__}")
  for method, result in results.items():
    if not isinstance(result, collections.abc.Mapping) or any(m not in result for m in METRICS):
      raise ValueError(f"svm_table: results[{method!r}] is not a nested_cv_linear_svm result "
                       f"(needs keys {METRICS})")
  digits = int(digits)
  lines = ["| Method | AUC | Sensitivity | Specificity |", "|:---|---:|---:|---:|"]
  for method, result in results.items():
    cells = [f"{result[m][0]:.{digits}f} ± {result[m][1]:.{digits}f}" for m in METRICS]
    lines.append("| " + " | ".join([str(method)] + cells) + " |")
  return "\n".join(lines)


def _fit(x, y, rows, c, standardize, *, probability=False, seed=0):
  return make_linear_svm(c, standardize=standardize, probability=probability,
                         seed=seed).fit(x[rows], y[rows])


def _validate(features, labels, outer_folds, inner_folds, cs, threshold):
  """Checks every argument before any fit: ``(x float64 (n, F), y int (n,), sorted cs)``."""
  fn = "nested_cv_linear_svm"
  for name, k in (("outer_folds", outer_folds), ("inner_folds", inner_folds)):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
      raise ValueError(f"{fn}: {name} must be an int >= 2; got {k!r}")
  if threshold not in THRESHOLDS:
    raise ValueError(f"{fn}: threshold must be one of {THRESHOLDS}; got {threshold!r}")
  cs = [cs] if np.isscalar(cs) else list(cs)
  if not cs:
    raise ValueError(f"{fn}: cs must hold at least one C value; got an empty sequence")
  for c in cs:
    if isinstance(c, bool) or not isinstance(c, (int, float, np.integer, np.floating)) or not (
        math.isfinite(float(c)) and float(c) > 0):
      raise ValueError(f"{fn}: every C in cs must be positive and finite; got {c!r} in {cs}")
  cs = sorted({float(c) for c in cs})

  x = np.asarray(features)
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"{fn}: features must be (n, F) with n, F >= 1; got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{fn}: features must be real numbers; got dtype {x.dtype}")
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    bad = np.argwhere(~np.isfinite(x))[0]
    raise ValueError(f"{fn}: features {x.shape} hold non-finite values (first at row {bad[0]}, "
                     f"column {bad[1]})")
  y = np.asarray(labels)
  if y.shape != (x.shape[0],):
    raise ValueError(f"{fn}: labels must be ({x.shape[0]},), one per row of features "
                     f"{x.shape}; got shape {y.shape}")
  if not (y.dtype == np.bool_ or np.issubdtype(y.dtype, np.integer)
          or np.issubdtype(y.dtype, np.floating)):
    raise ValueError(f"{fn}: labels must be bool or {{0, 1}} numbers; got dtype {y.dtype}")
  values = np.unique(y)
  if not set(values.tolist()) <= {0, 1}:
    raise ValueError(f"{fn}: labels must be binary {{0, 1}}; got values {values[:10]}")
  y = y.astype(np.int64)
  counts = np.bincount(y, minlength=2)
  for cls, count in enumerate(counts):
    if count < outer_folds:
      raise ValueError(f"{fn}: class {cls} has {count} members in labels {y.shape}; "
                       f"outer_folds={outer_folds} needs at least {outer_folds} per class")
    # StratifiedKFold puts floor or ceil(count / k) of a class in each test fold.
    kept = count - math.ceil(count / outer_folds)
    need, why = ((PLATT_FOLDS, f"the {PLATT_FOLDS} folds of Platt scaling")
                 if threshold == "probability" and PLATT_FOLDS > inner_folds
                 else (inner_folds, f"inner_folds={inner_folds}"))
    if kept < need:
      raise ValueError(f"{fn}: class {cls} has {count} members in labels {y.shape}: an outer "
                       f"training part keeps only {kept}, fewer than {why}")
  return x, y, cs
