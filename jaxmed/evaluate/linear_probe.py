"""Linear probe: L2-regularised logistic regression on frozen features, fitted full-batch in JAX.

The model and its objective are scikit-learn's ``LogisticRegression(C=C)`` (lbfgs, L2):

    minimise  sum_i loss(y_i, x_i W + b)  +  1 / (2 C) ||W||^2      (intercept b unpenalised)

with the logistic loss on one score per sample for two classes (``coef`` ``(1, F)``) and the
multinomial (softmax) loss on one score per class for three or more (``coef`` ``(K, F)``;
intercepts centred to sum to zero, sklearn's symmetric parametrisation). The objective is
strictly convex (up to the softmax's common intercept shift), so the fit is unique and Newton's
method with a backtracking line search finds it in a few dozen steps; each step solves the
``(F + 1) K'`` square Newton system, so the probe suits up to a few thousand features x classes.

Features are standardised with the training set's mean and standard deviation (population,
``ddof=0``; a constant feature keeps scale 1), as ``sklearn.preprocessing.StandardScaler``, by
default: the penalty then weighs every feature alike whatever its scale. The stored ``coef`` and
``intercept`` then act on standardised features (`LogisticRegression` applies the scaling).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.metrics import accuracy, roc_auc

# Armijo constant and the number of step halvings of the line search.
_ARMIJO = 1e-4
_MAX_HALVINGS = 30


@dataclasses.dataclass(frozen=True)
class LogisticRegression:
  """A fitted linear classifier.

  Attributes:
    classes: ``(K,)`` the sorted training labels; predictions are drawn from them.
    coef: ``(1, F)`` for two classes (the score of ``classes[1]``), else ``(K, F)``; float32,
      acting on standardised features.
    intercept: ``(1,)`` or ``(K,)`` float32.
    mean, scale: ``(F,)`` the standardisation ``(x - mean) / scale`` (zeros and ones when
      fitted with ``standardize=False``).
    n_iter: Newton steps taken.
  """

  classes: np.ndarray
  coef: np.ndarray
  intercept: np.ndarray
  mean: np.ndarray
  scale: np.ndarray
  n_iter: int

  def decision_function(self, x) -> np.ndarray:
    """Scores of ``x`` ``(N, F)``: ``(N,)`` for two classes (> 0 means ``classes[1]``), else
    ``(N, K)``."""
    x = _features("x", x, self.coef.shape[1])
    z = ((x - self.mean) / self.scale) @ self.coef.T.astype(np.float64) + self.intercept
    return z[:, 0] if len(self.classes) == 2 else z

  def predict(self, x) -> np.ndarray:
    """``(N,)`` predicted labels (elements of ``classes``) of ``x`` ``(N, F)``."""
    z = self.decision_function(x)
    index = (z > 0).astype(int) if z.ndim == 1 else np.argmax(z, axis=1)
    return self.classes[index]

  def predict_proba(self, x) -> np.ndarray:
    """``(N, K)`` class probabilities of ``x`` ``(N, F)``, columns in ``classes`` order."""
    z = self.decision_function(x)
    if z.ndim == 1:
      z = np.stack([np.zeros_like(z), z], axis=1)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def fit_logistic_regression(x, y, *, C: float = 1.0, standardize: bool = True,
                            max_iter: int = 100, tol: float = 1e-6) -> LogisticRegression:
  """Fits L2-regularised logistic regression (binary or multinomial) by Newton's method.

  Matches ``sklearn.linear_model.LogisticRegression(C=C)`` fitted on the same (standardised)
  features, up to float32 precision.

  Args:
    x: ``(N, F)`` finite features.
    y: ``(N,)`` labels (integers, bools or strings), at least two distinct values.
    C: inverse regularisation strength, > 0: the penalty is ``||W||^2 / (2 C)`` against the loss
      summed over samples.
    standardize: standardise features with their mean and standard deviation first.
    max_iter: the most Newton steps.
    tol: stop when the largest step is below ``tol * max(1, max |parameter|)``, or the Newton
      decrement is below float32 resolution of the objective.

  Raises:
    ValueError: bad shapes, non-finite features, fewer than two classes, or ``C`` not positive
      and finite.
  """
  x = _features("x", x)
  y = np.asarray(y)
  if y.shape != (x.shape[0],):
    raise ValueError(f"y must be ({x.shape[0]},), one label per row of x; got shape {y.shape}")
  if not (math.isfinite(float(C)) and float(C) > 0):
    raise ValueError(f"C must be positive and finite; got {C}")
  if int(max_iter) < 1:
    raise ValueError(f"max_iter must be >= 1; got {max_iter}")
  classes, y_index = np.unique(y, return_inverse=True)
  if len(classes) < 2:
    raise ValueError(f"logistic regression needs at least two classes in y; got {classes}")
  # The Newton system is solved in standardised coordinates u = scale * W whatever
  # ``standardize`` says (raw features of very different scales make it too ill-conditioned for
  # float32); without standardisation the penalty ||W||^2 becomes sum_j (u_j / scale_j)^2 and
  # the solution is mapped back to raw features.
  mean, scale = x.mean(axis=0), x.std(axis=0)
  scale = np.where(scale > 0, scale, 1.0)
  z = ((x - mean) / scale).astype(np.float32)
  penalty = np.ones_like(scale) if standardize else 1.0 / scale**2
  k = 1 if len(classes) == 2 else len(classes)
  theta, n_iter = _newton(jnp.asarray(z), jnp.asarray(y_index, jnp.int32),
                          jnp.asarray(penalty / float(C), jnp.float32), jnp.int32(max_iter),
                          jnp.float32(tol), k=k)
  theta = np.asarray(theta, np.float64)
  f = x.shape[1]
  coef, intercept = theta[:f * k].reshape(f, k).T, theta[f * k:]
  if not standardize:
    coef = coef / scale
    intercept = intercept - coef @ mean
    mean, scale = np.zeros_like(mean), np.ones_like(scale)
  if k > 1:
    intercept = intercept - intercept.mean()
  return LogisticRegression(classes=classes, coef=np.ascontiguousarray(coef, np.float32),
                            intercept=intercept.astype(np.float32), mean=mean, scale=scale,
                            n_iter=int(n_iter))


def classification_metrics(y_true, y_pred, scores=None, *, classes=None) -> dict[str, float]:
  """Accuracy, balanced accuracy and (two classes) ROC AUC of predictions.

  Args:
    y_true, y_pred: ``(N,)`` labels.
    scores: ``(N,)`` scores of the positive class ``classes[1]`` (binary), or None.
    classes: the model's classes (for the positive class of ROC AUC); default the labels seen.

  Returns:
    ``{"accuracy", "balanced_accuracy"}`` and, with ``scores`` and two classes,
    ``"roc_auc"`` (nan when ``y_true`` holds one class only). Balanced accuracy is the mean
    recall over the classes present in ``y_true`` (``sklearn.metrics.balanced_accuracy_score``).
  """
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  if y_true.shape != y_pred.shape or y_true.ndim != 1:
    raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal (N,)")
  labels = np.unique(np.concatenate([y_true, y_pred]))
  true_index = np.searchsorted(labels, y_true).astype(np.int32)
  pred_index = np.searchsorted(labels, y_pred).astype(np.int32)
  recalls = [np.mean(pred_index[true_index == c] == c) for c in np.unique(true_index)]
  out = {"accuracy": float(accuracy(pred_index, true_index)),
         "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan")}
  classes = labels if classes is None else np.asarray(classes)
  if scores is not None and len(classes) == 2:
    scores = np.asarray(scores, np.float32)
    out["roc_auc"] = float(roc_auc(scores, (y_true == classes[1]).astype(np.int32)))
  return out


def linear_probe(train_x, train_y, test_x, test_y, *, C: float = 1.0, standardize: bool = True,
                 max_iter: int = 100) -> dict[str, float]:
  """Fits `fit_logistic_regression` on ``(train_x (N, F), train_y (N,))`` and scores it on
  ``(test_x (M, F), test_y (M,))`` with `classification_metrics` (ROC AUC of the decision
  function for two classes)."""
  model = fit_logistic_regression(train_x, train_y, C=C, standardize=standardize,
                                  max_iter=max_iter)
  test_x = _features("test_x", test_x, model.coef.shape[1])
  scores = model.decision_function(test_x)
  return classification_metrics(test_y, model.predict(test_x),
                                scores if scores.ndim == 1 else None, classes=model.classes)


def _features(name, x, num_features=None) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"{name} must be (N, F) features with N >= 1; got shape {x.shape}")
  if num_features is not None and x.shape[1] != num_features:
    raise ValueError(f"{name} must have {num_features} features; got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} holds non-finite values")
  return x


def _objective(theta, x, y, l2, k):
  """Loss summed over samples + ``1/2 sum_j l2_j ||W_j||^2`` (``l2`` ``(F,)``, one weight per
  feature); ``theta`` = ``[W (F, k) row-major, b (k,)]``,
  ``k = 1``: logistic loss of ``y`` in {0, 1}; ``k > 1``: multinomial loss of ``y`` in [0, k)."""
  f = x.shape[1]
  w, b = theta[:f * k].reshape(f, k), theta[f * k:]
  z = x @ w + b
  if k == 1:
    loss = jnp.sum(jax.nn.softplus(z[:, 0]) - y * z[:, 0])
  else:
    loss = jnp.sum(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], 1)[:, 0])
  return loss + 0.5 * jnp.sum(l2[:, None] * w * w)


@functools.partial(jax.jit, static_argnames="k")
def _newton(x, y, l2, max_iter, tol, *, k):
  """Damped Newton's method from zero: ``(theta, steps)``."""
  f = x.shape[1]
  size = (f + 1) * k
  objective = functools.partial(_objective, x=x, y=y, l2=l2, k=k)
  grad, hessian = jax.grad(objective), jax.hessian(objective)
  # Softmax scores are unchanged by a common shift of the k intercepts, the one direction the
  # (unpenalised) intercepts leave flat: adding v v^T makes the Hessian definite without
  # changing the Newton step, which the gradient (orthogonal to v) keeps orthogonal to v.
  v = jnp.zeros(size).at[f * k:].set(1.0 / np.sqrt(k)) if k > 1 else jnp.zeros(size)
  resolution = 10 * np.finfo(np.float32).eps

  def step(state):
    theta, value, it, _ = state
    g = grad(theta)
    h = hessian(theta) + jnp.outer(v, v)
    d = -jax.scipy.linalg.solve(h, g, assume_a="pos")
    slope = jnp.dot(g, d)
    # In the quadratic region the objective cannot resolve the decrease: take the full step.
    near = -slope <= resolution * (1.0 + jnp.abs(value))

    def halve(s):
      t, _, n = s
      return t / 2, objective(theta + (t / 2) * d), n + 1

    def insufficient(s):
      t, new_value, n = s
      return ~(new_value <= value + _ARMIJO * t * slope) & (n < _MAX_HALVINGS) & ~near

    t, new_value, _ = jax.lax.while_loop(insufficient, halve,
                                         (jnp.float32(1.0), objective(theta + d), 0))
    accepted = near | (new_value <= value + _ARMIJO * t * slope)
    theta_next = jnp.where(accepted, theta + t * d, theta)
    small = jnp.max(jnp.abs(t * d)) <= tol * jnp.maximum(1.0, jnp.max(jnp.abs(theta)))
    done = ~accepted | near | small | ~jnp.all(jnp.isfinite(d))
    return theta_next, jnp.where(accepted, new_value, value), it + 1, done

  theta0 = jnp.zeros(size, jnp.float32)
  state = (theta0, objective(theta0), jnp.int32(0), jnp.bool_(False))
  theta, _, steps, _ = jax.lax.while_loop(lambda s: ~s[3] & (s[2] < max_iter), step, state)
  return theta, steps
