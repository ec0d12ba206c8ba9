"""Tests for the 2AFC harness: BAPPS reader, scoring, the phantom proxy set, LPIPS tap-weight
learning and the rating normalisation (CoPer Sec. IV-A, Table II, Fig. 3b)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from jaxmed.data import tfds as jtfds
from jaxmed.evaluate import two_afc
from jaxmed.metrics import two_afc_score

# ----------------------------------------------------------------------------- BAPPS reader


def _write_category(folder, ids, judges, rng, size=64):
  """Fake BAPPS 2AFC category: PNG patches and judge .npy files; returns the uint8 arrays."""
  written = {"ref": [], "p0": [], "p1": []}
  for name in written:
    (folder / name).mkdir(parents=True, exist_ok=True)
  (folder / "judge").mkdir(parents=True, exist_ok=True)
  for patch_id, judge in zip(ids, judges):
    for name in written:
      array = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
      Image.fromarray(array).save(folder / name / f"{patch_id}.png")
      written[name].append(array)
    np.save(folder / "judge" / f"{patch_id}.npy", np.array([judge], np.float32))
  return {k: np.stack(v) for k, v in written.items()}


def _bapps(root):
  """val/{cnn, traditional} (written in that order: the reader reports BAPPS's order)."""
  rng = np.random.default_rng(0)
  cnn = _write_category(root / "val" / "cnn", ["000001", "000000"], [0.25, 1.0], rng)
  trad = _write_category(root / "val" / "traditional", ["000000", "000002", "000001"],
                         [0.0, 0.5, 0.75], rng)
  # Written ids out of order: the reader sorts them.
  cnn = {k: v[::-1] for k, v in cnn.items()}
  trad = {k: v[[0, 2, 1]] for k, v in trad.items()}
  return {"traditional": (trad, [0.0, 0.75, 0.5]), "cnn": (cnn, [1.0, 0.25])}


@pytest.mark.parametrize("layout", ["2afc", "manual", "nested"])
def test_read_bapps_folder(tmp_path, layout):
  root = {"2afc": tmp_path / "2afc", "manual": tmp_path / "2afc",
          "nested": tmp_path / "dataset" / "2afc"}[layout]
  written = _bapps(root)
  data = two_afc.read_bapps_2afc(tmp_path if layout != "2afc" else root, "val")
  assert isinstance(data, two_afc.TwoAFCSet) and not data.is_proxy
  assert data.name == "bapps-2afc/val"
  assert list(data) == ["traditional", "cnn"]
  for category, (images, judges) in written.items():
    triplets = data[category]
    assert triplets.ids == tuple(sorted(triplets.ids))
    for name in ("ref", "p0", "p1"):
      x = getattr(triplets, name)
      assert x.dtype == np.float32 and x.shape == (len(judges), 64, 64, 3)
      assert x.min() >= -1.0 and x.max() <= 1.0
      np.testing.assert_allclose(x, images[name] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(triplets.judge, np.float32(judges))


def test_read_bapps_options(tmp_path):
  written = _bapps(tmp_path)
  rng = np.random.default_rng(1)
  small = _write_category(tmp_path / "val" / "mine", ["a", "b"], [0.5, 0.5], rng, size=32)
  full = two_afc.read_bapps_2afc(tmp_path, "val")
  assert list(full) == ["traditional", "cnn", "mine"]  # extra folders after BAPPS's, sorted
  # Other sizes are resized (bilinear) to 64; image_size=None keeps them.
  assert full["mine"].ref.shape == (2, 64, 64, 3)
  native = two_afc.read_bapps_2afc(tmp_path, "val", categories=["mine"], image_size=None)
  np.testing.assert_allclose(native["mine"].p1, small["p1"] / 127.5 - 1.0, atol=1e-6)
  # Selection, limit and lazy reading.
  part = two_afc.read_bapps_2afc(tmp_path, "val", categories=["cnn", "traditional"], limit=2,
                                 lazy=True)
  assert list(part) == ["cnn", "traditional"] and "lazy" in repr(part)
  np.testing.assert_array_equal(part["traditional"].ref, full["traditional"].ref[:2])
  np.testing.assert_array_equal(part["cnn"].judge, written["cnn"][1])


def test_read_bapps_from_tfds_matches_folder(tmp_path):
  _bapps(tmp_path / "manual" / "2afc")
  jtfds.prepare("bapps", manual_dir=tmp_path / "manual", data_dir=tmp_path / "tfds",
                config="2afc")
  folder = two_afc.read_bapps_2afc(tmp_path / "manual", "val")
  source = two_afc.read_bapps_2afc_tfds(tmp_path / "tfds", "val")
  assert list(source) == list(folder) and not source.is_proxy
  for category in folder:
    a, b = folder[category], source[category]
    assert a.ids == b.ids
    for name in ("ref", "p0", "p1", "judge"):
      np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  only = two_afc.read_bapps_2afc_tfds(tmp_path / "tfds", "val", categories=["cnn"], limit=1)
  assert list(only) == ["cnn"] and len(only["cnn"]) == 1
  with pytest.raises(ValueError, match="deblur"):
    two_afc.read_bapps_2afc_tfds(tmp_path / "tfds", "val", categories=["deblur"])


def test_read_bapps_errors_name_the_problem(tmp_path):
  _bapps(tmp_path)
  with pytest.raises(FileNotFoundError, match="train"):
    two_afc.read_bapps_2afc(tmp_path, "train")
  with pytest.raises(FileNotFoundError, match="superres"):
    two_afc.read_bapps_2afc(tmp_path, "val", categories=["superres"])
  for kwargs, name in (({"categories": "cnn"}, "categories"), ({"limit": 0}, "limit"),
                       ({"image_size": -1}, "image_size")):
    with pytest.raises(ValueError, match=name):
      two_afc.read_bapps_2afc(tmp_path, "val", **kwargs)
  missing = tmp_path / "val" / "cnn" / "p1" / "000000.png"
  missing.unlink()
  with pytest.raises(FileNotFoundError, match=str(missing)):
    two_afc.read_bapps_2afc(tmp_path, "val")
  lazy = two_afc.read_bapps_2afc(tmp_path, "val", lazy=True)  # nothing read yet
  with pytest.raises(FileNotFoundError, match=str(missing)):
    lazy["cnn"]  # pylint: disable=pointless-statement
  bad = tmp_path / "val" / "traditional" / "p0" / "000001.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(ValueError, match=str(bad)):
    two_afc.read_bapps_2afc(tmp_path, "val", categories=["traditional"])


# ----------------------------------------------------------------------------- evaluation


def _constant_images(values):
  """(N, 2, 2, 3) images, image i constant at values[i]."""
  return np.broadcast_to(np.float32(values)[:, None, None, None], (len(values), 2, 2, 3)).copy()


def _triplets(d0, d1, judge):
  """Triplets whose |mean difference| distances to the reference are d0, d1."""
  n = len(judge)
  ref = _constant_images(np.zeros(n))
  return two_afc.Triplets(ref, _constant_images(d0), _constant_images(d1), np.float32(judge))


def test_two_afc_evaluate_hand_computed():
  calls = []

  def distance(x, y):
    calls.append(x.shape[0])
    return jnp.abs(jnp.mean(y - x, axis=(1, 2, 3)))

  data = {
      # d0 < d1, judge 0.2 -> 0.8; d1 < d0, judge 0.7 -> 0.7; tie -> 0.5.
      "a": _triplets([0.1, 0.5, 0.3], [0.4, 0.2, 0.3], [0.2, 0.7, 0.9]),
      # d1 < d0, judge 0.25 -> 0.25.
      "b": _triplets([0.6], [0.1], [0.25]),
  }
  result = two_afc.two_afc_evaluate(distance, data, batch_size=2, return_distances=True)
  # Always full batches (the last one padded); both categories' 8 pairs share one stream.
  assert calls == [2, 2, 2, 2]
  assert result["categories"]["a"]["count"] == 3 and result["categories"]["b"]["count"] == 1
  np.testing.assert_allclose(result["categories"]["a"]["score"], (0.8 + 0.7 + 0.5) / 3, rtol=1e-6)
  np.testing.assert_allclose(result["categories"]["b"]["score"], 0.25, rtol=1e-6)
  # Overall = plain mean of the categories (LPIPS, Table II), not the mean of the 4 triplets.
  np.testing.assert_allclose(result["overall"], ((0.8 + 0.7 + 0.5) / 3 + 0.25) / 2, rtol=1e-6)
  assert result["count"] == 4 and result["is_proxy"] is False and result["name"] is None
  np.testing.assert_allclose(result["distances"]["a"][0], [0.1, 0.5, 0.3], rtol=1e-6)
  # LPIPS-shaped (N, 1, 1, 1) distances and tuple / dict triplets are accepted.
  t = data["b"]
  again = two_afc.two_afc_evaluate(lambda x, y: distance(x, y)[:, None, None, None],
                                   {"b": (t.ref, t.p0, t.p1, t.judge),
                                    "c": {"ref": t.ref, "p0": t.p1, "p1": t.p0, "judge": [0.75]}})
  assert again["categories"]["b"]["score"] == again["categories"]["c"]["score"] == 0.25
  # The batch shrinks to the pairs there are (one call of 8, not 64 padded per category), and
  # categories of another image size get their own stream; the report keeps the input order.
  calls.clear()
  wide = {k: two_afc.Triplets(*(np.tile(a, (1, 2, 1, 1)) for a in (v.ref, v.p0, v.p1)), v.judge)
          for k, v in data.items()}
  mixed = two_afc.two_afc_evaluate(distance, {"a": data["a"], "wide b": wide["b"],
                                              "b": data["b"]})
  assert calls == [8, 8]
  assert list(mixed["categories"]) == ["a", "wide b", "b"]
  assert mixed["categories"]["wide b"]["score"] == mixed["categories"]["b"]["score"] == 0.25


def test_two_afc_evaluate_rejects_bad_input():
  data = {"a": _triplets([0.1, 0.2], [0.2, 0.1], [0.5, 0.5])}
  ok = lambda x, y: jnp.mean(jnp.abs(x - y), axis=(1, 2, 3))
  with pytest.raises(ValueError, match="distance_fn"):
    two_afc.two_afc_evaluate("l2", data)
  with pytest.raises(ValueError, match="distance_fn.*shape"):
    two_afc.two_afc_evaluate(lambda x, y: jnp.zeros((3,)), data)
  with pytest.raises(ValueError, match="distance_fn.*NaN"):
    two_afc.two_afc_evaluate(lambda x, y: ok(x, y) * jnp.nan, data)
  nan_in_b = lambda x, y: jnp.where(jnp.max(y, axis=(1, 2, 3)) > 0.8, jnp.nan, ok(x, y))
  with pytest.raises(ValueError, match="NaN.*'b'.*ref vs p1"):
    two_afc.two_afc_evaluate(nan_in_b, {**data, "b": _triplets([0.1], [0.9], [0.5])})
  with pytest.raises(ValueError, match="batch_size"):
    two_afc.two_afc_evaluate(ok, data, batch_size=0)
  with pytest.raises(ValueError, match="triplets_by_category"):
    two_afc.two_afc_evaluate(ok, {})
  with pytest.raises(ValueError, match="triplets_by_category\\['a'\\]"):
    two_afc.two_afc_evaluate(ok, {"a": np.zeros(3)})
  with pytest.raises(ValueError, match="judge"):
    _triplets([0.1], [0.2], [1.5])
  with pytest.raises(ValueError, match="p1 shape"):
    two_afc.Triplets(np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 2, 3)), np.zeros((1, 3, 2, 3)),
                     [0.5])


def test_two_afc_table():
  human = {"name": "bapps-2afc/val", "is_proxy": False, "overall": 0.6,
           "categories": {"traditional": {"score": 0.7, "count": 4},
                          "cnn": {"score": 0.5, "count": 2}}}
  other = {"name": "bapps-2afc/val", "is_proxy": False, "overall": 0.55,
           "categories": {"traditional": {"score": 0.55, "count": 4}}}
  table = two_afc.two_afc_table({"L2": human, "SSIM": other})
  lines = table.splitlines()
  assert lines[0] == "| Method | traditional (n=4) | cnn (n=2) | Overall |"
  assert lines[2] == "| L2 | 70.00 | 50.00 | 60.00 |"
  assert lines[3] == "| SSIM | 55.00 | - | 55.00 |"
  assert "PROXY" not in table
  proxy = dict(human, name="phantom-proxy-2afc", is_proxy=True)
  assert two_afc.two_afc_table({"x": proxy}, percent=False).startswith("PROXY 2AFC")
  with pytest.raises(ValueError, match="results"):
    two_afc.two_afc_table({"x": 0.5})


# -------------------------------------------------------------------------- phantom proxy

PROXY_ARGS = {"num_subjects": 2, "slices_per_subject": 2}


@pytest.fixture(scope="module")
def proxy():
  return two_afc.phantom_proxy_2afc(**PROXY_ARGS, seed=0)


def test_proxy_is_labelled_deterministic_and_well_formed(proxy):
  assert proxy.is_proxy and "PROXY" in proxy.judge_source and "PROXY" in repr(proxy)
  assert list(proxy) == list(two_afc.DISTORTIONS)
  again = two_afc.phantom_proxy_2afc(**PROXY_ARGS, seed=0)
  other = two_afc.phantom_proxy_2afc(**PROXY_ARGS, seed=1)
  for category in proxy:
    t = proxy[category]
    n = len(t)
    assert n == 4 and t.mask.shape == (n, 64, 64) and t.mask.any(axis=(1, 2)).all()
    for name in ("ref", "p0", "p1"):
      x = getattr(t, name)
      assert x.dtype == np.float32 and x.shape == (n, 64, 64, 3)
      assert x.min() >= -1.0 and x.max() <= 1.0
      np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grey copied to 3 channels
      np.testing.assert_array_equal(x, getattr(again[category], name))
    assert not np.array_equal(t.p0, other[category].p0)
    assert ((t.judge >= 0) & (t.judge <= 1)).all() and t.judge.dtype == np.float32
    # The stated oracle: judge = e0 / (e0 + e1) on the tumour-region RMS errors.
    e0 = two_afc.lesion_error(t.ref, t.p0, t.mask)
    e1 = two_afc.lesion_error(t.ref, t.p1, t.mask)
    np.testing.assert_allclose(t.judge, e0 / (e0 + e1), rtol=1e-5)
    np.testing.assert_allclose(2 * t.meta["error0"], e0, rtol=1e-5)  # meta in [0, 1] units
    assert not np.array_equal(t.p0, t.p1)
  # A category does not depend on which other categories are requested.
  noise = two_afc.phantom_proxy_2afc(**PROXY_ARGS, seed=0, distortions=("noise",))
  np.testing.assert_array_equal(noise["noise"].p1, proxy["noise"].p1)


def test_proxy_scores_sensible_distances(proxy):
  l2 = jax.jit(lambda x, y: jnp.mean(jnp.square(x - y), axis=(1, 2, 3)))
  constant = lambda x, y: np.zeros(len(x), np.float32)
  scored = two_afc.two_afc_evaluate(l2, proxy, batch_size=4)
  flat = two_afc.two_afc_evaluate(constant, proxy, batch_size=4)
  assert scored["is_proxy"] and scored["name"] == "phantom-proxy-2afc"
  assert scored["overall"] > 0.6
  assert flat["overall"] == 0.5 and all(c["score"] == 0.5 for c in flat["categories"].values())
  # The oracle's own distance (tumour-region error) reaches the ceiling mean(max(j, 1 - j)).
  for category in proxy:
    t = proxy[category]
    e0 = two_afc.lesion_error(t.ref, t.p0, t.mask)
    e1 = two_afc.lesion_error(t.ref, t.p1, t.mask)
    ceiling = np.mean(np.maximum(t.judge, 1 - t.judge))
    np.testing.assert_allclose(two_afc_score(e0, e1, t.judge), ceiling, rtol=1e-5)
    assert scored["categories"][category]["score"] <= ceiling + 1e-6
  assert "PROXY" in two_afc.two_afc_table({"L2": scored})


def test_proxy_cross_pairing_and_errors():
  cross = two_afc.phantom_proxy_2afc(**PROXY_ARGS, seed=0, distortions=("blur", "gamma", "shift"),
                                     pairing="cross")
  assert list(cross) == ["blur/gamma", "blur/shift", "gamma/shift"]
  assert cross.is_proxy
  for kwargs, name in (({"pairing": "both"}, "pairing"), ({"distortions": ("jpeg",)},
                                                           "distortions"),
                       ({"local_prob": 1.5}, "local_prob"), ({"modality": "ct"}, "modality"),
                       ({"seed": -1}, "seed"), ({"num_subjects": 0}, "num_subjects"),
                       ({"image_size": 8}, "image_size")):
    with pytest.raises(ValueError, match=name):
      two_afc.phantom_proxy_2afc(**kwargs)


def test_lesion_error_known_value():
  ref = np.zeros((1, 2, 2))
  image = np.array([[[1.0, 3.0], [5.0, 0.0]]])
  mask = np.array([[[True, True], [False, False]]])
  np.testing.assert_allclose(two_afc.lesion_error(ref, image, mask), [np.sqrt(5.0)])
  with pytest.raises(ValueError, match="mask is empty"):
    two_afc.lesion_error(ref, image, ~np.ones_like(mask))
  with pytest.raises(ValueError, match="images shape"):
    two_afc.lesion_error(ref, image[:, :1], mask)


# ---------------------------------------------------------------------- tap-weight learning


def _taps(x, y):
  """Two taps of a fixed 'network': the pixels and 2x2 average pools (channels kept)."""
  diff = x - y
  pooled = jax.lax.reduce_window(diff, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
  return jnp.square(diff), jnp.square(pooled)


def _channel_task(n, seed):
  """Channel 0 carries the judged distortion (judge = a0 / (a0 + a1)); channels 1, 2 carry
  larger distortions nobody judged. Untuned (w = 1) distances follow the noise channels."""
  rng = np.random.default_rng(seed)
  ref = rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
  a, b = rng.uniform(0, 1, (n, 2)), rng.uniform(0, 3, (n, 2))

  def distort(k):
    scale = 0.2 * np.stack([a[:, k], b[:, k], b[:, k]], -1)[:, None, None, :]
    return (ref + scale * rng.standard_normal((n, 8, 8, 3))).astype(np.float32)

  p0, p1 = distort(0), distort(1)
  return two_afc.Triplets(ref, p0, p1, (a[:, 0] / (a[:, 0] + a[:, 1])).astype(np.float32))


@pytest.fixture(scope="module")
def channel_task():
  return _channel_task(256, 0), {"test": _channel_task(256, 1)}


def _score(weights, test):
  return two_afc.two_afc_evaluate(two_afc.tap_weighted_distance(_taps, weights), test,
                                  batch_size=256)["overall"]


def test_learn_tap_weights_finds_informative_channels(channel_task):
  train, test = channel_task
  ones = [np.ones(3, np.float32), np.ones(3, np.float32)]
  baseline = _score(ones, test)
  kwargs = dict(steps=150, batch_size=32, learning_rate=3e-2, init="ones", dropout=0.0)
  weights, losses = two_afc.learn_tap_weights(_taps, train, seed=0, return_losses=True, **kwargs)
  assert [w.shape for w in weights] == [(3,), (3,)]
  assert all(w.dtype == np.float32 and (w >= 0).all() for w in weights)
  for w in weights:  # the informative channel grew; the noise channels shrank below it
    assert w[0] > 1.5 and w[0] > 10 * max(w[1], w[2])
  learned = _score(weights, test)
  assert learned > baseline + 0.1
  assert losses[-30:].mean() < losses[:30].mean()
  # Deterministic per seed; another seed another batch order.
  again = two_afc.learn_tap_weights(_taps, train, seed=0, **kwargs)
  other = two_afc.learn_tap_weights(_taps, train, seed=1, **kwargs)
  for a, b in zip(weights, again):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(weights, other))
  # A TwoAFCSet / mapping of categories is pooled.
  pooled = two_afc.learn_tap_weights(_taps, {"x": train.take(slice(0, 128)),
                                             "y": train.take(slice(128, 256))}, seed=0, **kwargs)
  for a, b in zip(weights, pooled):
    np.testing.assert_array_equal(a, b)


def test_learn_tap_weights_with_dropout_and_lpips_init(channel_task):
  train, test = channel_task
  # LPIPS's training: dropout 0.5 on the differences, the network run on every batch.
  weights = two_afc.learn_tap_weights(_taps, train, steps=150, seed=0, batch_size=32,
                                      learning_rate=3e-2, init="ones")
  assert all((w >= 0).all() for w in weights)
  assert _score(weights, test) > _score([np.ones(3), np.ones(3)], test) + 0.1
  # PyTorch's default init U(+-1/sqrt(C)) has negatives: clamped to 0 by the first step.
  lpips = two_afc.learn_tap_weights(_taps, train, steps=1, seed=3, dropout=0.0)
  assert all((w >= 0).all() for w in lpips) and any((w == 0).any() for w in lpips)


def test_first_adam_step_moves_each_weight_by_the_learning_rate(channel_task):
  train, _ = channel_task
  lr = 1e-3
  weights = two_afc.learn_tap_weights(_taps, train, steps=1, seed=0, learning_rate=lr,
                                      init="ones", dropout=0.0)
  for w in weights:  # Adam's first update is lr * sign(gradient) (eps aside)
    np.testing.assert_allclose(np.abs(w - 1.0), lr, rtol=1e-3)


def test_ranking_net_matches_lpips_dist2logit():
  torch = pytest.importorskip("torch")
  net = two_afc.RankingNet()
  rng = np.random.default_rng(0)
  d0, d1 = (rng.uniform(0, 2, 7).astype(np.float32) for _ in range(2))
  judge = rng.uniform(0, 1, 7).astype(np.float32)
  params = jax.jit(net.init)(jax.random.key(0), d0, d1)["params"]
  for layer in params.values():  # PyTorch's default init bounds, 1 / sqrt(fan_in)
    bound = 1 / np.sqrt(layer["kernel"].shape[0])
    assert np.abs(layer["kernel"]).max() <= bound and np.abs(layer["bias"]).max() <= bound
  # LPIPS's Dist2LogitLayer (lpips/lpips.py) with the same parameters.
  layers = []
  for i, name in enumerate(sorted(params, key=lambda k: int(k.split("_")[-1]))):
    conv = torch.nn.Conv2d(*params[name]["kernel"].shape, 1)
    conv.weight.data = torch.tensor(np.asarray(params[name]["kernel"]).T[:, :, None, None])
    conv.bias.data = torch.tensor(np.asarray(params[name]["bias"]))
    layers += [conv] + ([torch.nn.LeakyReLU(0.2)] if i < 2 else [torch.nn.Sigmoid()])
  model = torch.nn.Sequential(*layers)
  t0, t1 = (torch.tensor(d)[:, None, None, None] for d in (d0, d1))
  eps = 0.1
  prob = model(torch.cat((t0, t1, t0 - t1, t0 / (t1 + eps), t1 / (t0 + eps)), dim=1))
  logits = net.apply({"params": params}, d0, d1)
  np.testing.assert_allclose(jax.nn.sigmoid(logits), prob.detach().numpy().reshape(-1),
                             rtol=1e-5, atol=1e-6)
  # BCERankingLoss: BCE of the sigmoid against the judge (fed as judge * 2 - 1, mapped back).
  loss = torch.nn.BCELoss()(prob, torch.tensor(judge).view(-1, 1, 1, 1))
  ours = np.mean(np.asarray(optax.sigmoid_binary_cross_entropy(logits, judge)))
  np.testing.assert_allclose(ours, loss.item(), rtol=1e-5)


def test_tap_weighted_distance_formula():
  rng = np.random.default_rng(0)
  x, y = (rng.normal(size=(3, 4, 4, 3)).astype(np.float32) for _ in range(2))
  w = [rng.uniform(size=3).astype(np.float32), rng.uniform(size=3).astype(np.float32)]
  d0, d1 = (np.asarray(d) for d in _taps(x, y))
  want = (d0 * w[0]).sum(-1).mean((1, 2)) + (d1 * w[1]).sum(-1).mean((1, 2))
  np.testing.assert_allclose(two_afc.tap_weighted_distance(_taps, w)(x, y), want, rtol=1e-5)
  with pytest.raises(ValueError, match="channels per tap"):
    two_afc.tap_weighted_distance(_taps, [np.ones(2), np.ones(3)])(x, y)


def test_learn_tap_weights_rejects_bad_input(channel_task):
  train, _ = channel_task
  small = train.take(slice(0, 8))
  for kwargs, name in (({"steps": 0}, "steps"), ({"seed": -1}, "seed"),
                       ({"batch_size": 0}, "batch_size"), ({"learning_rate": 0.0},
                                                           "learning_rate"),
                       ({"dropout": 1.0}, "dropout"), ({"beta1": 1.0}, "beta1"),
                       ({"init": [np.ones(2), np.ones(3)]}, "init"), ({"init": "zeros"}, "init")):
    args = {"steps": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=name):
      two_afc.learn_tap_weights(_taps, small, **args)
  with pytest.raises(ValueError, match="tap_difference_fn"):
    two_afc.learn_tap_weights(lambda x, y: jnp.square(x - y), small, steps=1, seed=0)
  with pytest.raises(ValueError, match="tap_difference_fn"):
    two_afc.learn_tap_weights(None, small, steps=1, seed=0)
  with pytest.raises(ValueError, match="triplets"):
    two_afc.learn_tap_weights(_taps, {}, steps=1, seed=0)


# ------------------------------------------------------------------ rating normalisation


def test_rating_agreement_known_values():
  result = two_afc.rating_agreement([1.0, 2.0, 4.0], [6, 6, 6], [5, 3, 2], is_proxy=True)
  np.testing.assert_allclose(result["distance"], [0.25, 0.5, 1.0])
  np.testing.assert_allclose(result["rating"], [0.25, 0.75, 1.0])
  np.testing.assert_allclose(result["pearson"], np.corrcoef([0.25, 0.5, 1], [0.25, 0.75, 1])[0, 1],
                             rtol=1e-5)
  np.testing.assert_allclose(result["spearman"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(result["mean_abs_gap"], 0.25 / 3, rtol=1e-5)
  assert result["is_proxy"] is True
  # Ratings of the real image may differ too: |r^R - r^S| before normalising.
  swapped = two_afc.rating_agreement([1.0, 2.0, 4.0], [5, 3, 2], [6, 6, 6], is_proxy=False)
  np.testing.assert_allclose(swapped["rating"], result["rating"])
  assert swapped["is_proxy"] is False


def test_rating_agreement_rejects_bad_input():
  with pytest.raises(ValueError, match="is_proxy"):
    two_afc.rating_agreement([1.0, 2.0], [6, 6], [5, 4], is_proxy="yes")
  with pytest.raises(ValueError, match="real_ratings"):
    two_afc.rating_agreement([1.0, 2.0], [6, 6, 6], [5, 4], is_proxy=True)
  with pytest.raises(ValueError, match="distances"):
    two_afc.rating_agreement([-1.0, 2.0], [6, 6], [5, 4], is_proxy=True)
  with pytest.raises(ValueError, match="synthetic_ratings"):
    two_afc.rating_agreement([1.0, 2.0], [6, 6], [5, np.nan], is_proxy=True)
