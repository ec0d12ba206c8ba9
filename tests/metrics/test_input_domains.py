"""Every public metric rejects values outside its documented domain before tracing (issue 18).

`AUDIT` is the audit table: each public name of `jaxmed.metrics` maps to a `Spec`, one valid call
and its bad-input cases, each a `Case` (what is wrong, the keyword arguments that replace valid
ones, the argument the error must name). Every case must raise ValueError naming that argument;
the valid call must still run under `jax.jit` (value checks are skipped on tracers) and equal the
call on concrete input. A new public function fails `test_every_public_function_is_audited` until
it has an entry here. Machinery: tests/domain_cases.py.
"""

import numpy as np

import jaxmed.metrics as M
from domain_cases import Case, Spec, audit_tests

NAN, INF = float("nan"), float("inf")
rng = np.random.default_rng(0)
MASK = np.zeros((2, 6, 6), bool)
MASK[:, 1:4, 1:4] = True
MASK2 = np.roll(MASK, 1, axis=2)
PROBS = np.where(MASK, 0.9, 0.2).astype(np.float32)  # probabilities where a mask belongs
LABELS = np.stack([np.arange(36).reshape(6, 6) % 3] * 2)  # int labels in [0, 3)
IMG = rng.uniform(size=(2, 8, 8, 1)).astype(np.float32)
IMG2 = np.clip(IMG + 0.1 * rng.normal(size=IMG.shape), 0, 1).astype(np.float32)
VEC = rng.normal(size=(2, 6)).astype(np.float32)
VEC2 = VEC + rng.normal(size=(2, 6)).astype(np.float32)
BITS = np.array([[0, 1, 0, 1, 1, 0]] * 2, np.int32)
# A one-conv VGG-16 / SSFD encoder: enough for the relu1_1 / block1_relu2 taps.
VGG = {"conv1_1": {"kernel": rng.normal(size=(3, 3, 3, 2)).astype(np.float32),
                   "bias": np.zeros(2, np.float32)}}
SSFD = {"block1": {f"conv{i}": {"kernel": rng.normal(size=(3, 3, c, 2)).astype(np.float32),
                                "bias": np.zeros(2, np.float32)} for i, c in ((1, 1), (2, 2))}}


def _with(x, index, value):
  x = np.array(x, dtype=np.result_type(x, type(value)))
  x[index] = value
  return x


NAN_IMG, COMPLEX_IMG = _with(IMG, (0, 0, 0, 0), NAN), IMG.astype(np.complex64)
PAIR = dict(pred=MASK, target=MASK2)
IMAGES = dict(pred=IMG, target=IMG2)
SURFACE_CASES = [
    Case("probabilities as pred", dict(pred=PROBS), "pred"),
    Case("probabilities as target", dict(target=PROBS), "target"),
    Case("negative spacing", dict(spacing=(1.0, -1.0)), "spacing"),
    Case("NaN spacing", dict(spacing=NAN), "spacing"),
    Case("shapes differ", dict(target=MASK[:1]), "target"),
    Case("empty batch", dict(pred=MASK[:0], target=MASK[:0]), "pred"),
]
IMAGE_CASES = [
    Case("NaN in pred", dict(pred=NAN_IMG), "pred"),
    Case("Inf in target", dict(target=_with(IMG, (1, 2, 3, 0), INF)), "target"),
    Case("complex pred", dict(pred=COMPLEX_IMG), "pred"),
    Case("shapes differ", dict(target=IMG[:1]), "target"),
    Case("empty batch", dict(pred=IMG[:0], target=IMG[:0]), "pred"),
]
CORRELATION_CASES = [
    Case("NaN in x", dict(x=_with(VEC, (0, 1), NAN)), "x"),
    Case("complex y", dict(y=VEC + 1j), "y"),
    Case("shapes differ", dict(y=VEC[:, :4]), "y"),
]
COPER = dict(network="vgg16", taps=("relu1_1",), preprocess="none", params=VGG)
TAP_WEIGHTS = "weights['relu1_1']"  # how coper_distance names the weights of a tap
COPER_CASES = [
    Case("NaN in x", dict(x=NAN_IMG), "x"),
    Case("Inf in y", dict(y=_with(IMG, (0, 0, 0, 0), -INF)), "y"),
    Case("complex x", dict(x=COMPLEX_IMG), "x"),
    Case("empty batch", dict(x=IMG[:0], y=IMG[:0]), "x"),
]

AUDIT = {
    "accuracy": Spec(dict(pred=BITS, labels=1 - BITS), cases=[
        Case("probabilities as pred", dict(pred=BITS * 0.8), "pred"),
        Case("shapes differ", dict(labels=BITS[:, :3]), "labels"),
    ]),
    "average_surface_distance": Spec(PAIR, dict(spacing=(1.0, 2.0)), SURFACE_CASES),
    "coper_distance": Spec(dict(x=IMG, y=IMG2), COPER, COPER_CASES + [
        Case("negative channel weight", dict(weights=[np.array([1.0, -0.5])]), TAP_WEIGHTS),
        Case("NaN channel weight", dict(weights=[np.array([1.0, NAN])]), TAP_WEIGHTS),
        Case("unknown reduce", dict(reduce="max"), "reduce"),
    ]),
    "dice": Spec(dict(pred=MASK[..., None], target=MASK2[..., None]), cases=[
        Case("probabilities as pred", dict(pred=PROBS[..., None]), "pred"),
        Case("probabilities as target", dict(target=PROBS[..., None]), "target"),
        Case("label = num_classes", dict(pred=LABELS + 1, target=LABELS, num_classes=3), "pred"),
        Case("negative label", dict(pred=LABELS, target=LABELS - 1, num_classes=3), "target"),
        Case("float label map", dict(pred=LABELS * 1.0, target=LABELS, num_classes=3), "pred"),
        Case("num_classes 0", dict(pred=LABELS, target=LABELS, num_classes=0), "num_classes"),
        Case("shapes differ", dict(target=MASK[:1, ..., None]), "target"),
        Case("empty batch", dict(pred=MASK[:0, ..., None], target=MASK[:0, ..., None]), "pred"),
    ]),
    "distance_transform_edt": Spec(dict(mask=MASK), dict(spacing=0.5), [
        Case("probabilities as mask", dict(mask=PROBS), "mask"),
        Case("zero spacing", dict(spacing=0.0), "spacing"),
        Case("spacing of the wrong length", dict(spacing=(1.0, 1.0, 1.0)), "spacing"),
        Case("empty batch", dict(mask=MASK[:0]), "mask"),
    ]),
    "hausdorff_distance": Spec(PAIR, dict(percentile=95), SURFACE_CASES + [
        Case("percentile above 100", dict(percentile=101), "percentile"),
        Case("NaN percentile", dict(percentile=NAN), "percentile"),
    ]),
    "linear_cka": Spec(dict(x=VEC.T, y=VEC2.T), cases=[
        Case("NaN in x", dict(x=_with(VEC.T, (0, 0), NAN)), "x"),
        Case("Inf in y", dict(y=_with(VEC2.T, (1, 1), INF)), "y"),
        Case("complex x", dict(x=VEC.T + 1j), "x"),
        Case("example counts differ", dict(y=VEC2.T[:3]), "y"),
    ]),
    "mae": Spec(IMAGES, cases=IMAGE_CASES),
    "max_normalize": Spec(dict(d=np.abs(VEC)), cases=[
        Case("negative distance", dict(d=VEC), "d"),
        Case("NaN distance", dict(d=_with(np.abs(VEC), (0, 0), NAN)), "d"),
        Case("complex distance", dict(d=np.abs(VEC) + 1j), "d"),
        Case("0-d input", dict(d=np.float32(1.0)), "d"),
    ]),
    "mse": Spec(IMAGES, cases=IMAGE_CASES),
    "nmse": Spec(IMAGES, cases=IMAGE_CASES),
    "paired_t_test": Spec(dict(a=VEC, b=VEC2), cases=[
        Case("NaN in a", dict(a=_with(VEC, (1, 1), NAN)), "a"),
        Case("complex b", dict(b=VEC2 + 1j), "b"),
        Case("unknown alternative", dict(alternative="both"), "alternative"),
        Case("shapes differ", dict(b=VEC2[:1]), "b"),
    ]),
    "pearson": Spec(dict(x=VEC, y=VEC2), cases=CORRELATION_CASES),
    "psnr": Spec(IMAGES, dict(data_range=1.0), IMAGE_CASES + [
        Case("zero data_range", dict(data_range=0.0), "data_range"),
        Case("negative data_range of an item", dict(data_range=np.array([1.0, -1.0])),
             "data_range"),
        Case("NaN data_range", dict(data_range=NAN), "data_range"),
        Case("data_range of the wrong shape", dict(data_range=np.ones(3)), "data_range"),
    ]),
    "roc_auc": Spec(dict(scores=VEC, labels=BITS), cases=[
        Case("probabilities as labels", dict(labels=BITS * 0.7), "labels"),
        Case("NaN score", dict(scores=_with(VEC, (0, 2), NAN)), "scores"),
        Case("complex scores", dict(scores=VEC + 1j), "scores"),
        Case("shapes differ", dict(labels=BITS[:1]), "labels"),
    ]),
    "sensitivity_specificity": Spec(dict(pred=BITS, labels=BITS[:, ::-1]), cases=[
        Case("probabilities as pred", dict(pred=np.abs(VEC) / 10), "pred"),
        Case("label 2", dict(labels=BITS * 2), "labels"),
    ]),
    "spearman": Spec(dict(x=VEC, y=VEC2), cases=CORRELATION_CASES),
    "squared_tap_differences": Spec(dict(x=IMG, y=IMG2), COPER, COPER_CASES + [
        Case("a volume", dict(x=IMG[:, None], y=IMG2[:, None]), "x"),
    ]),
    "ssfd": Spec(IMAGES, dict(encoder_params=SSFD, layers=("block1_relu2",), num_groups=1), [
        Case("NaN in pred", dict(pred=NAN_IMG), "pred"),
        Case("negative layer weight", dict(weights=np.array([-1.0])), "weights"),
        Case("NaN layer weight", dict(weights=np.array([NAN])), "weights"),
        Case("num_groups 0", dict(num_groups=0), "num_groups"),
        Case("empty batch", dict(pred=IMG[:0], target=IMG[:0]), "pred"),
    ]),
    "ssim": Spec(IMAGES, dict(data_range=1.0, win_size=3), IMAGE_CASES + [
        Case("zero data_range", dict(data_range=0.0), "data_range"),
        Case("zero sigma", dict(sigma=0.0, win_size=None), "sigma"),
        Case("even win_size", dict(win_size=4), "win_size"),
        Case("NaN win_size", dict(win_size=NAN), "win_size"),
        Case("negative k1", dict(k1=-0.01), "k1"),
        Case("infinite k2", dict(k2=INF), "k2"),
    ]),
    "surface_dice": Spec(PAIR, dict(tolerance=1.0), SURFACE_CASES + [
        Case("negative tolerance", dict(tolerance=-1.0), "tolerance"),
        Case("NaN tolerance", dict(tolerance=NAN), "tolerance"),
    ]),
    "two_afc_score": Spec(dict(d0=np.abs(VEC), d1=np.abs(VEC2), judge=np.full((2, 6), 0.25)),
                          cases=[
        Case("judge above 1", dict(judge=np.full((2, 6), 1.5)), "judge"),
        Case("NaN judge", dict(judge=np.full((2, 6), NAN)), "judge"),
        Case("NaN in d0", dict(d0=_with(np.abs(VEC), (0, 0), NAN)), "d0"),
        Case("complex d1", dict(d1=np.abs(VEC2) + 1j), "d1"),
    ]),
    "vgg_perceptual_distance": Spec(IMAGES, dict(vgg_params=VGG, layer="relu1_1"), [
        Case("NaN in pred", dict(pred=NAN_IMG), "pred"),
        Case("Inf in target", dict(target=_with(IMG, (0, 1, 1, 0), INF)), "target"),
        Case("three channels", dict(pred=np.repeat(IMG, 3, -1), target=np.repeat(IMG2, 3, -1)),
             "pred"),
        Case("unknown layer", dict(layer="relu9_1"), "layer"),
        Case("unknown preprocess", dict(preprocess="tf"), "preprocess"),
    ]),
}

(test_every_public_function_is_audited, test_out_of_domain_input_is_rejected,
 test_valid_input_runs_under_jit) = audit_tests(M, AUDIT)
