"""The scaling-law study (`llm_math.studies.scaling_law`): a branch off the WSD trunk is the run from
scratch, the grid end to end (records, fit, report, three figures), resume, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest

from llm_math import checkpoint
from llm_math import reports
from llm_math import studies
from llm_math import train
from llm_math.analysis import scaling_laws as scaling_laws_lib
from llm_math.errors import UsageError
from llm_math.figures import scaling_law as figures_lib
from llm_math.studies import perplexity
from llm_math.studies import scaling_law
from tests import helpers

# One worker builds the module's grid once (pytest.ini: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("scaling_law")
BUDGETS = [10, 20]  # Steps; the decay of 10 steps starts at 8, where its branch leaves the trunk.


def grid_config(**overrides):
  c = helpers.tiny_config(schedule="wsd", decay_fraction=0.2, eval_every=1000, **overrides)
  with c.unlocked():
    c.model_sizes = "16x1,32x1"
    c.budgets = ",".join(map(str, BUDGETS))
    c.fit_bootstrap = 10
  return c


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  """run() on 2 sizes x 2 budgets, with its results.json, report and figures written."""
  workdir = tmp_path_factory.mktemp("scaling_law")
  config = grid_config()
  results = scaling_law.run(config, str(workdir), log=lambda *_: None)
  studies.write_results(str(workdir), results)
  return config, workdir, results


def test_branch_is_the_wsd_run_from_scratch(grid, tmp_path):
  """The branch of 10 steps (the trunk's step 8, then its own cool-down) ends where a WSD run of 10
  steps from step 0 ends, and trained only the cool-down; its config is the trunk's but num_steps."""
  config, workdir, results = grid
  record = next(r for r in results["records"] if r["size"] == "d16_L1" and r["steps"] == 10)
  assert (record["run"], record["branched_at"], record["steps_trained"]) == ("branch", 8, 2)
  size = perplexity.parse_model_sizes(config.model_sizes)[0]
  scratch = scaling_law.budget_config(perplexity.size_config(config, size), 10)
  dataset = studies.load_dataset(config)
  result = train.train(scratch, dataset, str(tmp_path / "scratch"), log=lambda _: None)
  assert result.final_step == 10
  assert abs(result.val_curve[-1][1] - record["val_nll_nats"]) < 1e-5

  branch, trunk = (workdir / "models" / "d16_L1" / d for d in ("steps_10", "trunk"))
  saved = {d: json.loads((d / "config.json").read_text()) for d in (branch, trunk)}
  assert {k for k in saved[trunk] if saved[trunk][k] != saved[branch][k]} == {"num_steps"}
  assert saved[trunk]["checkpoint_every"] == 8 and saved[trunk]["keep_checkpoints"] == 20
  assert checkpoint.saved_steps(str(trunk), ("checkpoints",)) == [8, 16, 20]
  assert json.loads((branch / scaling_law.BRANCH_FILE).read_text())["step"] == 8
  assert not [p for p in os.listdir(branch) if ".tmp." in p]  # The copy was renamed into place.


def test_grid_results_report_and_figures(grid):
  config, workdir, results = grid
  json.dumps(results, allow_nan=False)  # Plain JSON: no numpy types, no NaN.
  for key in ("experiment", "data", "evaluation", "records", "fit", "compute_optimal",
              "chinchilla_reference", "notes", "config"):
    assert key in results, key
  assert results["experiment"] == "scaling_law" and results["evaluation"]["split"] == "validation"
  assert len(results["records"]) == 4
  for r in results["records"]:
    assert r["tokens"] == r["steps"] * config.batch_size * config.seq_len
    assert r["flops"] == 6.0 * r["params"] * r["tokens"]
    assert r["run"] == ("trunk" if r["steps"] == 20 else "branch")
  fit = results["fit"]
  assert "bootstrap_samples" not in fit
  assert {"E", "A", "alpha", "B", "beta", "ci95", "rms_log_residual"} <= set(fit)
  assert fit["num_points"] == 4
  assert "underdetermined" in fit["note"]  # 4 points for 5 parameters, said so.
  assert any("alpha is not determined" in n for n in results["notes"])
  optimal = results["compute_optimal"]
  assert len(optimal["flops"]) == scaling_law.FLOPS_GRID_POINTS and optimal["a"] is not None
  assert results["chinchilla_reference"]["a"] == 0.5

  assert sorted(results["figures"]) == sorted(figures_lib.FIGURES)
  for name in figures_lib.FIGURES:
    assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  md = (workdir / "results.md").read_text()
  assert "| d16_L1 | " in md and "branch at 8" in md and "## Notes" in md
  assert "| E | " in md and "a (N* ~ C^a)" in md


def test_rerun_reuses_every_run(grid):
  """The same call again trains nothing: the trunks are finished, the branches resume from their
  own checkpoints (not a second copy) and give the same records."""
  config, workdir, results = grid
  lines = []
  again = scaling_law.run(config, str(workdir), log=lines.append)
  assert again["records"] == results["records"]
  assert not any("trains from step 0" in l for l in lines)


def test_trunk_towards_another_largest_budget_is_an_error(grid):
  config, workdir, _ = grid
  trunk_dir = str(workdir / "models" / "d16_L1" / "trunk")
  cfg = scaling_law.trunk_config(perplexity.size_config(config, (16, 1)), [10, 30])
  with pytest.raises(UsageError, match=r"trained towards 20 steps and is at step 20") as error:
    scaling_law.check_trunk(trunk_dir, cfg)
  assert "\n" not in str(error.value)


def test_branch_without_a_trunk_checkpoint_trains_from_scratch(grid, tmp_path):
  _, workdir, _ = grid
  trunk_dir = str(workdir / "models" / "d16_L1" / "trunk")
  lines = []
  assert scaling_law.seed_branch(trunk_dir, str(tmp_path), 12, lines.append) == 0
  assert "no checkpoint at step 12" in lines[0] and not (tmp_path / "checkpoints").exists()


def test_figures_and_report_draw_without_a_fit(grid, tmp_path):
  """A fit that could not be made (None values, a note) still gives three figures and a report."""
  _, _, results = grid
  failed = json.loads(json.dumps(results))
  failed["fit"].update(dict.fromkeys(("E", "A", "alpha", "B", "beta", "rms_log_residual")),
                       ci95=None, note="no fit: every refinement ended non-finite")
  failed["compute_optimal"].update(n_opt=None, d_opt=None, a=None, b=None, G=None, ci95=None)
  assert figures_lib.draw(failed, str(tmp_path)) == list(figures_lib.FIGURES)
  assert "| E | - |" in reports.report(failed)


@pytest.mark.parametrize("budgets", ["", "20,10", "0,10", "10,10", "ten,20", "10;20"])
def test_bad_budgets_are_one_line_errors(budgets):
  config = grid_config()
  config.budgets = budgets
  with pytest.raises(UsageError) as error:
    scaling_law.check(config)
  assert str(error.value).startswith(f"--config.budgets={budgets!r}")
  assert "\n" not in str(error.value)


def test_check_needs_wsd_and_budgets_past_the_warmup():
  config = grid_config()
  scaling_law.check(config)
  assert scaling_law.parse_budgets(" 10, 20 ") == [10, 20]
  config.schedule = "cosine"
  with pytest.raises(UsageError, match=r"^--config.schedule='cosine'"):
    scaling_law.check(config)
  config = grid_config(warmup_steps=9)  # The decay of 10 steps would start at 8, inside it.
  with pytest.raises(UsageError, match=r"^--config.budgets='10,20': the run of 10 steps"):
    scaling_law.check(config)


def test_cli_bad_budgets_is_one_line(tmp_path):
  """The command line: a bad --config.budgets is one 'error:' line, exit 2, no workdir left."""
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.scaling_law", f"--workdir={tmp_path / 'w'}",
       "--config.budgets=400,200"], cwd=helpers.REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors == ["error: --config.budgets='400,200': expected increasing positive step counts "
                    "such as '500,1000,2000'"], proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()


def test_seeds_refit_the_law_on_every_seeds_points():
  """Over seeds the law is refitted on each (N, D) run of each seed (48 points for 4 x 4 x 3),
  not averaged over each seed's fit: on a known law with seed noise it recovers the law."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  law = {"e_irr": 1.0, "a": 50.0, "alpha": 0.4, "b": 80.0, "beta": 0.35}
  rng = np.random.default_rng(0)
  records = []
  for n in (2e4, 6e4, 2e5, 6e5):
    for d in (5e5, 1e6, 2e6, 4e6):
      truth = float(scaling_laws_lib.chinchilla_law(n, d, **law))
      values = (truth * np.exp(rng.normal(0, 0.002, 3))).tolist()
      records.append({"name": f"{n:g} {d:g}", "params": n, "tokens": d, "flops": 6 * n * d,
                      "run": "trunk", "val_nll_nats": float(np.mean(values)),
                      "per_seed": {"val_nll_nats": values}, "n_seeds": 3})
  aggregate = {"records": records, "n_seeds": 3, "seeds": [0, 1, 2], "notes": [],
               "config": {"fit_bootstrap": 20}}
  out = scaling_law.summarize_seeds(aggregate)
  fit = out["fit"]
  assert fit["num_points"] == 48 and fit["points"].startswith("48 points")
  assert fit["alpha"] == pytest.approx(0.4, abs=0.05) and fit["beta"] == pytest.approx(0.35, abs=0.05)
  assert set(fit["ci95"]) == {"E", "A", "alpha", "B", "beta"}
  assert out["compute_optimal"]["a"] == pytest.approx(0.35 / 0.75, abs=0.05)
