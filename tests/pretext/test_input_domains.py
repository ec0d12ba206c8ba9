"""Every public pretext transform rejects values outside its documented domain before tracing
(issue 18).

`AUDIT` maps each public name of `jaxmed.pretext` to a `Spec`, one valid call and its bad-input
cases (tests/domain_cases.py): each case must raise naming the argument; the valid call must still
run under `jax.jit` (ratios, counts and sizes are static Python values, checked while tracing;
masks and indices are checked only when concrete).
"""

import jax
import jax.numpy as jnp
import numpy as np

import jaxmed.pretext as P
from domain_cases import Case, Spec, audit_tests

NAN = float("nan")
KEY = jax.random.key(0)
IMG = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype(np.float32)
TOKENS = np.random.default_rng(1).normal(size=(2, 4, 3)).astype(np.float32)  # (N, T, C)
IDS = np.array([[0, 2], [3, 1]], np.int32)


class _MAE:
  """A stand-in MaskedAutoencoderViT: 2x2 patches, the prediction made of the restore ids."""
  mask_ratio = 0.75

  def num_tokens(self, spatial):
    return int(np.prod([s // 2 for s in spatial]))

  def apply(self, variables, x, ids_keep, ids_restore, *, train, return_features):
    del x, train, return_features
    return variables["w"] * ids_restore[..., None].astype(jnp.float32), {"keep": ids_keep}


def _augment(key, images):
  """Deterministic (no random bits to compile): the views' keys are two_views' business."""
  del key
  return images[:, ::-1]


RATIO_CASES = [Case("ratio above 1", dict(ratio=1.5), "ratio"),
               Case("negative ratio", dict(ratio=-0.1), "ratio"),
               Case("NaN ratio", dict(ratio=NAN), "ratio")]
MASK_RATIO_CASES = [Case("mask_ratio 1", dict(mask_ratio=1.0), "mask_ratio"),
                    Case("negative mask_ratio", dict(mask_ratio=-0.5), "mask_ratio"),
                    Case("NaN mask_ratio", dict(mask_ratio=NAN), "mask_ratio")]
KEEP_PROB_CASES = [Case("keep_prob above 1", dict(keep_prob=1.5), "keep_prob"),
                   Case("NaN keep_prob", dict(keep_prob=NAN), "keep_prob"),
                   Case("grid 0", dict(grid=0), "grid")]
CROP = dict(image=IMG)

AUDIT = {
    "add_noise": Spec(dict(key=KEY, x=IMG), dict(variance=0.1), [
        Case("negative variance", dict(variance=-0.1), "variance"),
        Case("NaN variance", dict(variance=NAN), "variance"),
        Case("rank 3", dict(x=IMG[0]), "x"),
        Case("empty batch", dict(x=IMG[:0]), "x"),
        Case("integer x", dict(x=IMG.astype(np.int32)), "x", TypeError),
    ]),
    "apply_channel_mask": Spec(dict(embeddings=TOKENS, mask=np.array([[1, 0, 1], [0, 0, 1]])),
                               cases=[
        Case("probabilities as mask", dict(mask=np.full((2, 3), 0.4)), "mask"),
        Case("keep-mask scaled by 1 / (1 - ratio)", dict(mask=np.full((2, 3), 2.5)), "mask"),
        Case("mask of the wrong shape", dict(mask=np.ones((2, 4))), "mask"),
    ]),
    "channel_masking": Spec(dict(key=KEY, x=TOKENS), dict(ratio=0.6), RATIO_CASES + [
        Case("no channel axis", dict(x=np.float32(1.0)), "x"),
    ]),
    "disrupt": Spec(dict(key=KEY, x=IMG), dict(kind="downsample", factor=2), [
        Case("unknown kind", dict(kind="blur"), "kind"),
        Case("negative noise_variance", dict(kind="noise", noise_variance=-1.0),
             "noise_variance"),
        Case("NaN noise_variance", dict(kind="noise+downsample", noise_variance=NAN),
             "noise_variance"),
        Case("factor that does not divide", dict(factor=3), "factor"),
        Case("unknown resample", dict(resample="cubic"), "resample"),
    ]),
    "downsample_upsample": Spec(dict(x=IMG), dict(factor=2, method="nearest"), [
        Case("factor 0", dict(factor=0), "factor"),
        Case("factor that does not divide", dict(factor=3), "factor"),
        Case("unknown method", dict(method="cubic"), "method"),
    ]),
    "grid_cell_mask": Spec(dict(key=KEY), dict(shape=(2, 8, 8), grid=4, keep_prob=0.5),
                           KEEP_PROB_CASES + [
        Case("empty batch", dict(shape=(0, 8, 8)), "shape"),
        Case("negative size", dict(shape=(2, -8, 8)), "shape"),
    ]),
    "grid_inpaint": Spec(dict(key=KEY, images=IMG), dict(grid=4, keep_prob=0.5),
                         KEEP_PROB_CASES + [
        Case("rank 2", dict(images=IMG[0, ..., 0]), "images"),
        Case("empty batch", dict(images=IMG[:0]), "images"),
    ]),
    "local_channel_mask": Spec(dict(key=KEY), dict(n=2, channels=5), RATIO_CASES + [
        Case("n 0", dict(n=0), "n"),
        Case("channels 0", dict(channels=0), "channels"),
    ]),
    "mae_forward": Spec(dict(variables={"w": np.float32(2.0)}, x=IMG, key=KEY),
                        dict(model=_MAE()), MASK_RATIO_CASES + [
        Case("no channel axis", dict(x=IMG[0, ..., 0]), "x"),
    ]),
    "multi_crop": Spec(CROP, dict(global_size=4, local_size=2, num_global=1, num_local=0,
                                  flip=False, key=KEY), [
        Case("global_scale with low 0", dict(global_scale=(0.0, 1.0)), "global_scale"),
        Case("local_scale above 1", dict(local_scale=(0.5, 1.5)), "local_scale"),
        Case("NaN ratio", dict(ratio=(NAN, 1.0)), "ratio"),
        Case("num_global 0", dict(num_global=0), "num_global"),
        Case("global_size 0", dict(global_size=0), "global_size"),
    ]),
    "random_masking": Spec(dict(key=KEY), dict(n=2, num_tokens=8, mask_ratio=0.75),
                           MASK_RATIO_CASES + [
        Case("n 0", dict(n=0), "n"),
        Case("num_tokens 0", dict(num_tokens=0), "num_tokens"),
    ]),
    "random_resized_crop": Spec(dict(key=KEY, image=IMG), dict(size=4), [
        Case("scale with low 0", dict(scale=(0.0, 1.0)), "scale"),
        Case("scale above 1", dict(scale=(0.5, 1.5)), "scale"),
        Case("ratio low above high", dict(ratio=(2.0, 1.0)), "ratio"),
        Case("size 0", dict(size=0), "size"),
        Case("rank 3", dict(image=IMG[0]), "image"),
    ]),
    "restore_ids": Spec(dict(ids_keep=IDS), dict(num_tokens=4), [
        Case("index = num_tokens", dict(ids_keep=IDS + 1), "ids_keep"),
        Case("negative index", dict(ids_keep=IDS - 1), "ids_keep"),
        Case("index repeated in a row", dict(ids_keep=np.array([[0, 0], [1, 2]])), "ids_keep"),
        Case("float indices", dict(ids_keep=IDS * 1.0), "ids_keep"),
        Case("num_tokens 0", dict(num_tokens=0), "num_tokens"),
    ]),
    "two_views": Spec(dict(key=KEY, image=IMG), dict(augment=_augment), [
        Case("rank 3", dict(image=IMG[0]), "image"),
        Case("augment that drops the batch axis", dict(augment=lambda k, x: x[0]), "augment"),
        Case("no augment", dict(augment=None), "augment", TypeError),
    ]),
}

# The transforms that check values of array arguments (the rest check static arguments, which
# their traced call checks too).
VALUE_CHECKED = {"apply_channel_mask", "restore_ids"}
(test_every_public_function_is_audited, test_out_of_domain_input_is_rejected,
 test_valid_input_runs_under_jit) = audit_tests(P, AUDIT, concrete=VALUE_CHECKED.__contains__)
