"""The fine-tuning protocol of source_identification Sec. 5.5: early stopping, mixup, the
``All`` region, repeated splits and paired t-test comparisons."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from helpers import tiny_config as make_tiny_config

from jaxmed.data import datasets
from jaxmed.evaluate import compare, evaluators, finetune
from jaxmed.methods.segmentation import SegmentationMethod, mixup
from jaxmed.train import trainer


def test_early_stopping_keeps_best_and_counts_patience():
  early = finetune.EarlyStopping(patience=2)
  early.update(10, 0.5, {"w": np.array(1.0)})
  early.update(20, 0.7, {"w": np.array(2.0)})
  assert not early.should_stop(20, {})
  early.update(30, 0.6, {"w": np.array(3.0)})
  early.update(40, float("nan"), {"w": np.array(4.0)})
  assert early.should_stop(40, {})
  assert early.best_step == 20 and early.best_score == 0.7
  assert float(early.best_variables["w"]) == 2.0
  assert not finetune.EarlyStopping(patience=0).should_stop(0, {})
  with pytest.raises(ValueError, match="patience"):
    finetune.EarlyStopping(patience=-1)
  # Not before min_steps, however long the plateau.
  late = finetune.EarlyStopping(patience=1, min_steps=50)
  for step in (10, 20, 30, 40):
    late.update(step, 0.0, {})
  assert not late.should_stop(40, {}) and late.should_stop(50, {})
  with pytest.raises(ValueError, match="min_steps"):
    finetune.EarlyStopping(patience=1, min_steps=-1)


def test_trainer_stops_when_the_rule_says_so(tiny_config, tmp_path):
  tiny_config.eval_every = 4
  asked = []
  def stop(step, metrics):
    asked.append((step, metrics["probe"]))
    return step >= 8
  result = trainer.train(tiny_config, str(tmp_path), hooks=[lambda step, state: {"probe": 1.0}],
                         stop=stop, progress=False)
  assert result.stopped_early and int(result.state.step) == 8
  assert asked == [(4, 1.0), (8, 1.0)]


def test_mixup_blends_images_and_targets_alike():
  # Example n is a single bright pixel at (0, n): a mixture shows its lambda and its partner.
  n = 6
  image = jnp.zeros((n, 4, 8, 1)).at[jnp.arange(n), 0, jnp.arange(n), 0].set(1.0)
  target = jnp.concatenate([image, image], axis=-1)
  mixed_image, mixed_target = mixup(jax.random.PRNGKey(2), image, target, alpha=0.4)
  assert mixed_image.shape == image.shape and mixed_target.shape == target.shape
  row = np.asarray(mixed_image[:, 0, :, 0])
  partners = set()
  for i in range(n):
    lam = row[i, i]
    others = np.delete(row[i], i)
    assert 0.0 <= lam <= 1.0 and np.isclose(lam + others.sum(), 1.0, atol=1e-6)
    assert np.count_nonzero(others > 1e-7) <= 1        # one partner per example
    partners.add(int(np.argmax(np.r_[row[i, :i], -1, row[i, i + 1:]])) if lam < 1 else i)
    np.testing.assert_allclose(mixed_target[i, ..., 0], mixed_image[i, ..., 0], atol=1e-6)
    np.testing.assert_allclose(mixed_target[i, ..., 1], mixed_image[i, ..., 0], atol=1e-6)
  assert len(partners) > 1
  assert not np.allclose(row, np.eye(n, 8))           # something was mixed
  with pytest.raises(ValueError, match="alpha"):
    mixup(jax.random.PRNGKey(0), image, target, alpha=0.0)


def test_segmentation_loss_with_mixup_is_finite(tiny_arrays):
  method = SegmentationMethod(make_tiny_config("segmentation", finetune__mixup_alpha=0.2))
  batch = {k: v[:4] for k, v in tiny_arrays.items()}
  variables = trainer.jit_init(method.init)(jax.random.PRNGKey(0), batch)
  loss, metrics, _ = jax.jit(lambda v, b, k: method.loss(v, b, k, train=True))(
      variables, batch, jax.random.PRNGKey(1))
  assert np.isfinite(float(loss)) and set(metrics) == {"dice_WT", "dice_TC", "dice_ET"}


def test_all_region_is_dice_of_the_concatenated_regions(monkeypatch):
  config = make_tiny_config("segmentation")
  method = SegmentationMethod(config)
  subject = datasets.load_splits(config.data)["test"][0]
  rng = np.random.default_rng(0)
  pred = rng.random(subject.regions.shape) > 0.5
  monkeypatch.setattr(evaluators, "predict_volume", lambda m, v, image, **kw: pred)
  result = evaluators.evaluate_subjects(method, None, [subject])
  assert result["regions"] == ("WT", "TC", "ET", "All")
  truth = subject.regions
  expected = 2 * np.sum(pred & truth) / (pred.sum() + truth.sum())
  np.testing.assert_allclose(result["dice"][0, 3], expected, rtol=1e-5)
  assert evaluators.region_columns(("WMH",)) == ("WMH",)


def test_repeated_splits_differ_and_never_overlap(tiny_config):
  subjects = datasets.load_subjects(tiny_config.data)
  splits = datasets.repeated_splits(subjects, repeats=3, num_val=1, num_test=2, seed=0)
  tests = [tuple(s.subject_id for s in split["test"]) for split in splits]
  assert len(set(tests)) > 1
  for split in splits:
    ids = [{s.subject_id for s in split[k]} for k in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == len(subjects)


def test_significance_table_markers_match_scipy():
  rng = np.random.default_rng(0)
  base = rng.uniform(0.5, 0.8, size=(30, 2))
  scores = {"scratch": base, "better": base + rng.normal(0.05, 0.02, base.shape),
            "worse": base - rng.normal(0.05, 0.02, base.shape),
            "same": base + rng.normal(0.0, 0.05, base.shape)}
  scores["same"][3, 1] = np.nan  # a region absent from one subject: that pair is dropped
  stats = compare.compare_rows(scores, baseline="scratch")
  for name in ("better", "worse", "same"):
    for r in range(2):
      keep = np.isfinite(scores[name][:, r])
      expected = scipy.stats.ttest_rel(scores[name][keep, r], base[keep, r]).pvalue
      np.testing.assert_allclose(stats[name].p[r], expected, rtol=1e-4)
  assert stats["better"].marker == ["*", "*"] and stats["worse"].marker == ["◇", "◇"]
  assert stats["better"].bold == [True, True] and stats["scratch"].bold == [False, False]
  table = compare.significance_table(scores, ["WT", "WMH"], baseline="scratch")
  assert "| better | **" in table and "◇" in table
  with pytest.raises(ValueError, match="baseline"):
    compare.compare_rows(scores, baseline="cnn")


def test_dice_table_mean_excludes_the_all_column():
  result = {"mean": {"WT": 0.9, "TC": 0.5, "ET": 0.1, "All": 0.8},
            "dice": np.array([[0.8, 0.4, 0.0, 0.7], [1.0, 0.6, 0.2, 0.9]])}
  table = evaluators.dice_table({"run": result})
  assert table.splitlines()[0] == "| run | WT | TC | ET | All | mean |"
  assert table.splitlines()[2] == ("| run | 0.900 (0.100) | 0.500 (0.100) | 0.100 (0.100) | "
                                   "0.800 (0.100) | 0.500 |")
