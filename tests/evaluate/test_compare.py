"""Table helpers of jaxmed.evaluate.compare: pooling per-subject tables, paired t-tests against
scipy, and the formatting of means with infinite distances and of tiny p-values."""

import numpy as np
import pytest
import scipy.stats

from jaxmed.evaluate.compare import (format_finite, format_p, paired_differences,
                                     paired_p_values, pool_subjects)


def test_pool_subjects_orders_each_table_by_subject():
  a = {"subjects": ["s2", "s1"], "dice": [[0.2, 0.4], [0.1, 0.3]]}
  b = {"subjects": ["s1", "s2"], "dice": [[0.5, 0.6], [0.7, 0.8]]}
  np.testing.assert_array_equal(pool_subjects([a, b], "dice"),
                                [[0.1, 0.3], [0.2, 0.4], [0.5, 0.6], [0.7, 0.8]])


def test_paired_differences_match_scipy_and_skip_infinite_pairs():
  rng = np.random.default_rng(0)
  base = rng.uniform(size=(12, 2))
  other = base + 0.05 + 0.02 * rng.standard_normal((12, 2))
  other[3, 1] = np.inf  # an empty prediction: that pair leaves the test of region 1
  scores = {"scratch": {"dice": base, "hd95": base, "msd": base},
            "dae": {"dice": other, "hd95": other, "msd": other}}
  table = paired_differences(["WT", "TC"], scores, baseline="scratch")
  lines = [line for line in table.splitlines() if line.startswith("| Dice |")]
  assert len(lines) == 2
  for r, line in enumerate(lines):
    cells = [c.strip() for c in line.strip("|").split("|")]
    keep = np.isfinite(other[:, r])
    p = scipy.stats.ttest_rel(other[keep, r], base[keep, r]).pvalue
    assert cells[1] == ["WT", "TC"][r]
    assert cells[4] == f"{np.mean(other[keep, r] - base[keep, r]):+.3f}"
    assert cells[5] == format_p(p) and cells[6] == str(int(keep.sum()))
  assert "1 inf" in lines[1]
  np.testing.assert_allclose(paired_p_values(other[:, :1], base[:, :1]),
                             [scipy.stats.ttest_rel(other[:, 0], base[:, 0]).pvalue], rtol=1e-4)
  with pytest.raises(ValueError, match="baseline 'mae' is not a row"):
    paired_differences(["WT", "TC"], scores, baseline="mae")


def test_formatting():
  assert format_finite([1.0, 3.0, np.inf]) == "2.000 (1.414), 1 inf"
  assert format_finite([np.inf, np.inf]) == "inf"
  assert format_finite([np.nan]) == "-"
  assert format_p(np.nan) == "-" and format_p(0.0) == "< 1e-30"  # float32 underflow
  assert format_p(2e-5) == "2.0e-05" and format_p(0.0341) == "0.034"
