"""Spectra of attention over training, entropy at a high learning rate, rank collapse with depth.

An attention matrix A = softmax(Q K^T / sqrt(d_k)) is row-stochastic: a Markov chain on positions
with spectral radius 1. The study trains three versions of one model on the same data (RUNS) and,
at `spectra.track_steps`, analyses every layer and head on a fixed batch of validation windows
(`llm_math.probes`, `llm_math.analysis.spectra`):

  causal          next-token prediction, the default learning rate;
  causal_high_lr  the same at `high_lr_factor` x the learning rate, `high_lr_warmup_steps` warmup;
  bidirectional   `model.causal=False`. Trained on next-token prediction it would cheat (position t
                  attends to t + 1, which is its target), so it is trained as a masked LM instead
                  (`llm_math.masked_lm`): each position is replaced by a [MASK] token (id V) with
                  probability `mask_rate` and the loss is the NLL of the original tokens at the
                  masked positions only.

Measured per layer and head: eigenvalues (causal A is lower-triangular, so its eigenvalues are
exactly its diagonal A_tt: det(A - lambda I) = prod_t (A_tt - lambda); A_00 = 1), the spectral gap
1 - |lambda_2|, the stationary distribution (causal: e_0, a sink built into the mask), singular
values and effective rank, row entropy, sink mass (mean weight on position 0), and
sigma = ||W_Q W_K^T||_2 / sqrt(d_k) with the entropy lower bound of Zhai et al. (2023) beside the
measured entropy. Rank collapse (Dong et al. 2021): deep models of four architectures
(ARCHITECTURES: pure attention; attention + skip; attention + MLP; the full pre-LN block; one shared
initial draw) fed uniformly random tokens, the relative residual ||X - 1 x^T|| / ||X|| of every
layer's residual stream, at initialization and after a short training run.

Each model trains through `llm_math.train.fit` in its own directory, models/<run>/ or
models/deep/<architecture>/ (metrics.jsonl, checkpoints/), analysed by a hook: a tracked run's
scalars go to its metrics.jsonl, its window-0 arrays to spectra/step_NNNNNN.npz. So the study
resumes after preemption (SIGTERM or Ctrl-C saves a checkpoint; rerun the same command) without
recomputing earlier snapshots, and a rerun with another config is a one-line error. A tracked run
also keeps its whole state at log-spaced steps 0, 1, 2, 4, ... (`checkpoint_schedule='log'`) in
models/<run>/snapshots/; once it has trained (or is reused), every one of these checkpoints is
analysed on the same windows (`dynamics`): per layer entropy, effective rank, spectral gap and sink
mass over training. Besides the runs, `run` writes spectra.npz to the workdir (per run and
snapshot: eigenvalues, singular values, stationary distributions of window 0; the final
attention), which the figures (`llm_math.figures.attention_spectra`) read next to results.json.
"""

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from llm_math import checkpoint
from llm_math import data as data_lib
from llm_math import evaluation
from llm_math import files
from llm_math import masked_lm
from llm_math import model as model_lib
from llm_math import probes
from llm_math import sharding
from llm_math import studies
from llm_math import train
from llm_math import train_config
from llm_math.analysis import intervals
from llm_math.analysis import spectra
from llm_math.errors import UsageError

RUNS = ("causal", "causal_high_lr", "bidirectional")
# Per-layer statistics followed over training, at every log-spaced checkpoint (`dynamics`).
DYNAMICS = ("mean_normalized_row_entropy", "effective_rank", "spectral_gap", "sink_mass")
ARCHITECTURES = {
    "pure attention": dict(residual=False, mlp=False, layernorm=False),
    "attention + skip": dict(residual=True, mlp=False, layernorm=False),
    "attention + MLP": dict(residual=False, mlp=True, layernorm=False),
    "full block": dict(residual=True, mlp=True, layernorm=True),
}


def check(config):
  """UsageError for settings this study cannot run with (beyond `train.check_config`)."""
  sp, deep = config.spectra, config.deep
  steps = list(sp.track_steps)
  if (not steps or any(not isinstance(s, int) for s in steps) or steps != sorted(set(steps))
      or steps[0] != 0 or steps[-1] != config.num_steps):
    raise UsageError(f"--config.spectra.track_steps={tuple(steps)}: expected increasing integer "
                     f"steps from 0 to num_steps={config.num_steps}, e.g. (0, 100, "
                     f"{config.num_steps})")
  if config.seq_len < 2:
    raise UsageError(f"--config.seq_len={config.seq_len}: attention spectra need seq_len >= 2")
  for name, value in (("spectra.analysis_windows", sp.analysis_windows),
                      ("spectra.eval_windows", sp.eval_windows),
                      ("deep.num_layers", deep.num_layers), ("deep.batch_size", deep.batch_size),
                      ("deep.random_inputs", deep.random_inputs)):
    if value < 1:
      raise UsageError(f"--config.{name}={value}: expected a positive integer")
  dp = sharding.data_parallel_size(*sharding.from_config(config))
  if deep.batch_size % dp:
    raise UsageError(f"--config.deep.batch_size={deep.batch_size}: expected a multiple of the {dp} "
                     f"data-parallel devices of --config.mesh={config.mesh!r}")
  if deep.num_steps < 0 or not 0 < deep.init_std < math.inf:
    raise UsageError(f"--config.deep.num_steps={deep.num_steps} / init_std={deep.init_std}: "
                     "expected steps >= 0 and a positive init_std")
  if not 0.0 < sp.mask_rate < 1.0:
    raise UsageError(f"--config.spectra.mask_rate={sp.mask_rate}: expected a fraction in (0, 1)")
  if sp.high_lr_factor <= 0 or sp.high_lr_warmup_steps < 0:
    raise UsageError(f"--config.spectra.high_lr_factor={sp.high_lr_factor} / high_lr_warmup_steps="
                     f"{sp.high_lr_warmup_steps}: expected a positive factor and warmup >= 0")


def run_config(config, name: str):
  """The training config of one run: a name of RUNS, or an architecture of ARCHITECTURES (a deep
  causal model of the rank-collapse study)."""
  c = config.copy_and_resolve_references()
  if name in ARCHITECTURES:
    with c.unlocked():  # The switches are ModelConfig fields the model block may lack.
      c.model.update(num_layers=c.deep.num_layers, init_std=c.deep.init_std, causal=True,
                     **ARCHITECTURES[name])
    c.update(num_steps=c.deep.num_steps, batch_size=c.deep.batch_size,
             warmup_steps=min(c.warmup_steps, c.deep.num_steps // 2),
             checkpoint_schedule="rolling")  # Profiled at init and at the end: no dynamics.
    return c
  c.model.causal = name != "bidirectional"
  if name == "bidirectional":  # V + 1 tokens (with [MASK]) seldom divide the mesh: not split.
    c.logical_axis_rules = [[axis, None if axis == "vocab" else mesh_axes]
                            for axis, mesh_axes in c.logical_axis_rules]
  if name == "causal_high_lr":
    c.learning_rate *= c.spectra.high_lr_factor
    c.min_learning_rate *= c.spectra.high_lr_factor
    c.warmup_steps = c.spectra.high_lr_warmup_steps
  return c


def _analysis_hook(analyse):
  """`analyse(step, host_params) -> record` as the function of a `train.Hook` (fit calls hooks only
  on finite parameters: one with a non-finite entry ends the run as "diverged" first)."""
  return lambda step, params, record: analyse(step, train.to_host(params))


def _fit(c, task: train.Task, model, windows, run_dir: str, eval_at, analyse_at, analyse, log):
  """Trains (or resumes) one run, scored on `windows` at eval_at steps and analysed by
  `analyse(step, params) -> record` on whole host parameters, on every process, at analyse_at.

  Returns (TrainResult, its metrics.jsonl records (the last of each step), diverged_at). Only a
  non-finite loss, validation NLL (fit's loss_bound, infinite here) or parameter (fit checks
  them before its hooks) stops a run, as "diverged": a high learning rate's outcome, not an
  error. An interrupted run raises studies.Interrupted; its state is saved and the same command
  resumes it.
  """
  result = studies.completed(train.fit(
      c, task, run_dir, evaluate=evaluation.evaluator(c, windows, model.apply), eval_at=eval_at,
      hooks=[train.Hook(analyse_at, _analysis_hook(analyse))], loss_bound=math.inf,
      on_divergence="stop", log=log))
  records = sorted({r["step"]: r for r in result.records}.values(), key=lambda r: r["step"])
  return result, records, next((r["step"] for r in records if r.get("stop") == "diverged"), None)


def snapshot_path(run_dir: str, step: int):
  """The window-0 arrays of the hook's analysis at `step`: spectra/step_NNNNNN.npz, or
  snapshots/step_NNNNNN.npz where a run analysed before snapshots/ held the log-spaced checkpoints
  wrote them."""
  name = f"step_{step:06d}.npz"
  legacy = files.path(run_dir) / checkpoint.SNAPSHOTS / name
  return legacy if legacy.exists() else files.path(run_dir) / "spectra" / name


def dynamics(run_dir: str, mcfg, tokens_BxT: np.ndarray, log) -> dict | None:
  """DYNAMICS per layer (means over heads and the windows `tokens_BxT`) at every log-spaced
  checkpoint in run_dir/snapshots, analysed after training: {"steps": [S], stat: [S][L]}; None,
  with a one-line note, for a run without them (trained with checkpoint_schedule='rolling')."""
  steps = checkpoint.saved_steps(run_dir, directories=(checkpoint.SNAPSHOTS,))
  if not steps:
    log(f"no log-spaced checkpoints in {run_dir}/{checkpoint.SNAPSHOTS}: no dynamics")
    return None
  out = {"steps": steps, **{key: [] for key in DYNAMICS}}
  for step in steps:
    params, _ = checkpoint.load_params(run_dir, step, log=log)
    scalars, _ = probes.analyse_snapshot(params, mcfg, tokens_BxT)
    for key in DYNAMICS:
      out[key].append(np.mean(scalars[key], axis=1).tolist())
  h = np.asarray(out["mean_normalized_row_entropy"])
  log(f"dynamics at the log-spaced steps {steps} | normalized entropy per layer "
      f"{np.array2string(h[0], precision=3)} -> {np.array2string(h[-1], precision=3)}")
  return out


def tracked_run(config, dataset, name: str, windows, workdir: str, log) -> dict:
  """One of RUNS, trained and analysed at every step of spectra.track_steps: its results record."""
  c = run_config(config, name)
  masked = name == "bidirectional"
  mcfg = train_config.model_config(c, dataset.vocab_size + masked)  # + the [MASK] token
  model = model_lib.Transformer(mcfg)
  task = train.lm_task(c, dataset, model)
  if masked:
    mask_id, rate = dataset.vocab_size, c.spectra.mask_rate
    task = dataclasses.replace(task, batch=lambda step, rows: masked_lm.masked_lm_batch(
        dataset.train_ids, c.seq_len, c.batch_size, c.seed, step, mask_id, rate, rows))
    windows = masked_lm.masked_windows(windows, mask_id, rate, c.seed)
  tokens_BxT = windows.batch(0, min(c.spectra.analysis_windows, len(windows)))[0]
  run_dir = studies.run_dir(c, workdir, "models", name)
  tracked = lambda step: step in c.spectra.track_steps
  run_log = lambda line: log(f"{name}: {line}")

  def analyse(step, params):
    scalars, arrays = probes.analyse_snapshot(params, mcfg, tokens_BxT)
    if studies.is_primary():
      snapshot_path(run_dir, step).parent.mkdir(parents=True, exist_ok=True)
      files.write_npz(snapshot_path(run_dir, step), **arrays)
    h = np.asarray(scalars["mean_normalized_row_entropy"]).mean(axis=1)
    run_log(f"snapshot at step {step} | normalized entropy per layer "
            f"{np.array2string(h, precision=3)}")
    return {"spectra": scalars}

  result, records, diverged_at = _fit(c, task, model, windows, run_dir, tracked, tracked, analyse,
                                      run_log)
  return {
      "objective": "masked" if masked else "next_token", "causal": mcfg.causal,
      "params": result.params,
      "learning_rate": c.learning_rate, "min_learning_rate": c.min_learning_rate,
      "warmup_steps": c.warmup_steps, "num_steps": c.num_steps, "batch_size": c.batch_size,
      "snapshots": [{"step": r["step"], "val_nll": r["val_nll"], **r["spectra"]}
                    for r in records if "spectra" in r],
      "train_curve": {"step": [r["step"] for r in records if "loss" in r],
                      "loss": [r["loss"] for r in records if "loss" in r]},
      "diverged_at": diverged_at, "run_dir": os.path.join("models", name),
      "wall_time_s": result.train_time_s,
      "dynamics": dynamics(run_dir, mcfg, tokens_BxT, run_log),
  }


def rank_collapse_run(config, dataset, arch: str, windows, tokens_BxT, workdir: str, log) -> dict:
  """One architecture of the rank-collapse study: residual profiles at initialization (causal, and
  the same weights without the mask) and after deep.num_steps steps of next-token training."""
  c = run_config(config, arch)
  mcfg = train_config.model_config(c, dataset.vocab_size)
  model = model_lib.Transformer(mcfg)
  full = model_lib.Transformer(dataclasses.replace(mcfg, residual=True, mlp=True, layernorm=True))
  like = jax.eval_shape(train.lm_init(model, c.seq_len), jax.random.PRNGKey(0))
  task = dataclasses.replace(  # Every architecture cut from the full block's draw.
      train.lm_task(c, dataset, model),
      init=lambda rng: probes.restrict_params(train.lm_init(full, c.seq_len)(rng), like))

  def analyse(step, params):
    out = {"profile": probes.residual_profile(params, mcfg, tokens_BxT)}
    if step == 0:
      out["profile_no_mask"] = probes.residual_profile(
          params, dataclasses.replace(mcfg, causal=False), tokens_BxT)
      out["uniform_causal_reference"] = spectra.uniform_causal_reference(
          probes.embedding_output(params, mcfg, tokens_BxT), mcfg.num_layers)
    return out

  name = arch.replace(" + ", "_").replace(" ", "_")
  run_dir = studies.run_dir(c, workdir, "models", "deep", name)
  result, records, diverged_at = _fit(c, task, model, windows, run_dir, lambda step: False,
                                      lambda step: step == c.num_steps, analyse,
                                      lambda line: log(f"{arch}: {line}"))
  init, end = records[0], records[-1]
  trained = ({"step": end["step"], "val_nll": end["val_nll"], **end["profile"]}
             if c.num_steps and end["step"] == c.num_steps and "profile" in end else None)
  log(f"{arch}: relative residual at layer {mcfg.num_layers}: {init['profile']['fro'][-1]} at init"
      + (f", {trained['fro'][-1]} at step {trained['step']}" if trained else ""))
  return {"switches": ARCHITECTURES[arch], "params": result.params,
          "init": {"val_nll": init["val_nll"], **init["profile"]},
          "init_bidirectional": init["profile_no_mask"], "trained": trained,
          "diverged_at": diverged_at, "run_dir": os.path.join("models", "deep", name),
          "uniform_causal_reference": init["uniform_causal_reference"],
          "wall_time_s": result.train_time_s}


def rank_collapse(config, dataset, windows, workdir: str, log) -> dict:
  """The four ARCHITECTURES on deep.random_inputs sequences of uniformly random tokens."""
  c = run_config(config, "full block")
  tokens_BxT = np.random.default_rng([config.seed, 3]).integers(
      0, dataset.vocab_size, size=(c.deep.random_inputs, c.seq_len))
  arch = {name: rank_collapse_run(config, dataset, name, windows, tokens_BxT, workdir, log)
          for name in ARCHITECTURES}
  reference = [r.pop("uniform_causal_reference") for r in arch.values()][0]  # Shared embeddings.
  return {"num_layers": c.model.num_layers, "num_steps": c.num_steps, "batch_size": c.batch_size,
          "learning_rate": c.learning_rate, "warmup_steps": c.warmup_steps,
          "init_std": c.model.init_std,
          "inputs": f"{c.deep.random_inputs} sequences of {c.seq_len} uniformly random tokens",
          "uniform_causal_reference": reference, "architectures": arch}


def spectra_arrays(workdir: str, runs: dict) -> dict:
  """spectra.npz: per run, its snapshots' window-0 arrays stacked over steps; the last attention."""
  arrays = {}
  for name, run in runs.items():
    steps = [s["step"] for s in run["snapshots"]]
    snaps = [files.read_npz(snapshot_path(os.path.join(workdir, run["run_dir"]), step))
             for step in steps]
    for key in ("eigenvalues", "singular_values", "stationary_distribution"):
      arrays[f"{name}.{key}"] = np.stack([s[key] for s in snaps])
    arrays[f"{name}.attention_final"] = snaps[-1]["attention"]
    arrays[f"{name}.steps"] = np.asarray(steps)
  return arrays


def first_independent_windows(config, val_ids: np.ndarray) -> data_lib.EvalWindows:
  """The fixed windows every run of the study is scored on and analysed on: the first
  spectra.eval_windows windows of seq_len tokens of `val_ids` at stride seq_len (independent: each
  token scored once, with contexts 1..seq_len). Not `evaluation.validation_windows`, whose extent,
  stride and sampling come from eval_max_tokens, eval_stride and eval_sample_every."""
  return data_lib.eval_windows(val_ids[: config.spectra.eval_windows * config.seq_len + 1],
                               config.seq_len)


# The per-layer statistics (means over heads) a multi-seed aggregate gives intervals, first and last
# snapshot of every tracked run (`summarize_seeds`).
PER_LAYER_KEYS = ("mean_row_entropy", "mean_normalized_row_entropy", "spectral_gap",
                  "second_eigenvalue_modulus", "effective_rank", "sink_mass", "stationary_sink_mass",
                  "zhai_bound")


def summarize_seeds(results: dict, per_seed: list[dict]) -> dict:
  """A multi-seed aggregate with results["per_layer_seeds"] = {run: {"first" | "last": [per layer
  {stat: mean over seeds, stat_ci95: Student-t 95% interval}]}} of each seed's mean over heads at the
  run's first and last snapshot (PER_LAYER_KEYS, and the largest head's sigma, qk_norm), and the
  final validation NLL of each run with its interval."""
  out = {}
  for name in results["runs"]:
    out[name] = {}
    for which, index in (("first", 0), ("last", -1)):
      snaps = [r["runs"][name]["snapshots"][index] for r in per_seed]
      layers = []
      for l in range(len(snaps[0]["mean_row_entropy"])):
        row = {}
        for key, reduce in [(k, np.mean) for k in PER_LAYER_KEYS] + [("qk_norm", np.max)]:
          if snaps[0].get(key) is None:
            continue
          stat = intervals.mean_ci95([float(reduce(s[key][l])) for s in snaps])
          row[key], row[f"{key}_ci95"] = stat["mean"], stat["ci95"]
        layers.append(row)
      stat = intervals.mean_ci95([s["val_nll"] for s in snaps if s.get("val_nll") is not None])
      out[name][which] = {"layers": layers, "val_nll": stat["mean"], "val_nll_ci95": stat["ci95"],
                          "step": snaps[0]["step"]}
  return {**results, "per_layer_seeds": out}


def run(config, workdir: str, log=print) -> dict:
  """The three tracked runs and rank collapse, trained (or reused) and analysed; writes spectra.npz
  (on process 0) and returns the results (strict JSON: a non-finite number is None)."""
  start = time.time()
  check(config)
  dataset = studies.load_dataset(config, workdir)
  log(f"data: {dataset.description}; vocabulary {dataset.vocab_size}; "
      f"{len(dataset.train_ids):,} training / {len(dataset.val_ids):,} validation tokens")
  windows = first_independent_windows(config, dataset.val_ids)
  runs = {name: tracked_run(config, dataset, name, windows, workdir, log) for name in RUNS}
  n_analysis = min(config.spectra.analysis_windows, len(windows))
  results = {
      "experiment": "attention_spectra",
      "data": dataset.description,
      "entropy_rate_nats": dataset.source.entropy_rate() if dataset.source is not None else None,
      "protocol": {
          "analysis": (f"validation windows 0..{n_analysis - 1} (seq_len {config.seq_len}, stride "
                       f"seq_len); per-head statistics are means over these windows; spectra.npz "
                       "holds window 0"),
          "analysis_windows": n_analysis,
          "eval": (f"val_nll: mean NLL (nats) over {len(windows)} validation windows; next-token "
                   f"runs score every target (contexts 1..{config.seq_len}), the masked LM scores "
                   f"the masked positions (rate {config.spectra.mask_rate}, one fixed draw)"),
          "eval_windows": len(windows),
          "dynamics": (
              "per layer, the mean over heads of the normalized row entropy, effective rank, "
              "spectral gap and sink mass, on the analysis windows, from the log-spaced "
              "checkpoints in models/<name>/snapshots (steps 0, 1, 2, 4, ... below "
              f"checkpoint_every={config.checkpoint_every}, then every checkpoint_every), "
              "analysed after training"),
          "bidirectional_objective": (
              "masked LM: trained on next-token prediction a bidirectional model can attend to "
              "position t + 1, its own target, and learns to copy it"),
          **probes.DEFINITIONS,
      },
      "runs": runs,
      "rank_collapse": rank_collapse(config, dataset, windows, workdir, log),
      "config": json.loads(config.to_json_best_effort()),
  }
  results["wall_time_s"] = time.time() - start  # This command; resumed runs count their own time.
  if studies.is_primary():
    files.write_npz(files.path(workdir) / "spectra.npz", **spectra_arrays(workdir, runs))
    log(f"wrote spectra.npz to {workdir}")
  return files.finite_or_none(results)
