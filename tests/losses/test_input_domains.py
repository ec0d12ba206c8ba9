"""Every public loss rejects values outside its documented domain before tracing (issue 18).

`AUDIT` maps each public name of `jaxmed.losses` to a `Spec`, one valid call and its bad-input
cases (tests/domain_cases.py): each case must raise naming the argument; the valid call must still
run under `jax.jit`, where the value checks skip the tracers (a training step), and equal the
call on concrete input.
"""

import jax
import jax.numpy as jnp
import numpy as np

import jaxmed.losses as L
from domain_cases import Case, Spec, audit_tests

NAN, INF = float("nan"), float("inf")
rng = np.random.default_rng(0)
IMG = rng.uniform(-1, 1, size=(2, 6, 6, 2)).astype(np.float32)
IMG2 = rng.uniform(-1, 1, size=(2, 6, 6, 2)).astype(np.float32)
VOL = rng.uniform(-1, 1, size=(1, 3, 4, 4, 1)).astype(np.float32)
TARGET = (IMG > 0).astype(np.float32)  # region targets in {0, 1}
PROBS = 1 / (1 + np.exp(-IMG))
LABELS = np.arange(72).reshape(2, 6, 6) % 2
VEC = rng.normal(size=(4, 3)).astype(np.float32)
VEC2 = rng.normal(size=(4, 3)).astype(np.float32)
SCORES = rng.uniform(-1, 1, size=(3, 4, 5)).astype(np.float32)  # (V, B, K)
CODES = np.full((2, 4, 5), 0.2, np.float32)                      # (A, B, K)
MASK = np.ones((2, 6, 6, 1), np.float32)


def _with(x, index, value):
  x = np.array(x, dtype=np.result_type(x, type(value)))
  x[index] = value
  return x


def _features(x):
  """A stand-in frozen network: two 'taps' of a (M, H, W, 3) batch."""
  return {"a": jnp.tanh(x), "b": jnp.mean(x * x, axis=(1, 2), keepdims=True)}


class _TapNet:
  """A stand-in Flax module for `network_features`: ``apply`` returns the requested taps."""

  def __call__(self, x, *, train=False, taps=()):
    """Never called: `network_features` reads only this signature (whether it takes taps)."""
    raise NotImplementedError

  def apply(self, variables, x, *, train, taps):
    del train
    return {t: x * variables["params"]["w"] for t in taps}


RECONSTRUCTION = dict(pred=IMG, target=IMG2, weights=MASK)
RECONSTRUCTION_CASES = [
    Case("shapes differ", dict(target=IMG2[:, :4]), "target"),
    Case("negative weight", dict(weights=-MASK), "weights"),
    Case("NaN weight", dict(weights=_with(MASK, (0, 0, 0, 0), NAN)), "weights"),
    Case("infinite weight", dict(weights=MASK * INF), "weights"),
    Case("weights that do not broadcast", dict(weights=MASK[:, :3]), "weights"),
    Case("complex pred", dict(pred=IMG + 1j), "pred"),
]
COSINE_EPS = [Case("eps 0", dict(eps=0.0), "eps"), Case("negative eps", dict(eps=-1e-8), "eps"),
              Case("NaN eps", dict(eps=NAN), "eps")]
SOFTMAX_LOGITS = rng.normal(size=(2, 6, 6, 2)).astype(np.float32)

AUDIT = {
    "cmcl_loss": Spec(dict(embeddings=VEC, modality_ids=np.array([0, 1, 0, 1], np.int32)),
                      cases=COSINE_EPS + [
        Case("temperature 0", dict(temperature=0.0), "temperature"),
        Case("infinite temperature", dict(temperature=INF, form="reference"), "temperature"),
        Case("unknown form", dict(form="clip"), "form"),
        Case("modality_ids of the wrong shape", dict(modality_ids=np.zeros(3, np.int32)),
             "modality_ids"),
        Case("complex embeddings", dict(embeddings=VEC + 1j), "embeddings"),
        Case("float modality_ids", dict(modality_ids=np.zeros(4)), "modality_ids", TypeError),
    ]),
    "coper_loss": Spec(dict(pred=IMG, target=IMG2), dict(features_fn=_features), [
        Case("shapes differ", dict(target=IMG2[:1]), "target"),
        Case("complex pred", dict(pred=IMG + 1j), "pred"),
        Case("empty batch", dict(pred=IMG[:0], target=IMG2[:0]), "pred"),
        Case("a volume", dict(pred=VOL, target=VOL), "pred"),
    ]),
    "edge_loss": Spec(dict(pred=IMG, target=IMG2), cases=[
        Case("negative eps", dict(eps=-1e-6), "eps"),
        Case("NaN eps", dict(eps=NAN), "eps"),
        Case("shapes differ", dict(target=IMG2[:1]), "target"),
        Case("complex target", dict(target=IMG2 + 1j), "target"),
    ]),
    "global_average_pool": Spec(dict(features=IMG), cases=[
        Case("complex features", dict(features=IMG + 1j), "features"),
        Case("no spatial axis", dict(features=VEC), "features"),
        Case("empty batch", dict(features=IMG[:0]), "features"),
    ]),
    "l1_l2_loss": Spec(RECONSTRUCTION, cases=RECONSTRUCTION_CASES),
    "l1_loss": Spec(RECONSTRUCTION, cases=RECONSTRUCTION_CASES),
    "l2_loss": Spec(RECONSTRUCTION, cases=RECONSTRUCTION_CASES),
    "negative_cosine": Spec(dict(p=VEC, z=VEC2), cases=COSINE_EPS + [
        Case("shapes differ", dict(z=VEC2[:2]), "z"),
        Case("complex p", dict(p=VEC + 1j), "p"),
    ]),
    "network_features": Spec(dict(variables={"params": {"w": np.float32(2.0)}}),
                             dict(module=_TapNet(), taps=("t",)), [
        Case("unknown preprocess", dict(preprocess="caffe"), "preprocess"),
        Case("variables without params", dict(variables={"batch_stats": {}}), "variables",
             TypeError),
    ], after=lambda features_fn: features_fn(jnp.asarray(IMG[..., :1].repeat(3, -1)))),
    "sigmoid_dice_ce_loss": Spec(dict(logits=IMG, target=TARGET), cases=[
        Case("target above 1", dict(target=TARGET * 2), "target"),
        Case("NaN target", dict(target=_with(TARGET, (0, 0, 0, 0), NAN)), "target"),
        Case("shapes differ", dict(target=TARGET[..., :1]), "target"),
        Case("negative dice_weight", dict(dice_weight=-1.0), "dice_weight"),
        Case("NaN ce_weight", dict(ce_weight=NAN), "ce_weight"),
        Case("complex logits", dict(logits=IMG + 1j), "logits"),
    ]),
    "nt_xent_loss": Spec(dict(z1=VEC, z2=VEC2), cases=[
        Case("shapes differ", dict(z2=VEC2[:2]), "z1 and z2"),
        Case("temperature 0", dict(temperature=0.0), "temperature"),
        Case("eps 0", dict(eps=0.0), "eps"),
        Case("complex z1", dict(z1=VEC + 1j), "z1"),
    ]),
    "simsiam_loss": Spec(dict(p1=VEC, p2=VEC2, z1=VEC2, z2=VEC), cases=COSINE_EPS + [
        Case("shapes differ", dict(z2=VEC[:2]), "z2"),
        Case("complex p1", dict(p1=VEC + 1j), "p1"),
    ]),
    "sinkhorn_knopp": Spec(dict(scores=SCORES[0]), cases=[
        Case("epsilon 0", dict(epsilon=0.0), "epsilon"),
        Case("infinite epsilon", dict(epsilon=INF), "epsilon"),
        Case("iterations 0", dict(iterations=0), "iterations"),
        Case("complex scores", dict(scores=SCORES[0] + 1j), "scores"),
        Case("1-D scores", dict(scores=SCORES[0, 0]), "scores"),
    ]),
    "sobel_magnitude": Spec(dict(x=IMG), cases=[
        Case("negative eps", dict(eps=-1.0), "eps"),
        Case("NaN eps", dict(eps=NAN), "eps"),
        Case("complex x", dict(x=IMG + 1j), "x"),
        Case("rank 3", dict(x=IMG[0]), "x"),
    ]),
    "soft_dice_loss": Spec(dict(probs=PROBS, target=TARGET), cases=[
        Case("probs above 1", dict(probs=PROBS + 1), "probs"),
        Case("logits as probs", dict(probs=IMG), "probs"),
        Case("NaN probs", dict(probs=_with(PROBS, (1, 1, 1, 1), NAN)), "probs"),
        Case("labels as target", dict(target=TARGET * 2), "target"),
        Case("negative smooth", dict(smooth=-1e-5), "smooth"),
        Case("shapes differ", dict(target=TARGET[:1]), "target"),
    ]),
    "softmax_dice_ce_loss": Spec(dict(logits=SOFTMAX_LOGITS, labels=LABELS), cases=[
        Case("label = K", dict(labels=LABELS * 2), "labels"),
        Case("negative label", dict(labels=LABELS - 1), "labels"),
        Case("float labels", dict(labels=LABELS * 1.0), "labels"),
        Case("labels of the wrong shape", dict(labels=LABELS[:, :3]), "labels"),
        Case("negative dice_weight", dict(dice_weight=-1.0), "dice_weight"),
        Case("complex logits", dict(logits=SOFTMAX_LOGITS + 1j), "logits"),
    ]),
    "swav_loss": Spec(dict(scores=SCORES, assignments=CODES), cases=[
        Case("scores as codes", dict(assignments=SCORES[:2] * 3), "assignments"),
        Case("negative code", dict(assignments=CODES - 0.3), "assignments"),
        Case("NaN code", dict(assignments=_with(CODES, (0, 0, 0), NAN)), "assignments"),
        Case("temperature 0", dict(temperature=0.0), "temperature"),
        Case("infinite temperature", dict(temperature=INF), "temperature"),
        Case("crop index out of range", dict(crops_for_assign=(0, 3)), "crops_for_assign"),
    ]),
    "volume_perceptual_loss": Spec(dict(pred=VOL, target=VOL * 0.5, key=jax.random.key(0)),
                                   dict(features_fn=_features, num_slices=2), [
        Case("num_slices above D", dict(num_slices=4), "num_slices"),
        Case("negative num_slices", dict(num_slices=-1), "num_slices"),
        Case("no key", dict(key=None), "key"),
        Case("shapes differ", dict(target=VOL[:, :2]), "target"),
    ]),
}

(test_every_public_function_is_audited, test_out_of_domain_input_is_rejected,
 test_valid_input_runs_under_jit) = audit_tests(L, AUDIT)
