"""Source mixing (source_identification Eq. 2, 5, 6, 12) and host-side partner sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.pretext.mixing import (PartnerSampler, assign_components, mix_sources,
                                   mixing_weights, noise_partners)


@pytest.mark.parametrize("num_components", [2, 3, 4])
def test_weights_on_the_simplex(num_components):
  w = np.asarray(mixing_weights(jax.random.PRNGKey(0), 4000, num_mixtures=2,
                                num_components=num_components))
  assert w.shape == (4000, 2, num_components) and w.dtype == np.float32
  assert np.all(w >= 0)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  # Dirichlet(1, ..., 1): every coordinate has mean 1 / N~ and is U[0, 1] when N~ = 2 (Eq. 2).
  np.testing.assert_allclose(w.mean((0, 1)), 1 / num_components, atol=0.01)
  if num_components == 2:
    np.testing.assert_allclose(np.quantile(w[..., 0], [0.25, 0.5, 0.75]), [0.25, 0.5, 0.75],
                               atol=0.02)


@pytest.mark.parametrize("n,k,m", [(5, 3, 2), (3, 2, 2), (7, 4, 2), (4, 3, 3), (2, 2, 2)])
def test_component_invariants(n, k, m):
  c = np.asarray(assign_components(jax.random.PRNGKey(1), 64, num_sources=n, num_mixtures=m,
                                   num_components=k))
  assert c.shape == (64, m, k) and c.dtype == np.int32
  assert np.all(c[..., 0] == 0)
  partners = c[..., 1:]
  assert partners.min() >= 1 and partners.max() <= n - 1
  for row in partners.reshape(-1, k - 1):
    assert len(set(row)) == k - 1  # distinct within a mixture
  if n - 1 >= m * (k - 1):  # the pool allows all partners to be distinct (Eq. 12: s2..s5)
    for sample in partners.reshape(64, -1):
      assert len(set(sample)) == m * (k - 1)
  else:  # reused across mixtures, but every partner is used
    for sample in partners.reshape(64, -1):
      assert set(sample) == set(range(1, n))
  # Random assignment: more than one layout appears.
  assert len({tuple(s) for s in partners.reshape(64, -1)}) > 1 or n == 2


def test_count_errors():
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="num_mixtures must be >= 2"):
    assign_components(key, 2, num_sources=5, num_mixtures=1, num_components=3)
  with pytest.raises(ValueError, match="num_components must be <= num_sources"):
    assign_components(key, 2, num_sources=3, num_mixtures=2, num_components=4)
  with pytest.raises(ValueError, match="num_components must be >= 2"):
    mixing_weights(key, 2, num_mixtures=2, num_components=1)
  with pytest.raises(TypeError, match="batch must be an int"):
    mixing_weights(key, 2.0, num_mixtures=2, num_components=2)


def _sources(b=3, n=5, h=8, w=8, c=2, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, h, w, c)).astype(np.float32),
          rng.normal(size=(b, n - 1, h, w, c)).astype(np.float32))


def test_mixtures_share_the_target_with_their_weights():
  target, partners = _sources()
  out = mix_sources(jax.random.PRNGKey(2), target, partners, num_mixtures=2, num_components=3)
  assert out.inputs.shape == (3, 8, 8, 2 * 2)
  np.testing.assert_array_equal(out.target, target)
  pool = np.concatenate([target[:, None], partners], 1)
  w, c = np.asarray(out.weights), np.asarray(out.components)
  for b in range(3):
    for m in range(2):
      expected = sum(w[b, m, j] * pool[b, c[b, m, j]] for j in range(3))
      np.testing.assert_allclose(out.inputs[b, ..., 2 * m:2 * m + 2], expected, atol=1e-5)
      assert c[b, m, 0] == 0 and w[b, m, 0] > 0  # s1 is in every mixture
  assert np.all(np.asarray(out.valid))  # no masks: everything valid


def test_input_channels_and_dtype():
  target, partners = _sources(b=2, n=7, c=4)
  out = mix_sources(jax.random.PRNGKey(0), jnp.asarray(target, jnp.bfloat16), partners,
                    num_mixtures=3, num_components=4)
  assert out.inputs.shape == (2, 8, 8, 12) and out.inputs.dtype == jnp.bfloat16


def _box(h, w, r0, r1, c0, c1):
  m = np.zeros((h, w), bool)
  m[r0:r1, c0:c1] = True
  return m


def test_valid_flags_on_hand_made_masks():
  target, partners = _sources()  # N = 5, N~ = 3, M~ = 2 (Eq. 12): every partner is used
  t = _box(8, 8, 0, 4, 0, 4)  # 16 px
  near = _box(8, 8, 0, 4, 2, 6)  # 8 px common
  touch = _box(8, 8, 3, 8, 3, 8)  # 1 px common
  far = _box(8, 8, 4, 8, 4, 8)  # disjoint
  target_mask = np.stack([t, t, t])
  partner_masks = np.stack([np.stack([near, t, near, near]), np.stack([near, near, far, t]),
                            np.stack([touch, near, t, near])])
  kw = dict(target_mask=target_mask, partner_masks=partner_masks)
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(mix_sources(key, target, partners, **kw).valid,
                                [True, False, True])
  # > 10% of the target area (1.6 px): one common pixel is no longer enough.
  np.testing.assert_array_equal(mix_sources(key, target, partners, min_overlap=0.1, **kw).valid,
                                [True, False, False])
  # 8 / 16 = 0.5 is not > 0.5.
  np.testing.assert_array_equal(mix_sources(key, target, partners, min_overlap=0.5, **kw).valid,
                                [False, False, False])
  # An empty target brain overlaps nothing.
  empty = np.zeros_like(target_mask)
  assert not np.any(mix_sources(key, target, partners, target_mask=empty,
                                partner_masks=partner_masks).valid)


def test_unused_partners_do_not_invalidate():
  target, partners = _sources(b=16, n=5)
  t = _box(8, 8, 0, 4, 0, 4)
  far = _box(8, 8, 4, 8, 4, 8)
  # Partner 4 (pool index 4) is disjoint; with N~ = 2, M~ = 2 only two of four partners are used.
  partner_masks = np.broadcast_to(np.stack([t, t, t, far]), (16, 4, 8, 8))
  out = mix_sources(jax.random.PRNGKey(3), target, partners, num_mixtures=2, num_components=2,
                    target_mask=np.broadcast_to(t, (16, 8, 8)), partner_masks=partner_masks)
  uses_far = np.any(np.asarray(out.components) == 4, axis=(1, 2))
  np.testing.assert_array_equal(out.valid, ~uses_far)
  assert uses_far.any() and (~uses_far).any()


def test_determinism_and_jit_equals_eager():
  target, partners = _sources()
  masks = np.ones((3, 8, 8), bool), np.ones((3, 4, 8, 8), bool)
  fn = lambda k, t, p, tm, pm: mix_sources(k, t, p, target_mask=tm, partner_masks=pm)
  a = fn(jax.random.PRNGKey(5), target, partners, *masks)
  b = fn(jax.random.PRNGKey(5), target, partners, *masks)
  j = jax.jit(fn)(jax.random.PRNGKey(5), target, partners, *masks)
  d = fn(jax.random.PRNGKey(6), target, partners, *masks)
  for x, y, z in zip(a, b, j):
    np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(x, z, rtol=1e-6, atol=1e-6)
  assert not np.allclose(a.weights, d.weights)


def test_mix_sources_errors():
  target, partners = _sources()
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="partners must be"):
    mix_sources(key, target, partners[:, :, :4])
  with pytest.raises(TypeError, match="target must be a floating"):
    mix_sources(key, target.astype(np.int32), partners)
  with pytest.raises(ValueError, match="given together"):
    mix_sources(key, target, partners, target_mask=np.ones((3, 8, 8), bool))
  with pytest.raises(ValueError, match="num_components must be <= num_sources"):
    mix_sources(key, target, partners[:, :1], num_components=3)
  with pytest.raises(ValueError, match="min_overlap"):
    mix_sources(key, target, partners, min_overlap=1.0, target_mask=np.ones((3, 8, 8), bool),
                partner_masks=np.ones((3, 4, 8, 8), bool))


def test_noise_partners_are_standard_normal():
  target = jnp.zeros((4, 16, 16, 3))
  noise = np.asarray(noise_partners(jax.random.PRNGKey(0), target, 4))
  assert noise.shape == (4, 4, 16, 16, 3)
  assert abs(noise.mean()) < 0.03 and abs(noise.std() - 1.0) < 0.03
  with pytest.raises(ValueError, match="num_partners"):
    noise_partners(jax.random.PRNGKey(0), target, 0)


# ------------------------------------------------------------------------------ PartnerSampler


def _table(slices_per_subject):
  subject = np.concatenate([np.full(n, s) for s, n in enumerate(slices_per_subject)])
  slice_ = np.concatenate([np.arange(10, 10 + n) for n in slices_per_subject])
  return subject.astype(np.int32), slice_.astype(np.int32)


def test_cross_partners_come_from_distinct_other_subjects():
  subject, slice_ = _table([3, 4, 2, 5, 3, 6])
  sampler = PartnerSampler(subject, slice_, strategy="cross", num_partners=4)
  rng = np.random.default_rng(0)
  seen = set()
  for row in range(len(subject)):
    rows = sampler(rng, subject[row], slice_[row])
    assert rows.dtype == np.int64 and rows.shape == (4,)
    subj = subject[rows]
    assert subject[row] not in subj and len(set(subj)) == 4
    seen.update(rows.tolist())
  assert len(seen) > 12  # random slices of each subject


def test_cross_with_few_subjects_repeats_but_never_the_own_one():
  subject, slice_ = _table([3, 3, 3])
  sampler = PartnerSampler(subject, slice_, strategy="cross", num_partners=4)
  rng = np.random.default_rng(1)
  for _ in range(20):
    subj = subject[sampler(rng, 1, 11)]
    assert 1 not in subj and sorted(set(subj)) == [0, 2]
    assert np.bincount(subj, minlength=3)[[0, 2]].tolist() == [2, 2]


def test_within_partners_are_other_slices_of_the_same_subject():
  subject, slice_ = _table([3, 6, 2])
  sampler = PartnerSampler(subject, slice_, strategy="within", num_partners=4)
  rng = np.random.default_rng(2)
  for _ in range(10):
    rows = sampler(rng, 1, 12)
    assert np.all(subject[rows] == 1) and 12 not in slice_[rows] and len(set(rows)) == 4
    rows = sampler(rng, 2, 11)  # one other slice only: reused, never the own one
    assert np.all(subject[rows] == 2) and np.all(slice_[rows] == 10)
    rows = sampler(rng, 0, 10)  # two others: each used twice
    assert sorted(slice_[rows].tolist()) == [11, 11, 12, 12]


def test_sampler_handles_unsorted_tables_and_is_deterministic():
  subject, slice_ = _table([4, 5, 3])
  order = np.random.default_rng(0).permutation(len(subject))
  subject, slice_ = subject[order], slice_[order]
  sampler = PartnerSampler(subject, slice_, strategy="within", num_partners=2)
  a = sampler(np.random.default_rng(7), 1, 13)
  np.testing.assert_array_equal(a, sampler(np.random.default_rng(7), 1, 13))
  assert np.all(subject[a] == 1) and 13 not in slice_[a]


def test_sampler_errors():
  subject, slice_ = _table([3, 1])
  with pytest.raises(ValueError, match=r"subject\(s\) \[1\] have only one slice"):
    PartnerSampler(subject, slice_, strategy="within", num_partners=2)
  with pytest.raises(ValueError, match="needs at least 2 subjects"):
    PartnerSampler(*_table([4]), strategy="cross", num_partners=2)
  with pytest.raises(ValueError, match="strategy must be one of"):
    PartnerSampler(subject, slice_, strategy="denoise", num_partners=2)
  with pytest.raises(ValueError, match="num_partners"):
    PartnerSampler(subject, slice_, strategy="cross", num_partners=0)
  sampler = PartnerSampler(subject, slice_, strategy="cross", num_partners=2)
  with pytest.raises(ValueError, match="subject 7 is not in the slice table"):
    sampler(np.random.default_rng(0), 7, 10)
  sampler = PartnerSampler(*_table([3, 3]), strategy="within", num_partners=2)
  with pytest.raises(ValueError, match="slice 99 of subject 0"):
    sampler(np.random.default_rng(0), 0, 99)
  with pytest.raises(ValueError, match="unique within a subject"):
    PartnerSampler([0, 0, 1], [1, 1, 2], strategy="cross", num_partners=1)
