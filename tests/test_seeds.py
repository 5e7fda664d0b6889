"""Aggregating a study over seeds: means, Student-t intervals, per-seed values, unchanged constants."""

import numpy as np
import pytest
from scipy import stats

from llm_math.studies import seeds as seeds_lib


def _results(seed: int, nll: float, curve: list) -> dict:
  return {"experiment": "perplexity", "data": "synthetic",
          "records": [{"name": "Transformer", "params": 1000, "val_nll_nats": nll,
                       "diverged": False},
                      {"name": "uniform", "val_nll_nats": 3.4657}],
          "curve": curve, "config": {"seed": seed, "num_steps": 10}}


def test_numbers_that_vary_become_means_with_intervals_and_constants_stay():
  nlls = [1.0, 1.2, 1.1]
  per_seed = [_results(s, nll, [[0, 3.0], [10, nll]]) for s, nll in enumerate(nlls)]
  out = seeds_lib.aggregate(per_seed, [0, 1, 2])
  model, uniform = out["records"]
  half = stats.t.ppf(0.975, 2) * np.std(nlls, ddof=1) / np.sqrt(3)
  assert model["val_nll_nats"] == pytest.approx(1.1)
  assert model["val_nll_nats_ci95"] == pytest.approx([1.1 - half, 1.1 + half])
  assert model["val_nll_nats_ci95"][0] <= model["val_nll_nats"] <= model["val_nll_nats_ci95"][1]
  assert model["per_seed"] == {"val_nll_nats": nlls} and model["n_seeds"] == 3
  assert model["params"] == 1000 and model["diverged"] is False
  assert uniform == {"name": "uniform", "val_nll_nats": 3.4657}  # The same in every seed.
  assert out["curve"] == [[0, 3.0], [10, pytest.approx(1.1)]]
  assert out["seeds"] == [0, 1, 2] and out["n_seeds"] == 3 and out["config"]["seed"] is None
  assert out["experiment"] == "perplexity"


def test_a_seed_without_a_number_is_left_out_of_its_interval():
  per_seed = [_results(0, 1.0, []), _results(1, None, []), _results(2, 1.2, [])]
  model = seeds_lib.aggregate(per_seed, [0, 1, 2])["records"][0]
  assert model["val_nll_nats"] == pytest.approx(1.1) and model["per_seed"]["val_nll_nats"][1] is None


def test_one_seed_has_no_interval():
  out = seeds_lib.aggregate([_results(0, 1.0, [])], [0])
  assert out["records"][0]["val_nll_nats"] == 1.0 and "val_nll_nats_ci95" not in out["records"][0]


def test_a_curve_is_averaged_point_by_point_with_an_interval_at_each_point():
  per_seed = [{"curves": {"m": {"step": [0, 10], "val_nll": [3.0, nll]}}} for nll in (1.0, 1.2, 1.1)]
  curve = seeds_lib.aggregate(per_seed, [0, 1, 2])["curves"]["m"]
  assert curve["step"] == [0, 10] and curve["val_nll"] == [3.0, pytest.approx(1.1)]
  assert curve["val_nll_ci95"][0] == [3.0, 3.0]  # The same on every seed: zero width.
  assert curve["val_nll_ci95"][1][0] < 1.1 < curve["val_nll_ci95"][1][1]
  assert curve["per_seed"] == {"val_nll": [[3.0, 1.0], [3.0, 1.2], [3.0, 1.1]]}


def test_paired_comparisons_take_the_shared_seed_variation_out():
  from llm_math.studies import perplexity  # pylint: disable=g-import-not-at-top
  # Two models whose losses move together over seeds: unpaired intervals overlap, the paired
  # difference (always 0.05) is certain.
  small, big = [2.0, 2.3, 2.1], [1.95, 2.25, 2.05]
  per_seed = [{"evaluations": {"char": {}}, "records": [
      {"name": "d32", "kind": "model", "tokenizer": "char", "params": 10, "val_nll_nats": s},
      {"name": "d64", "kind": "model", "tokenizer": "char", "params": 20, "val_nll_nats": b},
      {"name": "KN 3-gram", "kind": "ngram", "tokenizer": "char", "params": 99,
       "context": "equal", "val_nll_nats": 2.5}]} for s, b in zip(small, big)]
  out = seeds_lib.aggregate(per_seed, [0, 1, 2])
  d32, d64, _ = out["records"]
  assert d64["val_nll_nats_ci95"][1] > d32["val_nll_nats_ci95"][0]  # Unpaired: they overlap.
  paired = perplexity.paired_comparisons(out)
  first = paired[0]
  assert (first["a"], first["b"]) == ("d64", "d32") and first["below"] == 3
  assert first["mean"] == pytest.approx(-0.05) and first["ci95"] == pytest.approx([-0.05, -0.05])
  vs_ngram = [p for p in paired if p["b"] == "KN 3-gram"]
  assert [p["a"] for p in vs_ngram] == ["d32", "d64"]
  assert vs_ngram[0]["mean"] == pytest.approx(np.mean(small) - 2.5)


def test_reports_print_both_kinds_of_interval_and_iterate_only_measured_fields():
  from llm_math import reports  # pylint: disable=g-import-not-at-top
  rec = {"x": 1.0, "x_ci95": [0.9, 1.1], "y": 2.0, "ci95": {"y": [1.5, 2.5]}, "z": 3.0,
         "per_seed": {"x": [0.95, 1.0, 1.05]}, "n_seeds": 3}
  assert reports.pm(rec, "x", "+.2f") == "+1.00 ± 0.10"  # Over seeds: mean ± half-width.
  assert reports.pm(rec, "y", ".1f") == "2.0 [1.5, 2.5]"  # A fit's bootstrap interval.
  assert reports.pm(rec, "z", ".1f") == "3.0" and reports.pm(rec, "w", ".1f") == "-"
  assert reports.fields(rec) == {"x": 1.0, "y": 2.0, "ci95": {"y": [1.5, 2.5]}, "z": 3.0}
