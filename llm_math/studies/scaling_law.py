"""The two-variable scaling law L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022,
approach 3), measured on a grid of model sizes x training budgets, and the compute-optimal N*(C),
D*(C) it implies for C = 6 N D.

Grid. Sizes are config.model_sizes ('32x1,48x2', d_model x layers; `perplexity.size_config`), budgets
config.budgets (training steps, '500,1000,2000', increasing; config.num_steps is not read). Every run
trains the config's recipe with the 'wsd' schedule (warmup, constant, then a linear decay over the
last decay_fraction of its steps), so the budgets of one size share one trunk:

  models/d<D>_L<L>/trunk       the run of the largest budget S_max;
  models/d<D>_L<L>/steps_<S>   a branch per smaller budget S: the trunk's state at p = stable_steps
                               (where the decay of a run of S steps starts), trained on to S.

Until its decay starts, a WSD run is the same whatever its num_steps (batches are a pure function of
(seed, step); the learning rate before the decay does not depend on num_steps), so a branch is the
run of S steps from scratch, for the cost of its cool-down (tests check it to 1e-5 nats).

Trunk checkpoints. The trunk saves every g steps, g = the gcd of the branch points (its last step is
saved anyway), and keeps every checkpoint it saves (keep_checkpoints = S_max, more than it can ever
write), so every branch point stays on disk whatever saves an interruption adds. The 'log'
checkpoint_schedule would keep them as well, in snapshots/, but saves each of those steps twice
(rolling and snapshot) and adds the log-spaced steps below g.

Branches. Before it first trains, a branch gets a copy of the trunk's checkpoint p
(`checkpoint.copy_step`: copied under a temporary name, renamed into its checkpoints/ once whole); a
branch that has checkpoints of its own resumes from them. Its config is the trunk's with num_steps =
S, so `train.fit` restores step p and trains the cool-down p..S. A trunk without a checkpoint at p
(the budgets changed after it trained) leaves the branch to train from step 0: the same run, at full
cost. A trunk that has started to decay towards another largest budget is a one-line error.

Records, one per (size, budget): parameters N (all of them, embeddings included), training tokens
D = steps x batch_size x seq_len, C = 6 N D, the final validation NLL (nats/token) and bits/char on
the validation windows every run shares, the steps this run trained (a branch: its cool-down) and its
wall time. Then `scaling_laws.fit_chinchilla` (config.fit_bootstrap resamples, seed config.seed) and
`compute_optimal` over a log grid of C spanning the runs; a fit that cannot be made is a note.
"""

import json
import math
import os

import numpy as np

from llm_math import checkpoint
from llm_math import evaluation
from llm_math import files
from llm_math import optimizer as optimizer_lib
from llm_math import studies
from llm_math import train as train_lib
from llm_math import train_config
from llm_math.analysis import scaling_laws
from llm_math.errors import UsageError
from llm_math.studies import perplexity
from llm_math.studies import seeds as seeds_lib

# Fields that choose the grid and the fit, not how one run trains: a run's directory ignores them,
# so the grid may grow around the runs it has.
GRID_FIELDS = frozenset({"model_sizes", "budgets", "fit_bootstrap"})
# Hoffmann et al. 2022, Table 2: N* ~ C^a, D* ~ C^b. Approaches 1 and 2 (training curves, IsoFLOP
# profiles) give a = 0.50 and 0.49; approach 3 (the parametric fit this study makes) a = 0.46.
CHINCHILLA_REFERENCE = {
    "a": 0.5, "b": 0.5,
    "source": "Hoffmann et al. 2022, approaches 1 and 2 (a = 0.50 / 0.49, b = 0.50 / 0.51)",
    "approach_3": {"a": 0.46, "b": 0.54}}
FLOPS_GRID_POINTS = 25  # C values of compute_optimal, log-spaced over the measured C.


def parse_budgets(text) -> list[int]:
  """config.budgets '500,1000,2000' -> [500, 1000, 2000]: training steps, increasing, > 0."""
  items = [s.strip() for s in str(text).split(",") if s.strip()]
  budgets = [int(s) for s in items if s.isdigit()]
  if not items or len(budgets) != len(items) or budgets[0] < 1 or any(
      b <= a for a, b in zip(budgets, budgets[1:])):
    raise UsageError(f"--config.budgets={text!r}: expected increasing positive step counts such as "
                     "'500,1000,2000'")
  return budgets


def sizes(config) -> list:
  """[(d_model, layers)] of config.model_sizes, or [None] (the config's model) when it is ''."""
  return perplexity.parse_model_sizes(config.model_sizes) or [None]


def budget_config(config, steps: int):
  """The config of one run of `steps` steps: `config` with num_steps = steps, nothing else."""
  c = config.copy_and_resolve_references()
  c.num_steps = steps
  return c


def branch_point(config, steps: int) -> int:
  """The step where the decay of a WSD run of `steps` steps starts: where its branch leaves the
  trunk."""
  return optimizer_lib.stable_steps(train_config.train_config(budget_config(config, steps)))


def trunk_config(config, budgets: list[int]):
  """The trunk's config: the largest budget, a checkpoint at every branch point (every gcd of the
  points), all of them kept (see the module docstring)."""
  points = [p for p in (branch_point(config, s) for s in budgets[:-1]) if p > 0]
  c = budget_config(config, budgets[-1])
  c.checkpoint_every = math.gcd(*points) if points else budgets[-1]
  c.keep_checkpoints = budgets[-1]
  return c


def check(config):
  """The study's fields beyond `train.check_config`; a one-line UsageError naming the field
  otherwise: model sizes, budgets, fit_bootstrap, the 'wsd' schedule, and every budget's run (its
  decay starts after the warmup ends, and no later than the trunk's)."""
  perplexity.parse_model_sizes(config.model_sizes)
  budgets = parse_budgets(config.budgets)
  studies.fit_bootstrap(config)
  if config.schedule != "wsd":
    raise UsageError(f"--config.schedule={config.schedule!r}: the scaling-law study branches its "
                     "budgets off one trunk, which needs 'wsd'")
  for steps in budgets:
    try:
      train_config.train_config(budget_config(config, steps))
    except UsageError as e:
      raise UsageError(f"--config.budgets={config.budgets!r}: the run of {steps} steps: {e}") from None
  trunk_point = branch_point(config, budgets[-1])
  for steps in budgets[:-1]:
    if branch_point(config, steps) > trunk_point:
      raise UsageError(f"--config.budgets={config.budgets!r}: the decay of {steps} steps starts at "
                       f"step {branch_point(config, steps)}, after the trunk's ({trunk_point})")


def check_trunk(trunk_dir: str, config):
  """A one-line UsageError when the trunk in `trunk_dir` was trained towards another largest budget
  past the step where either schedule starts to decay (resuming it would not be a WSD run)."""
  path = files.path(trunk_dir) / "config.json"
  if not path.exists():
    return
  saved = files.read_json(path)
  if saved.get("num_steps", config.num_steps) == config.num_steps:
    return
  steps = checkpoint.saved_steps(trunk_dir, (checkpoint.ROLLING,))
  limit = min(branch_point(config, config.num_steps), branch_point(config, saved["num_steps"]))
  if steps and steps[-1] > limit:
    raise UsageError(
        f"{trunk_dir} trained towards {saved['num_steps']} steps and is at step {steps[-1]}, past "
        f"where its decay or that of {config.num_steps} steps starts ({limit}); keep the largest "
        f"budget {saved['num_steps']} or use a new --workdir")


BRANCH_FILE = "branch.json"  # In a branch's directory: {"trunk": path, "step": its start}.


def seed_branch(trunk_dir: str, branch_dir: str, point: int, log=print) -> int:
  """Gives the branch in `branch_dir` its start and returns that step: `point`, with the trunk's
  checkpoint there copied in (`checkpoint.copy_step`, recorded in BRANCH_FILE), or 0 (the trunk has
  no checkpoint there, or point is 0: the branch trains from scratch). A branch with checkpoints of
  its own resumes from them, at the start BRANCH_FILE records (0 without it)."""
  record = files.path(branch_dir) / BRANCH_FILE
  has_checkpoints = bool(checkpoint.saved_steps(branch_dir, (checkpoint.ROLLING,)))
  _sync(f"{branch_dir} looked at")  # Every process decides before process 0 copies anything.
  if has_checkpoints:
    return files.read_json(record)["step"] if record.exists() else 0
  if point == 0 or point not in checkpoint.saved_steps(trunk_dir, (checkpoint.ROLLING,)):
    if point:
      log(f"  {trunk_dir} has no checkpoint at step {point}: this branch trains from step 0")
    return 0
  if studies.is_primary():
    files.write_json(record, {"trunk": str(trunk_dir), "step": point})
  checkpoint.copy_step(trunk_dir, point, branch_dir)
  return point


def _sync(name: str):
  """With several processes, waits until every one reaches this point."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def train_run(config, dataset, windows, run_dir: str, start: int) -> dict:
  """Trains (or reuses) the run of `config` in `run_dir`, which starts at step `start`: its final
  validation NLL, parameters, the steps trained in this directory, wall time and tokens/s."""
  result = studies.completed(train_lib.train(config, dataset, run_dir, windows=windows,
                                             log=lambda _: None))
  return {"val_nll": result.val_curve[-1][1], "params": result.params,
          "steps_trained": result.final_step - start, "wall_time_s": result.train_time_s,
          "tokens_per_s": result.tokens_per_second}


def tokenizer_name(config, dataset) -> str:
  """How records name the tokenizer: 'synthetic' for the synthetic source, else the config's."""
  if dataset.source is not None:
    return "synthetic"
  return perplexity.tokenizer_name(config.tokenizer, config.vocab_size)


def train_size(config, dataset, windows, size, budgets: list[int], workdir: str,
               log=print) -> list[dict]:
  """The records of one model size, in budget order: a branch per smaller budget, then the trunk
  (the largest budget), which trains first."""
  scored = perplexity.scored_counts(dataset, windows)
  cfg = perplexity.size_config(config, size)
  name = f"d{cfg.model.d_model}_L{cfg.model.num_layers}"
  trunk_cfg = trunk_config(cfg, budgets)
  check_trunk(os.path.join(str(workdir), "models", name, "trunk"), trunk_cfg)
  trunk_dir = studies.run_dir(trunk_cfg, workdir, "models", name, "trunk", ignored=GRID_FIELDS)
  log(f"--- {name}: trunk of {budgets[-1]} steps, checkpoints every {trunk_cfg.checkpoint_every}")
  runs = {budgets[-1]: {**train_run(trunk_cfg, dataset, windows, trunk_dir, 0), "run": "trunk",
                        "run_dir": "trunk", "start": 0}}
  for steps in budgets[:-1]:
    branch_cfg = budget_config(trunk_cfg, steps)
    branch_dir = studies.run_dir(branch_cfg, workdir, "models", name, f"steps_{steps}",
                                 ignored=GRID_FIELDS)
    start = seed_branch(trunk_dir, branch_dir, branch_point(trunk_cfg, steps), log)
    runs[steps] = {**train_run(branch_cfg, dataset, windows, branch_dir, start),
                   "run": "branch" if start else "scratch", "run_dir": f"steps_{steps}",
                   "start": start}
  records = []
  for steps in budgets:
    r = runs[steps]
    tokens = steps * cfg.batch_size * cfg.seq_len
    records.append(perplexity.record(
        f"{name} {steps} steps", "model", r["val_nll"], scored, tokenizer_name(config, dataset), size=name, d_model=cfg.model.d_model,
        num_layers=cfg.model.num_layers, params=r["params"], steps=steps, tokens=tokens,
        flops=6.0 * r["params"] * tokens, run=r["run"],
        run_dir=os.path.join("models", name, r["run_dir"]),
        branched_at=r["start"] if r["run"] == "branch" else None,
        steps_trained=r["steps_trained"], wall_time_s=r["wall_time_s"],
        tokens_per_s=r["tokens_per_s"]))
    log(f"  {steps:6d} steps ({r['run']}, {r['steps_trained']} trained here): val nll "
        f"{r['val_nll']:.4f} nats, {records[-1]['bits_per_char']:.4f} bits/char, "
        f"{r['wall_time_s']:.1f} s")
  return records


def fit_law(records: list[dict], bootstrap: int, seed: int) -> tuple[dict, dict]:
  """(fit, compute_optimal) of the records: `scaling_laws.fit_chinchilla` on (params, tokens,
  val_nll_nats), and `compute_optimal` on FLOPS_GRID_POINTS values of C log-spaced over the
  records' 6ND. The fit keeps no bootstrap samples (compute_optimal has used them); a fit that
  cannot be made has None values and a note."""
  n = [r["params"] for r in records]
  d = [r["tokens"] for r in records]
  loss = [r["val_nll_nats"] for r in records]
  try:
    fit = scaling_laws.fit_chinchilla(n, d, loss, bootstrap=bootstrap, seed=seed)
  except ValueError as e:
    fit = {**dict.fromkeys(scaling_laws.CHINCHILLA_PARAMS), "huber_loss": None,
           "rms_log_residual": None, "num_points": len(n), "ci95": None, "bootstrap_failures": 0,
           "bootstrap_samples": None, "note": f"no fit: {e}"}
  flops = [r["flops"] for r in records]
  grid = (np.geomspace(min(flops), max(flops), FLOPS_GRID_POINTS) if flops
          else np.array([1.0]))
  optimal = scaling_laws.compute_optimal(fit, grid)
  samples = fit.pop("bootstrap_samples", None)
  fit["bootstrap_samples_used"] = len(next(iter(samples.values()))) if samples else 0
  return fit, optimal


def coverage_note(records: list[dict], optimal: dict) -> str | None:
  """A note when N*(C) or D*(C) leaves the measured N or D range at some C of `optimal`: there the
  allocation extrapolates the fitted law."""
  if optimal.get("n_opt") is None:
    return None
  n = [r["params"] for r in records]
  d = [r["tokens"] for r in records]
  outside = [(n_opt, d_opt) for n_opt, d_opt in zip(optimal["n_opt"], optimal["d_opt"])
             if not (min(n) <= n_opt <= max(n) and min(d) <= d_opt <= max(d))]
  if not outside:
    return None
  return (f"N*(C) or D*(C) leaves the measured grid (N {min(n):,}-{max(n):,}, D {min(d):,}-"
          f"{max(d):,} tokens) at {len(outside)} of {len(optimal['n_opt'])} values of C: there the "
          "allocation extrapolates the fitted law")


def fit_notes(records: list[dict], fit: dict, optimal: dict) -> list[str]:
  """The notes on a fit, one line each (compute_optimal repeats the fit's), and `coverage_note`."""
  notes = list(dict.fromkeys(part for note in (fit.get("note"), optimal.get("note")) if note
                             for part in note.split("; ")))
  return notes + [n for n in [coverage_note(records, optimal)] if n]


def summarize_seeds(results: dict, per_seed: list[dict] | None = None) -> dict:
  """A multi-seed aggregate with the law refitted on every (N, D, seed) point (the bootstrap
  resamples those points), in place of the mean of each seed's fitted parameters, which is no fit
  of anything. (The aggregate's `per_seed` lists suffice.)"""
  del per_seed
  n = results["n_seeds"]
  pooled = seeds_lib.pooled(results["records"], "val_nll_nats", n)
  fit, optimal = fit_law(pooled, results["config"].get("fit_bootstrap", 0), seed=0)
  fit["points"] = f"{len(pooled)} points: each (N, D) run on each of {n} seeds"
  notes = fit_notes(results["records"], fit, optimal)
  notes += [note for note in results.get("notes") or [] if "trained from step 0" in note]
  return {**results, "fit": fit, "compute_optimal": optimal, "notes": notes}


def run(config, workdir: str, log=print) -> dict:
  """Trains (or reuses) the grid's runs and fits the law; the results (see the module docstring)."""
  check(config)
  budgets = parse_budgets(config.budgets)
  dataset = studies.load_dataset(config, workdir)
  windows = evaluation.validation_windows(config, dataset.val_ids)
  grid = sizes(config)
  log(f"data: {dataset.description}; {len(grid)} sizes x {len(budgets)} budgets {budgets} steps "
      f"of {config.batch_size} x {config.seq_len} tokens")
  records = []
  for size in grid:
    records += train_size(config, dataset, windows, size, budgets, workdir, log)
  fit, optimal = fit_law(records, config.fit_bootstrap, config.seed)
  log(f"fit: E {_g(fit['E'])}, A {_g(fit['A'])}, alpha {_g(fit['alpha'])}, B {_g(fit['B'])}, "
      f"beta {_g(fit['beta'])}; N* ~ C^{_g(optimal['a'])}, D* ~ C^{_g(optimal['b'])}")
  scored = perplexity.scored_counts(dataset, windows)
  tc = train_config.train_config(config)
  # One line each; compute_optimal repeats the fit's notes.
  notes = fit_notes(records, fit, optimal)
  notes += [f"{r['name']}: no trunk checkpoint at its branch point, trained from step 0"
            for r in records if r["run"] == "scratch"]
  return {"experiment": "scaling_law", "data": dataset.description,
          "evaluation": {"split": "validation", **windows.describe(), "chars_scored": scored.chars,
                         "bytes_scored": scored.bytes,
                         "seq_len": tc.seq_len, "stride": tc.eval_stride or tc.seq_len,
                         "vocab_size": dataset.vocab_size},
          "references": evaluation.reference_nlls(dataset, windows),
          "budgets": budgets, "tokens_per_step": tc.batch_size * tc.seq_len,
          "records": records, "fit": fit, "compute_optimal": optimal,
          "chinchilla_reference": CHINCHILLA_REFERENCE, "notes": notes,
          "config": json.loads(config.to_json_best_effort())}


def _g(value) -> str:
  return "-" if value is None else f"{value:.3g}"
