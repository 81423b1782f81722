"""Paired differences of two models on the same images, and one model's accuracy interval."""

import json
import math
import random

import pytest

from kapify.reporting.paired import paired_difference, paired_rows, proportion_interval, read_per_image


def test_paired_difference_matches_a_direct_computation_on_random_flags():
    rng = random.Random(3)
    for n in (2, 7, 100, 501):
        a = [rng.random() < 0.4 for _ in range(n)]
        b = [rng.random() < 0.3 for _ in range(n)]
        d = paired_difference(a, b)
        diffs = [int(x) - int(y) for x, y in zip(a, b)]
        mean = sum(diffs) / n
        var = sum((v - mean) ** 2 for v in diffs) / (n - 1)
        assert d.difference == pytest.approx(mean) == pytest.approx(d.first - d.second)
        assert d.ci95[1] - d.ci95[0] == pytest.approx(2 * 1.96 * math.sqrt(var / n))
        assert d.first_only == sum(x and not y for x, y in zip(a, b)) and d.n == n


def test_identical_results_differ_by_zero_with_no_width_and_bad_input_is_refused():
    d = paired_difference([1, 0, 1], [1, 0, 1])
    assert d.difference == 0 and d.ci95 == (0.0, 0.0)
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_difference([1, 0], [1])
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_difference([], [])


def test_wilson_interval_stays_in_range_and_covers_the_proportion():
    for hits, n in ((0, 10), (10, 10), (3, 500), (250, 500)):
        lo, hi = proportion_interval(hits, n)
        assert 0.0 <= lo <= hits / n <= hi <= 1.0
    assert proportion_interval(0, 500)[1] > 0  # no hits is not "certainly zero"
    with pytest.raises(ValueError, match="n >= 1"):
        proportion_interval(0, 0)


def test_paired_rows_reads_kapify_eval_per_image_files(tmp_path):
    for name, flags in (("a", [1, 1, 0, 0]), ("b", [1, 0, 0, 1])):
        rows = {"autoattack eps=1": flags, "clean eps=1": [1, 1, 1, 1], f"only-{name}": [1]}
        (tmp_path / f"{name}.json").write_text(json.dumps({"seed": 0, "rows": rows}))
    rows = paired_rows(read_per_image(tmp_path / "a.json"), read_per_image(tmp_path / "b.json"))
    assert sorted(rows) == ["autoattack eps=1", "clean eps=1"]
    assert rows["autoattack eps=1"].difference == 0 and rows["autoattack eps=1"].first_only == 1
