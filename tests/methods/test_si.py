"""Source identification method: loss per strategy, exclusion of invalid samples, partner
gathering, and a tiny end-to-end training run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import config_for, tiny_config as make_tiny_config

from jaxmed.data import sources
from jaxmed.methods.si import SourceIdentificationMethod
from jaxmed.train import trainer
from jaxmed.train.logging import read_metrics

TINY = {"model.features": (4, 8), "data.modalities": ("t1", "flair")}


def _method(**overrides):
  return SourceIdentificationMethod(config_for("si", {**TINY, **overrides}))


def _batch(b=4, n=5, seed=0, masks=False):
  rng = np.random.default_rng(seed)
  batch = {"image": rng.normal(size=(b, 16, 16, 2)).astype(np.float32),
           "partners": rng.normal(size=(b, n - 1, 16, 16, 2)).astype(np.float32)}
  if masks:
    batch["brain_mask"] = np.ones((b, 16, 16), bool)
    batch["partner_mask"] = np.ones((b, n - 1, 16, 16), bool)
  return batch


@pytest.fixture(scope="module")
def variables():
  """Tiny UNet variables (T x M~ = 4 inputs, T = 2 outputs), the same for every strategy."""
  method = _method()
  return trainer.jit_init(method.init)(jax.random.PRNGKey(0), _batch(masks=True))


@functools.cache
def _loss_and_grad_fn(method):
  def fn(params, variables, batch, key):
    loss, metrics, _ = method.loss({**variables, "params": params}, batch, key, train=True)
    return loss, metrics
  return jax.jit(jax.value_and_grad(fn, has_aux=True))


@functools.cache
def _reconstruct_fn(method):
  return jax.jit(method.reconstruct)


def _loss_and_grad(method, variables, batch, key):
  return _loss_and_grad_fn(method)(variables["params"], variables, batch, key)


_CROSS = _method()


@pytest.mark.parametrize("strategy", ["cross", "within", "denoise"])
def test_loss_is_finite_with_a_gradient(strategy, variables):
  method = _CROSS if strategy == "cross" else _method(**{"pretext.strategy": strategy})
  batch = _batch(masks=True)
  if strategy == "denoise":
    batch = {"image": batch["image"]}
  # T x M~ input channels (Sec. 5.4), T outputs.
  assert variables["params"]["input_conv"]["conv"]["kernel"].shape[-2] == 2 * 2
  (loss, metrics), grads = _loss_and_grad(method, variables, batch, jax.random.PRNGKey(1))
  assert np.isfinite(float(loss)) and float(loss) > 0
  np.testing.assert_allclose(float(loss), float(metrics["l1"] + metrics["l2"]), rtol=1e-6)
  assert float(metrics["valid_fraction"]) == 1.0
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(norms) > 0


def test_invalid_samples_are_excluded(variables):
  method = _CROSS
  batch = _batch(masks=True)
  # Samples 2 and 3: the target's brain is in the top half, every partner's in the bottom half.
  batch["brain_mask"][2:, 8:] = False
  batch["partner_mask"][2:, :, :8] = False
  key = jax.random.PRNGKey(3)
  (loss, metrics), _ = _loss_and_grad(method, variables, batch, key)
  assert float(metrics["valid_fraction"]) == 0.5
  # Recompute by hand from the same mixture: per-sample L1 + L2, mean over samples 0 and 1.
  mix_key = jax.random.split(key)[0]
  np.testing.assert_array_equal(method.mix(mix_key, batch).valid, [True, True, False, False])
  inputs, pred = _reconstruct_fn(method)(variables, batch, mix_key)
  assert inputs.shape == (4, 16, 16, 4) and pred.shape == (4, 16, 16, 2)
  err = np.asarray(pred) - batch["image"]
  per_sample = np.abs(err).mean((1, 2, 3)) + np.square(err).mean((1, 2, 3))
  np.testing.assert_allclose(float(loss), per_sample[:2].mean(), rtol=1e-5)

  none_valid = {**batch, "brain_mask": np.zeros_like(batch["brain_mask"])}
  (loss, metrics), grads = _loss_and_grad(method, variables, none_valid, key)
  assert float(loss) == 0.0 and float(metrics["valid_fraction"]) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def _slice_table(slices_per_subject=(3, 4, 2, 5)):
  rng = np.random.default_rng(0)
  s = sum(slices_per_subject)
  return {"image": rng.normal(size=(s, 16, 16, 2)).astype(np.float32),
          "label": np.zeros((s, 16, 16), np.uint8),
          "brain_mask": rng.random((s, 16, 16)) > 0.5,
          "subject_index": np.repeat(np.arange(len(slices_per_subject)),
                                     slices_per_subject).astype(np.int32),
          "slice_index": np.concatenate([np.arange(n) for n in slices_per_subject]
                                        ).astype(np.int32)}


def _rows_of(images, table_images):
  """Row of the slice table holding each of ``images`` (exact match)."""
  flat = table_images.reshape(len(table_images), -1)
  return [int(np.flatnonzero((flat == x.reshape(-1)).all(1))[0]) for x in images]


@pytest.mark.parametrize("strategy", ["cross", "within"])
def test_example_transform_gathers_partners(strategy):
  arrays = _slice_table()
  transform = _method(**{"pretext.strategy": strategy}).example_transform(arrays)
  rng = np.random.default_rng(0)
  for row in range(len(arrays["image"])):
    example = {k: v[row] for k, v in arrays.items()}
    out = transform(example, rng)
    assert out["partners"].shape == (4, 16, 16, 2) and out["partners"].dtype == np.float32
    assert out["partner_mask"].shape == (4, 16, 16) and out["partner_mask"].dtype == bool
    rows = _rows_of(out["partners"], arrays["image"])
    np.testing.assert_array_equal(out["partner_mask"], arrays["brain_mask"][rows])
    subjects = arrays["subject_index"][rows]
    if strategy == "cross":
      assert example["subject_index"] not in subjects and len(set(subjects)) == 3
    else:
      assert np.all(subjects == example["subject_index"]) and row not in rows
  assert _method(**{"pretext.strategy": "denoise"}).example_transform(arrays) is None


def test_errors():
  with pytest.raises(ValueError, match="pretext.strategy must be one of"):
    _method(**{"pretext.strategy": "mixup"})
  with pytest.raises(ValueError, match=r"num_components must be in \[2, num_sources=3\]"):
    _method(**{"pretext.num_sources": 3, "pretext.num_components": 4})
  with pytest.raises(ValueError, match="num_mixtures must be >= 2"):
    _method(**{"pretext.num_mixtures": 1})
  with pytest.raises(ValueError, match="min_overlap"):
    _method(**{"pretext.min_overlap": 1.0})
  method = _method()
  batch = _batch()
  with pytest.raises(ValueError, match=r"needs batch\['partners'\]"):
    method.mix(jax.random.PRNGKey(0), {"image": batch["image"]})
  with pytest.raises(ValueError, match="must hold num_sources - 1 = 4 partners"):
    method.mix(jax.random.PRNGKey(0), {**batch, "partners": batch["partners"][:, :2]})
  with pytest.raises(ValueError, match="missing"):
    method.example_transform({"image": batch["image"]})


def test_tiny_cross_patient_training_run(tiny_config, tmp_path):
  del tiny_config
  config = make_tiny_config("si", pretext__strategy="cross")
  method = SourceIdentificationMethod(config)
  seen = []

  def example_transform(arrays):
    transform = SourceIdentificationMethod.example_transform(method, arrays)

    @functools.wraps(transform)
    def recording(example, rng):
      out = transform(example, rng)
      seen.append((arrays, int(example["subject_index"]), out["partners"]))
      return out
    return recording

  method.example_transform = example_transform
  result = trainer.train(config, str(tmp_path), method=method, progress=False)
  assert int(result.state.step) == 12
  # Every example of every batch carried 4 partners from other subjects.
  assert len(seen) >= 12 * config.batch_size
  arrays = sources.materialize(seen[0][0])
  assert len(np.unique(arrays["subject_index"])) == 4  # 6 phantoms - 1 val - 1 test
  for _, subject, partners in seen[:: 7]:
    rows = _rows_of(partners, arrays["image"])
    assert subject not in arrays["subject_index"][rows]
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [5, 10, 12]
  assert all(np.isfinite(r["loss"]) and 0 < r["valid_fraction"] <= 1 for r in records)
  assert records[-1]["loss"] < records[0]["loss"] * 1.5
