"""Exact EDT and surface distances against scipy and MONAI, properties, and input errors."""

import warnings

import jax
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.metrics import (compute_average_surface_distance, compute_hausdorff_distance,
                           compute_surface_dice)

from helpers import OPTIMIZED

from jaxmed.metrics import (average_surface_distance, distance_transform_edt, hausdorff_distance,
                            surface_dice)


def _blobs(rng, shape, n, sigma=1.5, level=0.3):
  """n random smooth blobs masks (N, *shape); some items empty or full by construction below."""
  noise = rng.standard_normal((n,) + shape)
  return ndi.gaussian_filter(noise, (0,) + (sigma,) * len(shape)) > level * noise.std() / 4


def _edge_cases(rng, shape):
  """Pairs covering: equal, disjoint, both/one empty, single voxels, full, touching borders."""
  a = _blobs(rng, shape, 12)
  b = _blobs(rng, shape, 12)
  a[0] = b[0]                                      # identical
  a[1], b[1] = False, False                        # both empty
  a[2] = False                                     # pred empty
  b[3] = False                                     # target empty
  a[4], b[4] = False, False
  a[4][(0,) * len(shape)] = True                   # single voxels in opposite corners
  b[4][tuple(n - 1 for n in shape)] = True
  a[5] = True                                      # full mask (its surface is the array border)
  b[6] = False
  b[6][tuple(n // 2 for n in shape)] = True        # single voxel target
  a[7] = np.roll(b[7], 2, axis=0)                  # shifted copy
  return a, b


def _monai(fn, pred, target, spacing=None, **kwargs):
  to_torch = lambda x: torch.from_numpy(x[:, None].astype(np.float32))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    out = fn(to_torch(pred), to_torch(target), include_background=True, spacing=spacing, **kwargs)
  return out.numpy()[:, 0]


CASES = [((19, 14), None), ((19, 14), (0.7, 1.9)), ((9, 12, 11), None),
         ((9, 12, 11), (2.5, 0.8, 1.3))]


@pytest.mark.parametrize("shape,spacing", CASES + [((23,), (0.6,))])
def test_edt_matches_scipy(shape, spacing):
  rng = np.random.default_rng(len(shape))
  mask = rng.uniform(size=(6,) + shape) > np.array([0.05, 0.3, 0.6, 0.9, 0.99, 1.0]).reshape(
      (6,) + (1,) * len(shape))
  mask[4] = True
  mask[4][(0,) * len(shape)] = False  # one zero voxel in a corner: distances span the array
  ours = np.asarray(distance_transform_edt(mask, spacing=spacing))
  ref = np.stack([ndi.distance_transform_edt(m, sampling=spacing) for m in mask])
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_edt_without_background_is_inf():
  mask = np.ones((1, 4, 5), bool)
  assert np.all(np.isinf(np.asarray(distance_transform_edt(mask))))


@pytest.mark.parametrize("shape,spacing", CASES + [((70, 64), (1.0, 0.6))])  # > 1 block
def test_hausdorff_matches_monai(shape, spacing):
  rng = np.random.default_rng(sum(shape))
  pred, target = _edge_cases(rng, shape)
  # MONAI reads percentile=0 as None (the maximum); 1e-7 is its minimum up to 1e-7 * range.
  for percentile, monai_percentile in ((None, None), (95, 95), (50, 50), (100, 100),
                                       (37.5, 37.5), (0, 1e-7)):
    ours = np.asarray(hausdorff_distance(pred, target, percentile=percentile, spacing=spacing))
    ref = _monai(compute_hausdorff_distance, pred, target, spacing, percentile=monai_percentile)
    one_empty = pred.reshape(len(pred), -1).any(1) != target.reshape(len(pred), -1).any(1)
    if percentile is not None:  # MONAI gives nan there (open bug); documented as inf here
      assert np.all(np.isinf(ours[one_empty]))
      ours, ref = ours[~one_empty], ref[~one_empty]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  directed = np.asarray(hausdorff_distance(pred, target, spacing=spacing, directed=True))
  ref = _monai(compute_hausdorff_distance, pred, target, spacing, directed=True)
  np.testing.assert_allclose(directed, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,spacing", CASES)
def test_average_surface_distance_and_surface_dice_match_monai(shape, spacing):
  rng = np.random.default_rng(sum(shape) + 1)
  pred, target = _edge_cases(rng, shape)
  for symmetric in (False, True):
    ours = np.asarray(average_surface_distance(pred, target, spacing=spacing, symmetric=symmetric))
    ref = _monai(compute_average_surface_distance, pred, target, spacing, symmetric=symmetric)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  for tolerance in (0.0, 1.0, 2.3):
    ours = np.asarray(surface_dice(pred, target, tolerance=tolerance, spacing=spacing))
    ref = _monai(compute_surface_dice, pred, target, spacing, class_thresholds=[tolerance])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_surface_dice_windows_hold_the_tolerance():
  """Surface Dice has its own kernel: windowed minima whose windows hold every offset within the
  tolerance (`_close_windows`), exact with no certification. Its windows, and MONAI parity where
  a window is 0 along an axis, at tolerances equal to lattice distances, past uint8 (uint16 key),
  on the float32 kernel, past the lattice's limit (float32 instead), and for traced masks."""
  from jaxmed.metrics import surface  # pylint: disable=g-import-not-at-top
  f32 = np.float32
  assert surface._close_windows(f32([1, 1, 1]), 2.0, (1, 1, 1), 4, (50, 50, 50)) == (2, 2, 2)
  assert surface._close_windows(f32([1, 1, 3]), 2.0, (1, 1, 9), 4, (50, 50, 50)) == (2, 2, 0)
  assert surface._close_windows(f32([1, 1, 1]), 30.0, (1, 1, 1), 900, (50, 50, 8)) == (30, 30, 7)
  assert surface._close_windows(f32([1, 0.8123]), 2.0, None, f32(2.0), (50, 50)) == (3, 3)
  rng = np.random.default_rng(7)
  shape = (13, 17, 9)
  pred, target = _edge_cases(rng, shape)
  pred[0, 2:4, 12:14, 1:3] = True                                 # a speck off the target
  for spacing, tolerance in (((1.0, 1.0, 3.0), 2.0), ((1.0, 1.0, 1.0), 2.0),
                             ((1.0, 1.0, 1.0), float(np.float32(np.sqrt(5.0)))),
                             ((0.5, 0.5, 0.5), 9.0),               # within 324: uint16
                             ((1.0, 0.8123, 1.6), 2.5),            # no lattice: float32
                             ((1.0, 1.0, 1.0), 1e4)):              # within past 2^24: float32
    np.testing.assert_allclose(
        np.asarray(surface_dice(pred, target, tolerance=tolerance, spacing=spacing)),
        _monai(compute_surface_dice, pred, target, spacing, class_thresholds=[tolerance]),
        rtol=1e-6, atol=1e-7, err_msg=str((spacing, tolerance)))
  traced = jax.jit(lambda p, t: surface_dice(p, t, tolerance=2.0, spacing=(1.0, 1.0, 3.0)))
  np.testing.assert_array_equal(
      np.asarray(traced(pred, target)),
      np.asarray(surface_dice(pred, target, tolerance=2.0, spacing=(1.0, 1.0, 3.0))))


@pytest.mark.parametrize("spacing,large", [(None, False), ((1.0, 1.2345), False), (None, True)])
def test_quantile_stops_once_its_order_statistics_are_certified(monkeypatch, spacing, large):
  """HD95 leaves the voxels past its order statistics uncertified (`_quantile_known`): exact at
  the boundary, where the certified values hold the lower order statistic but not the upper
  one (a quantile between them), one value more, and with no far voxel; on the integer kernel
  (as for small arrays, and as for large ones: box searches, one row per part) and the float32
  kernel (which certifies everything). Reference: ``np.quantile`` of scipy's distances, and
  MONAI."""
  from jaxmed.metrics import surface  # pylint: disable=g-import-not-at-top
  if large:  # on a shape of its own (below): the constants are read when a shape compiles
    monkeypatch.setattr(surface, "_OUTLIER_MIN_VOXELS", 1)
    monkeypatch.setattr(surface, "_PARALLEL_MIN_VOXELS", 1)
  pred, target = np.zeros((1, 40, 40), bool), np.zeros((1, 40, 40), bool)
  target[0, 5:15, 5:15] = pred[0, 5:15, 5:15] = True
  if large:  # a voxel in both: the crop (and so the compiled shape) reaches the last corner
    target[0, -1, -1] = pred[0, -1, -1] = True
  pred[0, 28:31, 30:33] = True                       # 8 far surface voxels (centre: interior)
  assert (surface._lattice_ratios(np.float32(spacing or 1.0)) is None) == (spacing is not None)
  edges = surface._edges(pred, target)
  sampling = (1.0, 1.0) if spacing is None else spacing
  distances = ndi.distance_transform_edt(~edges[1], sampling=sampling)[edges[0]]
  n, far = distances.size, int(np.sum(distances > 5.0))
  assert far == 8
  # Fractional ranks: both order statistics among the near values; only the lower one (the
  # first level's values are not enough); between the two largest.
  for position in (n - far - 1.5, n - far - 0.5, n - 1.25):
    q = position / (n - 1)
    expected = np.quantile(distances, q)
    ours = hausdorff_distance(pred, target, percentile=100 * q, spacing=spacing, directed=True)
    np.testing.assert_allclose(np.asarray(ours), [expected], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(ours), _monai(compute_hausdorff_distance, pred, target, spacing,
                                 percentile=100 * q, directed=True), rtol=1e-5)
  known = lambda position: bool(surface._quantile_known(
      np.int32(far), np.int32(n), np.float32(position / (n - 1))))
  assert known(n - far - 1.5) and not known(n - far - 0.5) and not known(n - 1.25)
  assert known(n - far - 1.0)  # a rank with no upper neighbour to interpolate with


# Integer kernel (c_min = 1, uint8 first level), rational lattice (uint16), float32 kernel.
@pytest.mark.parametrize("spacing", [None, (1.0, 1.3), (1.0, 1.27)])
def test_empty_mask_convention(spacing):
  empty, blob = np.zeros((1, 8, 8), bool), np.zeros((1, 8, 8), bool)
  blob[0, 2:5, 3:6] = True
  for fn, kw in ((hausdorff_distance, {}), (hausdorff_distance, {"percentile": 95}),
                 (average_surface_distance, {})):
    kw["spacing"] = spacing
    assert np.isinf(fn(blob, empty, **kw)[0]) and np.isinf(fn(empty, blob, **kw)[0])
    assert np.isnan(fn(empty, empty, **kw)[0])
    assert fn(blob, blob, **kw)[0] == 0
  assert surface_dice(blob, empty, tolerance=1, spacing=spacing)[0] == 0
  assert np.isnan(surface_dice(empty, empty, tolerance=1, spacing=spacing)[0])
  assert surface_dice(blob, blob, tolerance=0, spacing=spacing)[0] == 1


def test_far_apart_objects_need_the_brute_force_level():
  """Distances beyond every window level (the last, whole-axis level decides)."""
  pred, target = np.zeros((2, 90, 7), bool), np.zeros((2, 90, 7), bool)
  pred[:, 0, 0] = True
  target[0, 89, 6] = True
  target[1, 45, 3] = True
  ref = _monai(compute_hausdorff_distance, pred, target)
  np.testing.assert_allclose(np.asarray(hausdorff_distance(pred, target)), ref, rtol=1e-6)


def test_jit_path_equals_cropped_eager_path():
  rng = np.random.default_rng(3)
  pred = np.zeros((3, 20, 18, 16), bool)
  target = np.zeros_like(pred)
  pred[:, 5:11, 6:12, 4:9] = _blobs(rng, (6, 6, 5), 3, sigma=1.0, level=0.0)
  target[:, 6:12, 5:10, 5:10] = _blobs(rng, (6, 5, 5), 3, sigma=1.0, level=0.0)
  spacing = (1.2, 0.9, 2.0)
  eager = np.asarray(hausdorff_distance(pred, target, percentile=95, spacing=spacing))
  traced = jax.jit(lambda p, t: hausdorff_distance(p, t, percentile=95, spacing=spacing))
  np.testing.assert_allclose(np.asarray(traced(pred, target)), eager, rtol=1e-6)
  ref = _monai(compute_hausdorff_distance, pred, target, spacing, percentile=95)
  np.testing.assert_allclose(eager, ref, rtol=1e-5)


# float32 kernel; rational lattice c = (25, 16, 64) (uint16 first level); integer (uint8).
@pytest.mark.parametrize("spacing", [(1.0, 0.8123, 1.6), (1.0, 0.8, 1.6), (1.0, 1.0, 2.0)])
def test_few_far_voxels_take_the_box_search_and_many_take_the_dense_levels(monkeypatch, spacing):
  """The paths after the first window level (4 voxels), on both kernels (float32 for a general
  spacing, small integers for one on an integer lattice): a few uncertified voxels searched in
  boxes around them (a false-positive speck 9 voxels off); a small speck beyond the first box
  reach (30 mm: searched again in wider boxes); a larger one there (more voxels than the wider
  search takes: the dense levels run); many far voxels (more than _MAX_OUTLIERS: straight to
  the dense levels); each beside an empty target. Every metric equals MONAI's."""
  from jaxmed.metrics import surface  # pylint: disable=g-import-not-at-top
  ratios = surface._lattice_ratios(np.float32(spacing))
  assert (ratios is None) == (spacing[1] == 0.8123)
  shape = (80, 72, 64)
  grid = np.indices(shape)
  ball = lambda c, r: sum((g - x) ** 2 for g, x in zip(grid, c)) <= r**2
  # A second ball in both masks spreads them over the array: at least _OUTLIER_MIN_VOXELS
  # after the crop, and wider than a box (49 voxels).
  target = np.stack([ball((15, 22, 20), 9) | ball((72, 64, 56), 5)] * 5)
  pred = np.stack([ball((15, 21, 20), 9) | ball((72, 64, 56), 5)] * 5)
  pred[0, 33:35, 20:22, 19:21] = True                          # 9 voxels off the target
  pred[1, 44:46, 4:6, 4:6] = True                              # about 30 mm off
  pred[4, 44:48, 3:7, 4:7] = True                              # there too, 44 surface voxels
  pred[2] = _blobs(np.random.default_rng(5), shape, 1, sigma=2.0, level=0.0)[0]  # far and many
  target[3] = False                                            # empty target: inf
  # Item 3's corners make every call's crop the whole array: one shape, one compile per kernel.
  pred[3, 0, 0, 0] = pred[3, -1, -1, -1] = True
  assert surface._MAX_OUTLIERS < int(pred[2].sum())
  assert surface._FAR_OUTLIERS < 44 and surface._OUTLIER_REACH * 0.8 < 28
  assert surface._OUTLIER_MIN_VOXELS <= np.prod(shape) and max(shape) > 2 * surface._OUTLIER_REACH + 1
  if ratios is not None:
    # Compiled as users get it (`helpers.OPTIMIZED`): at the suite's -O0 each call ran ~0.9 s.
    monkeypatch.setattr(surface, "_lattice_statistics", jax.jit(
        surface._lattice_statistics.__wrapped__, compiler_options=OPTIMIZED,
        static_argnames=("both", "ratios", "metric", "spatial")))
    # The integer kernel resolves every path itself (a rational lattice's wider levels in
    # uint32: uint16 would hold 255 / 4 voxels here): the float kernel must not run.
    def no_float_kernel(*args, **kwargs):
      raise AssertionError("the integer kernel fell back to the float32 kernel")
    monkeypatch.setattr(surface, "_surface_statistics", no_float_kernel)
  # One call per path (the outlier count is the whole batch's): the near speck, the far specks,
  # the many far voxels; each with the empty target.
  monai = lambda fn, p, t, **kw: _monai(fn, p[:1], t[:1], spacing, **kw)
  for item in (0, 1, 4, 2):
    p, t = pred[[item, 3]], target[[item, 3]]
    hd95 = monai(compute_hausdorff_distance, p, t, percentile=95)
    asd = monai(compute_average_surface_distance, p, t, symmetric=True)
    if ratios is not None:
      # The integer kernel's metrics differ only in their last reductions (each checked against
      # MONAI on small arrays): HD95 (integer order statistic) and ASD (float sums) cover them.
      ours = {"hd95": hausdorff_distance(p, t, percentile=95, spacing=spacing),
              "asd": average_surface_distance(p, t, spacing=spacing, symmetric=True)}
      expected = {"hd95": hd95, "asd": asd}
    else:
      # The float32 kernel computes every metric's statistics in one run: one run per path,
      # finished as `hausdorff_distance` & co. finish it.
      edges, sp = surface._prepared("test", p, t, spacing)
      stats = surface._statistics(edges, sp, 0.95, True, "hausdorff")
      ours = {m: surface._finish(stats, m) for m in ("hausdorff", "hausdorff_quantile",
                                                     "average_surface_distance")}
      expected = {"hausdorff": monai(compute_hausdorff_distance, p, t), "hausdorff_quantile": hd95,
                  "average_surface_distance": asd}
    # Surface Dice (its own windowed kernel, exact by construction) on either spacing.
    ours["surface_dice"] = surface_dice(p, t, tolerance=2.0, spacing=spacing)
    expected["surface_dice"] = monai(compute_surface_dice, p, t, class_thresholds=[2.0])
    for metric, value in ours.items():
      value = np.asarray(value)
      np.testing.assert_allclose(value[:1], expected[metric], rtol=1e-5, err_msg=metric)
      assert value[1] == (0.0 if metric == "surface_dice" else np.inf), metric


def test_edt_past_the_first_window():
  """The EDT (float32 kernel) inside a thin shell (few voxels past 5 from the background: box
  searches) and inside a thick ball (many: the dense levels), equal to scipy's."""
  shape, spacing = (80, 72, 64), (1.0, 0.8, 1.6)
  grid = np.indices(shape)
  ball = lambda c, r: sum((g - x) ** 2 for g, x in zip(grid, c)) <= r**2
  mask = np.stack([ball((36, 32, 30), 14) & ~ball((36, 32, 30), 11), ball((36, 32, 30), 19)])
  mask[0, 34:39, 30:35, 28:33] = True  # a solid lump in the shell's hollow
  np.testing.assert_allclose(np.asarray(distance_transform_edt(mask, spacing=spacing)),
                             np.stack([ndi.distance_transform_edt(m, sampling=spacing)
                                       for m in mask]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 2.0), (0.9, 0.9, 1.25), (1.0, 0.81, 1.6),
                                     (1.0, 0.8123, 1.6)])
def test_two_parts_match_monai(monkeypatch, spacing):
  """Large arrays run each direction (or each half of the batch) as an independent part
  (`_parts`): forced here on a small array (a shape no other test compiles), on the integer
  kernel (uint8, uint16 and uint32 first levels) and the float32 kernel, every metric, directed
  and symmetric, equals MONAI's."""
  from jaxmed.metrics import surface  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(surface, "_PARALLEL_MIN_VOXELS", 1)
  assert len(surface._parts(12, False, (11, 9, 7))) == len(surface._parts(12, True, ())) == 2
  rng = np.random.default_rng(21)
  pred, target = _edge_cases(rng, (11, 9, 7))
  pred[0, 1:4, 2:5, 1:3] = True                                   # a speck off the target
  known = pred.reshape(12, -1).any(1) == target.reshape(12, -1).any(1)
  for percentile, directed in ((None, False), (95, False), (None, True)):
    np.testing.assert_allclose(
        np.asarray(hausdorff_distance(pred, target, percentile=percentile, spacing=spacing,
                                      directed=directed))[known],
        _monai(compute_hausdorff_distance, pred, target, spacing, percentile=percentile,
               directed=directed)[known], rtol=1e-5)
  for symmetric in (False, True):
    np.testing.assert_allclose(
        np.asarray(average_surface_distance(pred, target, spacing=spacing, symmetric=symmetric)),
        _monai(compute_average_surface_distance, pred, target, spacing, symmetric=symmetric),
        rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(surface_dice(pred, target, tolerance=1.5, spacing=spacing)),
      _monai(compute_surface_dice, pred, target, spacing, class_thresholds=[1.5]), rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 1), (2, 9), (2, 16), (2, 7, 13), (2, 5, 1, 17), (1, 4, 6, 8)])
def test_host_boundary_equals_the_traced_one(shape):
  """Concrete masks get their surfaces on the host, bit-packed; traced ones in JAX. Equal on
  last axes of every length around a byte, single-voxel axes, and full / empty items."""
  from jaxmed.metrics import surface  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(len(shape) + shape[-1])
  a, b = rng.uniform(size=shape) > 0.4, rng.uniform(size=shape) > 0.6
  a[0], b[-1] = True, False
  host = surface._edges(a, b)
  assert isinstance(host, np.ndarray) and host.dtype == bool
  assert host.ctypes.data % surface._ALIGN == 0  # XLA:CPU takes it without a copy
  np.testing.assert_array_equal(host, np.asarray(jax.jit(surface._edges)(a, b)))


def test_lattice_spacings_and_their_fallback():
  """Spacings whose squared ratios are integers (isotropic at any scale, 1 x 1 x 3, 0.5 x 1.5)
  or ratios of integers (0.9 x 0.9 x 1.25, 1 x 1.2, and 1 x 0.81 x 1.6, whose first window
  level runs in uint32) run the integer kernel; it equals
  MONAI, and where it cannot be exact (surfaces more than 255 voxels apart: squared distances
  past uint16) it says so and the float kernel answers."""
  from jaxmed.metrics import surface  # pylint: disable=g-import-not-at-top
  assert surface._lattice_ratios(np.float32([1.0, 1.0, 3.0])) == (1, 1, 9)
  assert surface._lattice_ratios(np.float32([0.5, 1.5])) == (1, 9)
  assert surface._lattice_ratios(np.float32([0.7, 0.7, 0.7])) == (1, 1, 1)
  # Ratios of short decimals: squared distances are s_min^2 / c_min times integers.
  assert surface._lattice_ratios(np.float32([1.0, 1.2])) == (25, 36)
  assert surface._lattice_ratios(np.float32([0.9, 0.9, 1.25])) == (324, 324, 625)
  assert (surface._lattice_unit(np.float32([0.9, 0.9, 1.25]), (324, 324, 625))
          == np.float32(0.9) / np.float32(18))                  # s_min / sqrt(c_min)
  # Past c_min = 2048 only squares (a decimal spacing's c_min is one): 100^2, 81^2.
  assert surface._lattice_ratios(np.float32([1.0, 1.27])) == (10000, 16129)
  assert surface._lattice_ratios(np.float32([1.0, 0.81, 1.6])) == (10000, 6561, 25600)
  assert surface._first_level_dtype((9, 12, 11), (10000, 6561, 25600)) == np.uint32
  assert surface._first_level_dtype((9, 12, 11), (324, 324, 625)) == np.uint16
  assert surface._lattice_ratios(np.float32([1.0, 0.8123, 1.6])) is None
  assert surface._lattice_ratios(np.float32([1.0, 1.2345])) is None
  rng = np.random.default_rng(11)
  # HD95 (the integer order statistic) on every spacing, the other metrics in turn (each of the
  # kernel's metrics compiles on its own).
  others = ("hausdorff", "average_surface_distance", "surface_dice") * 2 + ("hausdorff",)
  for (shape, spacing), other in zip((((19, 14), (0.5, 1.5)), ((9, 12, 11), (1.0, 1.0, 3.0)),
                                      ((9, 12, 11), (0.7, 0.7, 0.7)), ((30, 20), (2.0, 2.0)),
                                      ((9, 12, 11), (0.9, 0.9, 1.25)), ((19, 14), (1.0, 1.2)),
                                      ((9, 12, 11), (1.0, 0.81, 1.6))),
                                     others):
    pred, target = _edge_cases(rng, shape)
    known = pred.reshape(len(pred), -1).any(1) == target.reshape(len(pred), -1).any(1)
    for percentile in (95,) if other != "hausdorff" else (None, 95):
      ours = np.asarray(hausdorff_distance(pred, target, percentile=percentile, spacing=spacing))
      ref = _monai(compute_hausdorff_distance, pred, target, spacing, percentile=percentile)
      np.testing.assert_allclose(ours[known], ref[known], rtol=1e-5, atol=1e-5)
    if other == "average_surface_distance":
      np.testing.assert_allclose(
          np.asarray(average_surface_distance(pred, target, spacing=spacing, symmetric=True)),
          _monai(compute_average_surface_distance, pred, target, spacing, symmetric=True),
          rtol=1e-5, atol=1e-6)
    if other == "surface_dice":
      np.testing.assert_allclose(
          np.asarray(surface_dice(pred, target, tolerance=1.6, spacing=spacing)),
          _monai(compute_surface_dice, pred, target, spacing, class_thresholds=[1.6]),
          rtol=1e-5, atol=1e-6)
  # A uint32 first level at c_min = 1 (1 x 60 x 60 mm, the first axis spanned by the window):
  # a certified k = 72000 past uint16 (4 and 2 voxels of 60 mm) stays exact (not 72000 - 65536).
  pred, target = np.zeros((1, 3, 20, 20), bool), np.zeros((1, 3, 20, 20), bool)
  target[0, 1, 5, 5] = pred[0, 1, 9, 7] = True
  pred[0, 1, 0, 0] = target[0, 1, 0, 0] = pred[0, 1, 19, 19] = target[0, 1, 19, 19] = True
  assert surface._first_level_dtype((3, 20, 20), (1, 3600, 3600)) == np.uint32
  np.testing.assert_allclose(np.asarray(hausdorff_distance(pred, target, spacing=(1, 60, 60))),
                             [np.sqrt(72000.0)], rtol=1e-6)
  # 299 voxels apart: k = 89401 does not fit uint16, so the integer kernel is not exact.
  pred, target = np.zeros((2, 300, 3), bool), np.zeros((2, 300, 3), bool)
  pred[:, 0, 1], target[0, 299, 1], target[1, 3, 0] = True, True, True
  spacing = np.float32([1.0, 1.0])
  kwargs = {"both": True, "ratios": (1, 1), "metric": "hausdorff_quantile", "spatial": (300, 3)}
  lattice = lambda p, t: surface._lattice_statistics(
      tuple(surface._edges(p, t).reshape(2, 2, -1)), spacing, np.float32(1.0),
      np.float32(0.95), **kwargs)
  assert not bool(lattice(pred, target)[1]) and bool(lattice(pred, pred)[1])
  for percentile in (None, 95):
    np.testing.assert_allclose(np.asarray(hausdorff_distance(pred, target, percentile=percentile)),
                               _monai(compute_hausdorff_distance, pred, target,
                                      percentile=percentile), rtol=1e-6)
  traced = jax.jit(lambda p, t: hausdorff_distance(p, t, percentile=95))
  np.testing.assert_allclose(np.asarray(traced(pred, target)),
                             np.asarray(hausdorff_distance(pred, target, percentile=95)), rtol=1e-6)


_masks = st.integers(0, 2**32 - 1).map(
    lambda seed: _blobs(np.random.default_rng(seed), (12, 10), 2, sigma=1.2, level=0.0))


@settings(max_examples=20, deadline=None)
@given(masks=_masks, shift=st.tuples(st.integers(-3, 3), st.integers(-3, 3)))
def test_properties(masks, shift):
  a, b = masks[:1], masks[1:]
  hd = np.asarray(hausdorff_distance(a, b, percentile=95))
  np.testing.assert_allclose(hd, np.asarray(hausdorff_distance(b, a, percentile=95)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(average_surface_distance(a, b, symmetric=True)),
                             np.asarray(average_surface_distance(b, a, symmetric=True)), rtol=1e-6)
  if a.any():
    assert hausdorff_distance(a, a)[0] == 0 and average_surface_distance(a, a)[0] == 0
    assert surface_dice(a, a, tolerance=0)[0] == 1
  # translating both masks inside a larger empty canvas leaves every distance unchanged
  big_a, big_b = np.zeros((1, 18, 16), bool), np.zeros((1, 18, 16), bool)
  big_a[:, 3:15, 3:13], big_b[:, 3:15, 3:13] = a, b
  moved_a, moved_b = (np.roll(x, shift, axis=(1, 2)) for x in (big_a, big_b))
  np.testing.assert_allclose(np.asarray(hausdorff_distance(moved_a, moved_b, percentile=95)),
                             np.asarray(hausdorff_distance(big_a, big_b, percentile=95)),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(surface_dice(moved_a, moved_b, tolerance=1.5)),
                             np.asarray(surface_dice(big_a, big_b, tolerance=1.5)), rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: hausdorff_distance(np.zeros((1, 4, 4)), np.zeros((1, 4, 5))), "shape"),
    (lambda: hausdorff_distance(np.zeros((4,)), np.zeros((4,))), "N, \\*spatial"),
    (lambda: hausdorff_distance(np.zeros((1, 2, 2, 2, 2)), np.zeros((1, 2, 2, 2, 2))), "spatial"),
    (lambda: hausdorff_distance(np.full((1, 4, 4), 0.5), np.zeros((1, 4, 4))), "binary"),
    (lambda: average_surface_distance(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), spacing=(1, 2, 3)),
     "spacing"),
    (lambda: surface_dice(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), tolerance=1, spacing=-1.0),
     "spacing"),
    (lambda: surface_dice(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), tolerance=-1), "tolerance"),
    (lambda: hausdorff_distance(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), percentile=101),
     "percentile"),
    (lambda: distance_transform_edt(np.array([[0, 2]])), "binary"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()
