"""Training instabilities at small scale (Wortsman et al. 2023): learning-rate sweeps with and
without qk-layernorm and z-loss, attention-logit growth and its fix.

For every model size, learning rate, variant (VARIANTS) and seed: one run of the config's recipe in
runs/<size>/<variant>/lr<lr>_s<seed> (resumable; a diverged run stops early, an outcome). Each run's
final validation NLL gives the final-loss-vs-learning-rate curves and the learning-rate sensitivity
E_eta[min(L(eta), L0) - L*] (`llm_math.analysis.stability`), with a 95% interval over seeds; the
per-layer statistics logged during training (`llm_math.layer_stats`) give the max attention logit,
attention entropy and output log Z against the step.
"""

import json
import math
import time

import numpy as np

from llm_math import evaluation
from llm_math import model as model_lib
from llm_math import studies
from llm_math import train as train_lib
from llm_math import train_config
from llm_math.analysis import stability as stability_lib
from llm_math.errors import UsageError

VARIANTS = ("baseline", "qk_norm", "z_loss", "qk_norm+z_loss")


def sizes(config) -> list[tuple[int, int]]:
  """[(d_model, layers)] of config.stability.sizes ('32x2,64x2'), after checking the grid's sizes
  and variants (VARIANTS); a one-line error otherwise."""
  unknown = [v for v in config.stability.variants if v not in VARIANTS]
  if unknown:
    raise UsageError(f"--config.stability.variants: {unknown[0]!r} is not one of "
                     f"{', '.join(VARIANTS)}")
  try:
    out = [tuple(int(v) for v in s.split("x")) for s in config.stability.sizes.split(",")]
  except ValueError:
    out = []
  if not out or any(len(s) != 2 or s[0] % 16 or s[1] < 1 for s in out):
    raise UsageError(f"--config.stability.sizes={config.stability.sizes!r}: expected "
                     "'DxL,...' with d_model D a multiple of 16 and L >= 1 layers")
  return out


def run_config(config, size: tuple[int, int], variant: str, lr: float, seed: int):
  """The training config of one point of the grid."""
  c = config.copy_and_resolve_references()
  d, layers = size
  c.model.update(d_model=d, num_layers=layers, d_ff=4 * d, num_heads=d // 16,
                 qk_norm="qk_norm" in variant,
                 z_loss=config.stability.z_loss if "z_loss" in variant else 0.0)
  c.update(learning_rate=lr, min_learning_rate=lr / 10, seed=seed)
  return c


def curves(records: list[dict]) -> dict:
  """{step, loss, attn_logit_max (max over blocks), attn_entropy (mean over blocks), log_z_mean,
  output_logit_max} at the run's log steps."""
  logged = [r for r in records if "attn_entropy/block_0" in r]
  per_block = lambda r, name: [v for k, v in r.items() if k.startswith(name + "/block_")]
  return {"step": [r["step"] for r in logged], "loss": [r["loss"] for r in logged],
          "attn_logit_max": [max(per_block(r, "attn_logit_max")) for r in logged],
          "attn_entropy": [float(np.mean(per_block(r, "attn_entropy"))) for r in logged],
          "log_z_mean": [r["log_z_mean"] for r in logged],
          "output_logit_max": [r["output_logit_max"] for r in logged]}


def train_point(config, dataset, windows, workdir: str, size, variant: str, lr: float, seed: int,
                log) -> dict:
  """Trains (or reuses) one run; its final validation NLL (None when it diverged) and curves."""
  c = run_config(config, size, variant, lr, seed)
  task = train_lib.lm_task(c, dataset)
  name = f"{size[0]}x{size[1]}"
  run_dir = studies.run_dir(c, workdir, "runs", name, variant, f"lr{lr:g}_s{seed}",
                           ignored={"stability"})  # The grid may grow around a run.
  model = model_lib.Transformer(train_config.model_config(c, dataset.vocab_size))
  evaluate = evaluation.evaluator(c, windows, model.apply)
  result = studies.completed(train_lib.fit(c, task, run_dir, evaluate=evaluate, eval_at=lambda step: False,
                         loss_bound=train_config.train_config(c).loss_bound(dataset.vocab_size),
                         on_divergence="stop", log=lambda _: None))
  final = result.val_curve[-1][1] if result.val_curve and result.stopped != "diverged" else None
  final = final if final is not None and math.isfinite(final) else None
  log(f"{name} {variant:15s} lr {lr:<6g} seed {seed}: "
      + (f"val nll {final:.4f}" if final is not None else f"diverged at step {result.final_step}"))
  return {"size": name, "params": result.params, "variant": variant, "learning_rate": lr,
          "seed": seed, "final_val_nll": final, "diverged": final is None,
          "curves": curves(result.records)}


def run(config, workdir: str, log=print) -> dict:
  """Trains (or reuses) every run of the grid; the results (see the module docstring)."""
  start = time.time()
  dataset = studies.load_dataset(config, workdir)
  windows = evaluation.validation_windows(config, dataset.val_ids)
  grid = [(s, v, lr, seed) for s in sizes(config) for v in config.stability.variants
          for lr in config.stability.learning_rates for seed in config.stability.seeds]
  log(f"data: {dataset.description}; {len(grid)} runs of {config.num_steps} steps")
  runs = [train_point(config, dataset, windows, workdir, *point, log) for point in grid]
  refs = evaluation.reference_nlls(dataset, windows)
  results = {"experiment": "stability", "data": dataset.description,
             "evaluation": {"split": "validation", **windows.describe()}, "references": refs,
             "initial_loss": refs["uniform"], "summary": stability_lib.summarize(
                 runs, config.stability.learning_rates, config.stability.seeds,
                 config.stability.variants, refs["uniform"]),
             "runs": runs, "wall_time_s": time.time() - start,
             "config": json.loads(config.to_json_best_effort())}
  return results
