"""The batch-size law of SGD: steps and examples to a target loss, the critical batch size, gradient
noise (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

Training to a fixed loss with batch size B takes S steps and E = B S examples, with

    S = S_min (1 + B_crit / B),   E = E_min (1 + B / B_crit),   B_crit = E_min / S_min,

perfect scaling (S ~ 1/B, E constant) for B << B_crit and diminishing returns (S -> S_min) for
B >> B_crit; B_crit is predicted by the simple noise scale B_simple = tr(Sigma) / |G|^2, which rests
on the mini-batch gradient variance law E|g_B - G|^2 = tr(Sigma) / B (the mathematics:
`llm_math.analysis.gradient_noise`).

Protocol. A pilot run (the smallest B at its rule learning rate) sets the target validation loss.
For every B, runs start from the same initialization, train with Adam at a constant learning rate
(tuned over powers of two, or a rule) and stop at the first evaluation at or below the target;
steps-to-target interpolate between evaluations. Every run is a `train.fit` with grad_accum_steps = M
micro-batches, whose squared gradient norms at B / M and B feed the two-batch noise estimator. At
each B's best run: the training loss (generalization gap) and the sharpness; at one checkpoint, the
gradient variance vs B. Analyses read the whole parameters (`train.to_host`) on every process.

Each run has its own workdir (runs/pilot, runs/b<B>_lr<lr>): the study resumes after preemption
(rerun the same command: an interrupted run continues, finished ones are reused), and a run whose
config changed is a one-line error. results["notes"] says, one line each, where the fit of
S = S_min + E_min / B stands on too few points, at a bound of its parameters, or describes no
trade-off; the report (`llm_math.reports.batch_size`) and the figures (`llm_math.figures.batch_size`)
show them.
"""

import dataclasses
import functools
import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_math import data as data_lib
from llm_math import evaluation
from llm_math import model as model_lib
from llm_math import optimizer as optimizer_lib
from llm_math import sharding
from llm_math import studies
from llm_math.studies import seeds as seeds_lib
from llm_math import train as train_lib
from llm_math import train_config
from llm_math.analysis import gradient_noise as gn
from llm_math.analysis import sharpness as sharpness_lib
from llm_math.errors import UsageError

LR_RULES = {"linear": 1.0, "sqrt": 0.5, "constant": 0.0, "tune": 0.5}  # rule -> exponent a
# A step index no run reaches: `data.train_batch` there gives a fixed draw of training windows.
_PER_EXAMPLE_STEP = 10**9
_FRESH_BATCH_STEP = 10**9 + 1  # ... and + 1, + 2, ...: one fixed draw per B of the variance law.
DIVERGED_NATS = 1.0  # A run whose validation loss rises this far above its start has diverged.
# Fields that choose the sweep's runs, not how one run trains: left out of each run's config.
SWEEP_FIELDS = ("batch_sizes", "lr_rule", "lr_reference_batch", "lr_tune_factor", "lr_max_extend",
                "pilot_steps", "target_margin", "noise_microbatches", "gradient_variance",
                "sharpness")
# A fitted S_min or E_min below this fraction of the smallest measured S or E sits at its bound 0.
_AT_BOUND = 1e-6


def rule_learning_rate(config, batch_size: int) -> float:
  """lr(B) = learning_rate * (B / lr_reference_batch)^a; a = 1 linear, 1/2 sqrt (and tune), 0 constant."""
  return config.learning_rate * (batch_size / config.lr_reference_batch) ** LR_RULES[config.lr_rule]


def eval_steps(growth: float, last: int) -> list[int]:
  """The evaluation steps of a run: every step at first, then `growth`x apart, and `last`."""
  steps = [1]
  while steps[-1] < last:
    steps.append(min(max(steps[-1] + 1, math.ceil(steps[-1] * growth)), last))
  return steps


def check(config):
  """User mistakes in the sweep's fields, as one-line errors."""
  def need(ok: bool, field: str, expected: str):
    if not ok:
      value = functools.reduce(lambda c, name: c[name], field.split("."), config)
      raise UsageError(f"--config.{field}={value!r}: expected {expected}")

  need(config.lr_rule in LR_RULES, "lr_rule", f"one of {', '.join(LR_RULES)}")
  sizes, m = list(config.batch_sizes), config.noise_microbatches
  need(len(sizes) > 1 and all(isinstance(b, int) and b > 1 for b in sizes)
       and sorted(set(sizes)) == sizes, "batch_sizes", "at least two increasing integers >= 2")
  dp = sharding.data_parallel_size(*sharding.from_config(config))
  for b in sizes:
    need(m > 1 and b % min(m, b) == 0, "noise_microbatches",
         f">= 2 and a divisor of every batch size (or larger than it), but B={b}")
    need(b // min(m, b) % dp == 0, "batch_sizes", f"micro-batches (B / noise_microbatches) that "
         f"divide over the {dp} data-parallel devices of mesh {config.mesh}, but B={b}")
  gv = config.gradient_variance
  need(gv.checkpoint_batch in sizes, "gradient_variance.checkpoint_batch", f"one of {tuple(sizes)}")
  for name, low in (("fresh_batches", 2), ("num_examples", 4), ("num_batches", 1)):
    need(gv[name] >= low, f"gradient_variance.{name}", f">= {low}")
  need(not config.model.dropout_rate, "model.dropout_rate", "0 (this study trains without dropout)")
  for name in ("lr_reference_batch", "num_steps", "pilot_steps"):
    need(config[name] > 0, name, "> 0")
  for name in ("lr_tune_factor", "eval_growth"):
    need(config[name] > 1, name, "> 1")
  studies.fit_bootstrap(config)


# ----------------------------------------------------------------------------------------------
# One run: a `train.fit` in its own workdir.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Study:
  """What every run and measurement of the sweep shares."""
  config: object
  dataset: data_lib.Dataset
  workdir: str
  model: model_lib.Transformer
  windows: dict  # split ('val', 'train') -> data.EvalWindows: the first eval_max_tokens tokens
  evaluate: dict  # split -> evaluation.Evaluator on those windows
  unit_tx: optax.GradientTransformation  # the optimizer at learning rate 1 (after the warmup)
  unit_lr: Callable  # its schedule: step -> multiplier of a run's learning rate
  loss: Callable  # (params, (inputs_BxT, targets_BxT)) -> mean NLL: what the analyses differentiate
  log: Callable


def make_study(config, dataset, workdir: str, log) -> Study:
  """The model, evaluation windows (validation and training), unit optimizer and loss of a sweep."""
  model = model_lib.Transformer(train_config.model_config(config, dataset.vocab_size))
  windows = {"val": evaluation.validation_windows(config, dataset.val_ids),
             "train": evaluation.validation_windows(config, dataset.train_ids)}
  unit = config.copy_and_resolve_references()
  with unit.unlocked():  # Peak and floor 1: a constant multiplier after the linear warmup.
    unit.learning_rate = unit.min_learning_rate = 1.0
  score = evaluation.nll_score(model.apply)
  loss = lambda params, batch: jnp.divide(*score(params, *batch, jnp.ones(batch[0].shape)))
  return Study(config, dataset, workdir, model, windows,
               {k: evaluation.evaluator(config, w, model.apply) for k, w in windows.items()},
               optimizer_lib.optimizer(unit), optimizer_lib.learning_rate_schedule(unit), loss, log)


def run_config(config, batch_size: int, learning_rate: float, num_steps: int, target: float):
  """The config of one run: the study's training fields with this B, learning rate, step cap and
  target (0: none), and the noise micro-batches as its gradient accumulation."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for field in SWEEP_FIELDS:
      del c[field]
    c.batch_size, c.num_steps, c.target_loss = batch_size, num_steps, target
    c.learning_rate = c.min_learning_rate = learning_rate
    c.grad_accum_steps = min(config.noise_microbatches, batch_size)
  return c


def train_run(study: Study, batch_size: int, lr: float, num_steps: int, target: float = 0.0):
  """Trains (or resumes, or reuses) one run until the target (0: none), divergence or num_steps.

  Returns (record, TrainResult); the record holds the validation curve at the geometric evaluation
  steps, the per-window two-batch noise sums and steps/examples to target.
  """
  name = f"b{batch_size}_lr{lr:.4g}" if target else "pilot"
  cfg = run_config(study.config, batch_size, lr, num_steps, target)
  run_dir = studies.run_dir(cfg, study.workdir, "runs", name)
  steps = eval_steps(study.config.eval_growth, num_steps)
  marks = {next(s for s in steps if s >= 4**k) for k in range(int(math.log(num_steps, 4)) + 1)}
  progress = train_lib.Hook(marks.__contains__, lambda step, params, record: study.log(
      f"    {name} step {step}: val {record['val_nll']:.4f}"))  # fit's own lines are left out
  hooks = [progress]
  if target:
    hooks.insert(0, train_lib.stop_below(target))
  task = dataclasses.replace(  # The learning rate as optimizer state: one compiled step for all.
      train_lib.lm_task(cfg, study.dataset, study.model), learning_rate=lambda s: lr * study.unit_lr(s),
      tx=optax.chain(study.unit_tx, optax.inject_hyperparams(optax.scale)(step_size=lr)))
  result = studies.completed(train_lib.fit(
      cfg, task, run_dir, evaluate=study.evaluate["val"], eval_at=set(steps).__contains__,
      log_at=set(steps).__contains__, hooks=hooks, on_divergence="stop",
      loss_bound=train_config.train_config(cfg).loss_bound(study.dataset.vocab_size),
      max_val_rise=DIVERGED_NATS,
      log=lambda line: None if line.startswith("step ") else study.log(line)))
  curve_steps, vals = (list(x) for x in zip(*result.val_curve))
  reached = result.stopped == "target reached"
  s = gn.steps_to_target(curve_steps, vals, target) if reached else None
  return {"batch_size": batch_size, "learning_rate": lr, "reached": reached,
          "status": "reached" if reached else result.stopped or "step cap",
          "steps_to_target": s, "examples_to_target": None if s is None else s * batch_size,
          "stopped_at_step": result.final_step, "final_val_nll": vals[-1],
          "curve": {"step": curve_steps, "val_nll": vals},
          "noise": gn.noise_windows(result.records, batch_size // cfg.grad_accum_steps, batch_size),
          "wall_time_s": result.train_time_s, "workdir": os.path.join("runs", name)}, result


# ----------------------------------------------------------------------------------------------
# The learning rate of each B, the target.
# ----------------------------------------------------------------------------------------------


def _rank(record: dict) -> tuple:
  """Best first: runs that reached the target by steps, then the others by their last validation loss."""
  if record["reached"]:
    return (0, record["steps_to_target"])
  return (1, record["final_val_nll"] if math.isfinite(record["final_val_nll"]) else math.inf)


def tune_learning_rate(study: Study, batch_size: int, target: float):
  """Runs one B at its rule learning rate, or searches powers of lr_tune_factor around it ('tune').

  The search tries k = 0, +1, -1 (lr = rule * factor^k), then, while the best k is at an edge of
  those tried, one more k beyond it (at most lr_max_extend more). A run stops once it has taken as
  many steps as the best run so far at this B: it cannot be faster. Returns (records, best result).
  """
  c = study.config
  runs = {}  # k -> (record, TrainResult)
  best_k = lambda: min(runs, key=lambda k: _rank(runs[k][0]))

  def run(k):
    best = runs[best_k()][0] if runs else {"reached": False}
    cap = min(c.num_steps, max(1, math.ceil(best["steps_to_target"]))) if best["reached"] else c.num_steps
    record, result = train_run(study, batch_size, rule_learning_rate(c, batch_size)
                               * c.lr_tune_factor**k, cap, target)
    runs[k] = ({**record, "lr_exponent": k}, result)
    outcome = (f"reached {target:.4f} at step {record['steps_to_target']:.1f}" if record["reached"]
               else f"{record['status']} at step {record['stopped_at_step']}")
    study.log(f"  B={batch_size:5d} lr {record['learning_rate']:.2e}: {outcome}, val "
              f"{record['final_val_nll']:.4f} [{record['wall_time_s']:.1f} s]")

  for k in ((0, 1, -1) if c.lr_rule == "tune" else (0,)):
    run(k)
  for _ in range(c.lr_max_extend if c.lr_rule == "tune" else 0):
    if best_k() not in (min(runs), max(runs)):
      break
    run(best_k() + (1 if best_k() == max(runs) else -1))
  records = [{**runs[k][0], "best_at_batch_size": k == best_k()} for k in sorted(runs)]
  return records, runs[best_k()][1]


def pilot_target(study: Study) -> dict:
  """The target loss from a pilot run at the smallest B and its rule learning rate (see the config)."""
  c = study.config
  b = min(c.batch_sizes)
  record, _ = train_run(study, b, rule_learning_rate(c, b), c.pilot_steps)
  target = gn.target_from_curve(record["curve"]["val_nll"], c.target_margin)
  study.log(f"pilot: B={b}, lr {record['learning_rate']:.2e}, {c.pilot_steps} steps: target {target:.4f}")
  return {"loss": target, "pilot": {k: record[k] for k in ("batch_size", "learning_rate", "curve")}}


# ----------------------------------------------------------------------------------------------
# Measurements at the trained points, the fit's notes, the sweep.
# ----------------------------------------------------------------------------------------------


def summarize_batch(study: Study, records: list[dict], result, key: jax.Array) -> dict:
  """One row of the sweep: the best run at this B and the measurements at its final parameters.

  B_simple is averaged (numerator and denominator separately) over all steps of the best run, and
  over the second half of them ('late'), where the loss is near the target.
  """
  best = next(r for r in records if r["best_at_batch_size"])
  final_train = study.evaluate["train"](result.state.params)
  row = {"batch_size": best["batch_size"], "best_learning_rate": best["learning_rate"],
         "learning_rates_tried": [r["learning_rate"] for r in records],
         **{k: best[k] for k in ("reached", "steps_to_target", "examples_to_target",
                                 "stopped_at_step", "final_val_nll")},
         "final_train_nll": final_train, "generalization_gap": best["final_val_nll"] - final_train}
  stop = best["steps_to_target"] or best["stopped_at_step"]
  for name, start in (("", 0.0), ("_late", stop / 2)):
    est = gn.pooled_noise_scale(best["noise"], start)
    row.update({f"b_simple{name}": est["b_simple"], f"g_sq{name}": est["g_sq"],
                f"trace_sigma{name}": est["trace_sigma"], f"noise_steps{name}": est["steps_averaged"]})
  s = study.config.sharpness
  return {**row, **sharpness_lib.sharpness_record(
      study.loss, train_lib.to_host(result.state.params), study.windows["train"].batch(0, s.batch)[:2],
      key, lanczos_steps=s.lanczos_steps, epsilon=s.epsilon, ascent_steps=s.ascent_steps)}


def variance_record(study: Study, params, key: jax.Array) -> dict:
  """`gradient_noise.variance_law_record` at `params` on fixed draws of training windows: separate
  per-example windows, and fresh_batches mini-batches for each B = 1, 2, 4, ..., max(batch_sizes)."""
  c, v = study.config, study.config.gradient_variance
  draw = lambda n, step: data_lib.train_batch(study.dataset.train_ids, c.seq_len, n, c.seed, step)
  sizes = [2**i for i in range(int(math.log2(max(c.batch_sizes))) + 1)]
  fresh = [tuple(x.reshape(v.fresh_batches, b, c.seq_len) for x in
                 draw(v.fresh_batches * b, _FRESH_BATCH_STEP + i)) for i, b in enumerate(sizes)]
  return gn.variance_law_record(study.loss, params, draw(v.num_examples, _PER_EXAMPLE_STEP), fresh,
                                v.num_batches, key, bootstrap=studies.fit_bootstrap(c), seed=c.seed)


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def fit_points(sweep: list[dict]) -> tuple[list[int], list[float]]:
  """(batch sizes, steps to target) of the rows of `sweep` that the trade-off fit takes: those that
  reached the target after at least one step."""
  rows = [r for r in sweep if r["reached"] and r["steps_to_target"] > 0]
  return [r["batch_size"] for r in rows], [r["steps_to_target"] for r in rows]


def fit_notes(sweep: list[dict], fit: dict | None) -> list[str]:
  """One line for each way the fit of S = S_min + E_min / B (`gradient_noise.tradeoff_record` of
  `fit_points(sweep)`, or None) falls short: rows that met the target at step 0, fewer than two
  points (no fit), exactly two (nothing tests the law), steps that do not fall as B grows, S_min or
  E_min at their bound 0 or not finite, B_crit outside the measured batch sizes. [] when none
  applies."""
  b, s = fit_points(sweep)
  notes = []
  at_start = [r["batch_size"] for r in sweep if r["reached"] and not r["steps_to_target"] > 0]
  if at_start:
    notes.append(f"B = {', '.join(map(str, at_start))} met the target at step 0 (a target above "
                 "the initial loss): left out of the fit")
  if fit is None or len(set(b)) < 2:
    return notes + [f"no trade-off fit: {len(set(b))} batch size(s) reached the target after "
                    "training (2 needed)"]
  if len(set(b)) == 2:
    notes.append(f"the trade-off fit has only 2 points (B = {b[0]}, {b[1]}) for its 2 parameters: "
                 "nothing tests the law")
  rising = [(b0, b1) for (b0, s0), (b1, s1) in zip(zip(b, s), zip(b[1:], s[1:])) if s1 >= s0]
  if rising:
    notes.append("steps to target do not fall from B = " + ", ".join(
        f"{b0} to {b1}" for b0, b1 in rising) + ": S = S_min + E_min / B cannot follow them")
  s_min, e_min, b_crit = fit["s_min"], fit["e_min"], fit["b_crit"]
  crit = f"{b_crit:.3g}" if _finite(b_crit) else "infinite"
  if not (_finite(s_min) and _finite(e_min)):
    notes.append(f"degenerate trade-off fit: S_min = {s_min}, E_min = {e_min}, B_crit = {b_crit}")
  elif e_min <= _AT_BOUND * min(bi * si for bi, si in zip(b, s)):
    notes.append(f"the fit's E_min = {e_min:.3g} is at its bound 0 (B_crit = {crit}): no "
                 "perfect-scaling regime in the measured batch sizes")
  elif s_min <= _AT_BOUND * min(s):
    notes.append(f"the fit's S_min = {s_min:.3g} is at its bound 0 (B_crit = {crit}): perfect "
                 "scaling (or better) over all measured batch sizes")
  elif not _finite(b_crit):
    notes.append(f"degenerate trade-off fit: B_crit = {b_crit} (S_min = {s_min:.3g}, E_min = "
                 f"{e_min:.3g})")
  elif not min(b) <= b_crit <= max(b):
    notes.append(f"B_crit = {b_crit:.3g} lies outside the measured batch sizes {min(b)}-{max(b)}: "
                 "an extrapolation of the fit")
  return notes


def summarize_seeds(results: dict, per_seed: list[dict] | None = None) -> dict:
  """A multi-seed aggregate with the trade-off S = S_min + E_min / B refitted on every (B, seed)
  point that reached its seed's target (the bootstrap resamples those points), in place of the mean
  of each seed's fitted S_min, E_min and B_crit. (The aggregate's `per_seed` lists suffice.)"""
  del per_seed
  n = results["n_seeds"]
  points = [r for r in seeds_lib.pooled(results["sweep"], "steps_to_target", n)
            if _finite(r["steps_to_target"]) and r["steps_to_target"] > 0]
  b, steps = [r["batch_size"] for r in points], [r["steps_to_target"] for r in points]
  fit = gn.tradeoff_record(b, steps, bootstrap=results["config"].get("fit_bootstrap", 0), seed=0)
  notes = fit_notes(results["sweep"], fit)  # The notes of each seed's own fit are in its results.
  if fit is not None:
    fit["points"] = (f"{len(points)} points: each batch size on each of {n} seeds that reached "
                     "its target (each seed's own pilot target)")
    if fit.get("note"):
      notes.append(f"trade-off fit: {fit['note']}")
  return {**results, "fit": fit, "notes": notes}


def run(config, workdir: str, log=print) -> dict:
  """The whole sweep on `config` (checked by `check`): trains (or reuses) every run, measures, fits;
  the results (see the module docstring)."""
  start = time.time()
  dataset = studies.load_dataset(config, workdir)
  study = make_study(config, dataset, workdir, log)
  log(f"data: {dataset.description}; vocabulary {dataset.vocab_size}; {jax.device_count()} devices "
      f"in {jax.process_count()} process(es), mesh {config.mesh}")
  target = ({"loss": float(config.target_loss), "pilot": None} if config.target_loss
            else pilot_target(study))
  key = jax.random.PRNGKey(config.seed)
  runs, sweep, variance = [], [], None
  for b in config.batch_sizes:
    records, result = tune_learning_rate(study, b, target["loss"])
    runs += records
    sweep.append(summarize_batch(study, records, result, jax.random.fold_in(key, b)))
    if b == config.gradient_variance.checkpoint_batch:
      variance = variance_record(study, train_lib.to_host(result.state.params),
                                 jax.random.fold_in(key, 0))
      variance["checkpoint"] = {k: sweep[-1][k] for k in ("batch_size", "best_learning_rate",
                                                          "stopped_at_step", "final_val_nll")}
      log(f"gradient variance at the best run of B={b}: log-log slope {variance['slope']:.3f}")
  b, s = fit_points(sweep)
  fit = gn.tradeoff_record(b, s, bootstrap=studies.fit_bootstrap(config), seed=config.seed)
  median = lambda k: float(np.median([r[k] for r in sweep if r[k]])) if any(r[k] for r in sweep) else None
  notes = fit_notes(sweep, fit)
  for what, record in (("trade-off fit", fit), ("gradient-variance slope", variance)):
    if record and record.get("note"):
      notes.append(f"{what}: {record['note']}")
  if median("b_simple") is None:
    notes.append("no B_simple: no best run measured a positive |G|^2")
  for note in notes:
    log(f"note: {note}")
  m = study.model.config
  refs = {k: evaluation.reference_nlls(dataset, w) for k, w in study.windows.items()}
  return {
      "experiment": "batch_size", "data": dataset.description,
      "model": {"params": sum(x.size for x in jax.tree_util.tree_leaves(result.state.params)),
                "description": (f"{m.num_layers}-layer Transformer, d_model {m.d_model}, "
                                f"{m.num_heads} heads, d_ff {m.d_ff}, context {config.seq_len}")},
      "evaluation": {"split": "validation", **study.windows["val"].describe()},
      "references": refs,
      "floor": {k: r["floor"] for k, r in refs.items()} if dataset.source is not None else None,
      "target": target, "sweep": sweep, "fit": fit,
      "regimes": gn.doubling_speedups(b, s, fit and fit["b_crit"]),
      "noise_scale": {"b_simple": median("b_simple"), "b_simple_late": median("b_simple_late")},
      "gradient_variance": variance, "runs": runs,
      "runs_total": len(runs) + (1 if target["pilot"] else 0),
      "examples_total": int(sum(r["stopped_at_step"] * r["batch_size"] for r in runs)
                            + (config.pilot_steps * min(config.batch_sizes) if target["pilot"] else 0)),
      "notes": notes,
      "wall_time_s": time.time() - start, "config": json.loads(config.to_json_best_effort()),
  }
