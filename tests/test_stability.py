"""Learning-rate sensitivity (Wortsman et al. 2023) and the seed intervals of the stability study."""
import pytest

from llm_math.analysis import intervals
from llm_math.analysis import stability

def test_lr_sensitivity_is_the_mean_capped_excess_over_the_best():
  l0 = 3.0
  losses = [2.0, 1.5, 1.0, float("nan"), 3.5]  # a diverged run and one worse than not training
  # Capped: 2.0, 1.5, 1.0, 3.0, 3.0 -> excess over 1.0: 1.0, 0.5, 0, 2.0, 2.0.
  assert stability.lr_sensitivity(losses, l0) == pytest.approx(5.5 / 5)
  assert stability.lr_sensitivity([1.0, 1.0], l0) == 0.0
  assert stability.best_learning_rate([1e-3, 1e-2, 1e-1], [2.0, 1.0, None]) == 1e-2
  assert stability.best_learning_rate([1e-3], [float("nan")]) is None


def test_mean_ci95_is_students_t_interval():
  out = intervals.mean_ci95([1.0, 2.0, 3.0])
  # mean 2, s = 1, t_{0.975, 2} = 4.302653: half-width 4.302653 / sqrt(3).
  assert out["mean"] == 2.0 and out["n"] == 3
  assert out["ci95"] == pytest.approx([2 - 4.302653 / 3 ** 0.5, 2 + 4.302653 / 3 ** 0.5], rel=1e-6)
  assert intervals.mean_ci95([5.0])["ci95"] is None and intervals.mean_ci95([])["mean"] is None
  assert intervals.mean_ci95([1.0, float("nan"), 3.0])["n"] == 2


def _tiny(**overrides):
  from experiments.configs import stability as stability_config  # pylint: disable=g-import-not-at-top
  c = stability_config.get_config()
  c.num_steps, c.warmup_steps, c.log_every, c.checkpoint_every = 8, 2, 4, 8
  c.seq_len, c.batch_size, c.eval_max_tokens, c.eval_stride = 16, 8, 512, 8
  c.synthetic.update(train_tokens=20000, val_tokens=2000, lag=4)
  c.stability.update(sizes="16x1", learning_rates=(1.0,), variants=("baseline", "qk_norm"),
                     seeds=(0, 1))
  c.update(overrides)
  return c


def test_the_study_writes_its_sweep_sensitivities_and_figures(tmp_path):
  """A 2 variants x 2 seeds grid at learning rate 1 (the sensitivity's mathematics: the tests
  above): every run recorded, the summary recomputed from the runs, the attention logits of the
  baseline far above qk-norm's, and the figures and report written; a rerun reuses every run."""
  from llm_math import studies  # pylint: disable=g-import-not-at-top
  from llm_math.studies import stability as study  # pylint: disable=g-import-not-at-top
  results = study.run(_tiny(), str(tmp_path), log=lambda *_: None)
  studies.write_results(str(tmp_path), results)
  assert len(results["runs"]) == 4
  for row in results["summary"]:
    per_seed = [[r["final_val_nll"] for r in results["runs"] if r["variant"] == row["variant"]
                 and r["seed"] == seed] for seed in (0, 1)]
    expected = [stability.lr_sensitivity(v, results["initial_loss"]) for v in per_seed]
    assert row["lr_sensitivity_per_seed"] == pytest.approx(expected)
    assert row["lr_sensitivity"]["n"] == 2 and row["lr_sensitivity"]["ci95"] is not None
  top = {r["variant"]: r for r in results["runs"] if r["learning_rate"] == 1.0 and r["seed"] == 0}
  assert top["baseline"]["curves"]["step"] == [4, 8]
  # qk-norm: |q.k| / sqrt(d_k) <= sqrt(d_k) |scale|^2; the baseline's logits run away at lr 1.
  assert max(top["qk_norm"]["curves"]["attn_logit_max"]) < 0.1 * max(
      top["baseline"]["curves"]["attn_logit_max"])
  for name in ("results.json", "results.md", "lr_sweep.png", "lr_sensitivity.png",
               "logit_growth.png"):
    assert (tmp_path / name).exists(), name
  again = study.run(_tiny(), str(tmp_path), log=lambda *_: None)
  assert [r["final_val_nll"] for r in again["runs"]] == [r["final_val_nll"] for r in results["runs"]]


def test_bad_sizes_are_one_line_errors():
  from llm_math.studies import stability as study  # pylint: disable=g-import-not-at-top
  from llm_math.errors import UsageError  # pylint: disable=g-import-not-at-top
  for sizes in ("", "24x2", "32", "axb"):
    with pytest.raises(UsageError, match="--config.stability.sizes"):
      study.sizes(_with_sizes(sizes))


def _with_sizes(sizes):
  c = _tiny()
  c.stability.sizes = sizes
  return c


def test_an_unknown_variant_is_a_one_line_error():
  from llm_math.studies import stability as study  # pylint: disable=g-import-not-at-top
  from llm_math.errors import UsageError  # pylint: disable=g-import-not-at-top
  c = _tiny()
  c.stability.variants = ("baseline", "qknorm")
  with pytest.raises(UsageError, match="'qknorm' is not one of baseline, qk_norm"):
    study.sizes(c)
