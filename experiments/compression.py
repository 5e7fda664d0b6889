r"""What a trained Transformer LM loses under compression: low rank, quantization, LoRA, distillation.

From one base model (trained here in WORKDIR/base, or the run in --init_workdir), scored on the
validation windows of its own run against `evaluation.reference_nlls` on the same tokens:

  svd      every Dense kernel W [in, out] replaced by its best rank-r approximation (Eckart-Young),
           r a fixed fraction of min(in, out) per matrix, or ranks chosen globally to keep a share of
           sum_i s_i^2: perplexity vs singular values kept and vs the r (in + out) factor storage;
  quant    symmetric absmax round-to-nearest int8 / int4 with one scale per tensor, per output channel
           or per group of g inputs ("dequantize on load"); bits/param counts the scales;
  lora     the base model fine-tuned on a second source with the same vocabulary: LoRA
           W + (alpha/r) a b on the attention query and value kernels at several ranks vs full
           fine-tuning vs no fine-tuning (vs the same architecture from scratch), same batches;
  distill  a smaller student trained on alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE per
           temperature T vs the same student (same init, batches, optimizer, steps) on CE alone,
           over several seeds; differences are paired by seed.

SVD and quantization are `svd_sweep` / `quant_sweep` (llm_math.analysis.compression) on the whole
parameters (`train.to_host`: the same numbers on every process). Every training run goes through
`train.fit` in its own directory: base/; lora/rank_R, lora/full, lora/scratch (LoRA params {"base":
frozen, "lora": factors}); distill/seed_S/T_t and distill/seed_S/scratch (params {"student",
"teacher": frozen}). The experiment resumes after preemption: rerun the same command, finished runs
are read back and an interrupted one continues from its checkpoint. A setting changed under an
existing run is a one-line error naming the run and the field, before any training.

  python -m experiments.compression --workdir=/tmp/compression          # synthetic, ~5 min on 2 cores
  python -m experiments.compression --workdir=/tmp/cmp --init_workdir=/tmp/llm_math_ppl
  python -m experiments.compression --workdir=/tmp/cmp_text \
      --data=text:../shared/data/english_pd.txt --tokenizer=byte --config.max_chars=2000000 \
      --config.lora.target_data=text:../shared/data/tinyshakespeare.txt

The LoRA transfer needs one vocabulary for both sources: by default the synthetic lagged-copy source
with lag 16 and Zipf exponent 1.0 -> lag 12 and Zipf 1.5 (V=32 both); with corpora, a byte-level
tokenizer (or a char tokenizer when both corpora have the same alphabet). Writes results.json (every
number with how it was measured, the headline numbers, the config), results.md and svd.png,
quant.png, lora.png, distill.png (redrawn by experiments.plot_compression) to --workdir.
"""

import dataclasses
import json
import os
import time

from absl import flags
import flax.linen as nn
import jax
import ml_collections

from experiments import common
from experiments.configs import compression as config_lib
from experiments import plot_compression
from llm_math import checkpoint
from llm_math import studies
from llm_math import data as data_lib
from llm_math import evaluation
from llm_math import flops as flops_lib
from llm_math import model as model_lib
from llm_math import train as train_lib
from llm_math import train_config
from llm_math.analysis import compression
from llm_math.analysis import distillation
from llm_math.analysis import lora as lora_lib
from llm_math.errors import UsageError

INIT_WORKDIR = flags.DEFINE_string(
    "init_workdir", None, "A finished training run (e.g. of experiments.perplexity) whose model to "
    "compress; default: train the config's model in WORKDIR/base.")

SCRATCH = "scratch (labels only)"


def _same_tokenizer(a, b) -> bool:
  return (a.kind, a.vocab_size, getattr(a, "chars", None), getattr(a, "model_proto", None)) == (
      b.kind, b.vocab_size, getattr(b, "chars", None), getattr(b, "model_proto", None))


def load_base(config):
  """(config, dataset, TrainedModel) of --init_workdir: that run's config (data, model, training,
  evaluation windows) with this experiment's blocks and eval_batch_size/mesh from `config`."""
  trained = checkpoint.load_trained(INIT_WORKDIR.value)
  for flag, field in ((common.DATA, "data"), (common.TOKENIZER, "tokenizer"),
                      (common.VOCAB_SIZE, "vocab_size"), (common.SEED, "seed")):
    if flag.value is not None and flag.value != trained.config.get(field):
      raise UsageError(f"--{field}={flag.value} disagrees with the model in --init_workdir="
                       f"{INIT_WORKDIR.value}, trained with {field}="
                       f"{trained.config.get(field)!r}; drop the flag")
  merged = ml_collections.ConfigDict(trained.config.to_dict())
  for field in config_lib.STUDY_FIELDS + ("eval_batch_size", "mesh"):
    merged[field] = config[field]
  dataset = studies.load_dataset(merged)
  if not _same_tokenizer(dataset.tokenizer, trained.tokenizer):
    raise UsageError(f"--init_workdir={INIT_WORKDIR.value}: the saved tokenizer differs from the "
                     f"one rebuilt from {merged.data}; cannot score the run's validation split")
  return merged, dataset, trained


def load_target(config, dataset: data_lib.Dataset) -> data_lib.Dataset:
  """The LoRA target: the same vocabulary as the base model's data, or a UsageError saying why not."""
  spec, tok = config.lora.target_data, dataset.tokenizer
  if spec == "synthetic":
    target = data_lib.load("synthetic", seed=config.seed + 1,
                           synthetic_config=config.lora.target_synthetic)
  elif tok.kind not in ("byte", "char"):
    raise UsageError(
        f"--config.lora.target_data={spec}: a corpus target needs a base model with a byte (or "
        f"char) tokenizer, so that both sources share one vocabulary; the base model's is "
        f"{tok.kind} ({config.data}); use --data=text:... --tokenizer=byte")
  else:
    try:
      target = data_lib.load(spec, tokenizer=tok.kind,
                             max_chars=config.lora.target_max_chars or None)
    except UsageError as e:
      raise UsageError(f"--config.lora.target_data: {e}") from None
  if target.vocab_size != dataset.vocab_size or not _same_tokenizer(target.tokenizer, tok):
    raise UsageError(
        f"--config.lora.target_data={spec}: vocabulary {target.vocab_size}, the base model's is "
        f"{dataset.vocab_size} (or its characters differ); LoRA transfer needs one vocabulary "
        "(--tokenizer=byte for corpora, --config.lora.target_synthetic.vocab_size for synthetic)")
  data_lib.check_fits(target, config.seq_len)
  return target


def frozen_init(model: nn.Module, seq_len: int, params):
  """rng -> `params` boxed with the model's logical axis names: a frozen part of a Task's params,
  sharded like a fresh model's."""
  abstract = jax.eval_shape(train_lib.lm_init(model, seq_len), jax.random.PRNGKey(0))
  return lambda rng: train_lib.boxed_like(abstract, params)


def fit(run: tuple, task: train_lib.Task, evaluate, log) -> train_lib.TrainResult:
  """train.fit of `task` in the run's (config, directory); exits (130) when interrupted, after
  saving: rerunning the command continues."""
  log(f"--- {run[1]}")
  result = train_lib.fit(run[0], task, run[1], evaluate=evaluate, log=log)
  studies.completed(result)
  return result


def record(name: str, result: train_lib.TrainResult, **fields) -> dict:
  return {"name": name, **fields, "curve": result.val_curve, "wall_time_s": result.train_time_s,
          **compression.nll_record(result.val_curve[-1][1])}


def lora_study(config, runs: dict, params, model: nn.Module, target, log) -> dict:
  """No FT vs LoRA at each rank vs full FT (vs scratch) on the target, on the same batches."""
  lc = config.lora
  windows = evaluation.validation_windows(config, target.val_ids)
  evaluate = evaluation.evaluator(config, windows, model.apply)
  merged = evaluation.evaluator(config, windows, model.apply,
                                select=lambda p: lora_lib.apply_lora(p["base"], p["lora"], lc.alpha))
  base_init = frozen_init(model, config.seq_len, params)
  no_ft = evaluate(params)
  records = [{"name": "no fine-tuning", "kind": "none", "rank": None, "trainable_params": 0,
              "curve": [(0, no_ft)], **compression.nll_record(no_ft)}]
  for rank in lc.ranks:
    run = runs["lora", f"rank_{rank}"]
    task = lora_lib.lora_task(train_lib.lm_task(run[0], target, model), base_init, params,
                              int(rank), lc.alpha, lc.targets)
    result = fit(run, task, merged, log)
    factors = result.state.params["lora"]
    records.append(record(f"LoRA r={rank}", result, kind="lora", rank=int(rank),
                          trainable_params=lora_lib.lora_param_count(factors),
                          adapted_params=lora_lib.adapted_param_count(factors),
                          adapted_matrices=len(lora_lib.factor_pairs(factors))))
  for kind, name in (("full", "full fine-tuning"), ("scratch", "scratch on target (same steps)")):
    if ("lora", kind) in runs:
      task = train_lib.lm_task(runs["lora", kind][0], target, model)
      task = dataclasses.replace(task, init=base_init) if kind == "full" else task
      result = fit(runs["lora", kind], task, evaluate, log)
      records.append(record(name, result, kind=kind, rank=None, trainable_params=result.params))
  full_nll = next(r["val_nll"] for r in records if r["kind"] == "full")
  for r in records:
    if r["kind"] == "lora":
      r["share_of_full_gain"] = lora_lib.share_of_gain(no_ft, full_nll, r["val_nll"])
  return {"target": target.description,
          "target_changes": plot_compression.target_changes(config.to_dict()),
          "targets": lc.targets, "alpha": lc.alpha, "num_steps": lc.num_steps,
          "params_total": flops_lib.count_params(params),
          "evaluation": describe(config, target, windows),
          "references": evaluation.reference_nlls(target, windows), "runs": records}


def distill_study(config, runs: dict, params, teacher: nn.Module, dataset, windows,
                  teacher_nll: float, log) -> dict:
  """Distilled vs scratch student, per seed: the same init, batches, optimizer and steps (the
  seed draws the student's initialization and the batch order)."""
  d, student_cfg = config.distill, config_lib.student_config(config)
  student = model_lib.Transformer(train_config.model_config(student_cfg, dataset.vocab_size))
  teacher_init = frozen_init(teacher, config.seq_len, params)
  evaluate = evaluation.evaluator(config, windows, student.apply)
  evaluate_student = evaluation.evaluator(config, windows, student.apply,
                                          select=lambda p: p["student"])
  records = []
  for seed in d.seeds:
    for t in list(d.temperatures) + [None]:
      run = runs["distill", f"seed_{seed}", "scratch" if t is None else f"T_{t:g}"]
      lm = train_lib.lm_task(run[0], dataset, student)
      if t is None:
        records.append(record(SCRATCH, fit(run, lm, evaluate, log), seed=int(seed), alpha=0.0,
                              temperature=1.0))
        continue
      task = distillation.distillation_task(lm, teacher_init, student.apply, teacher.apply, t,
                                            d.alpha)
      records.append(record(f"distilled, T={t:g}", fit(run, task, evaluate_student, log),
                            seed=int(seed), alpha=float(d.alpha), temperature=float(t)))
  return {"student_model": dict(student_cfg.model), "num_steps": d.num_steps,
          "student_params": flops_lib.count_params(jax.eval_shape(
              train_lib.lm_init(student, config.seq_len), jax.random.PRNGKey(0))),
          "teacher_params": flops_lib.count_params(params), "alpha": float(d.alpha),
          "temperatures": [float(t) for t in d.temperatures], "seeds": [int(x) for x in d.seeds],
          "teacher": compression.nll_record(teacher_nll), "runs": records,
          "summary": distillation.paired_summary(records, SCRATCH)}


def describe(config, dataset: data_lib.Dataset, windows: data_lib.EvalWindows) -> dict:
  """How the validation numbers of `dataset` are measured: split, tokens, characters, context."""
  positions, _ = windows.scored()
  return {"data": dataset.description, "split": "validation", **windows.describe(),
          "chars_scored": int(dataset.tokenizer.char_lengths[dataset.val_ids[positions]].sum()),
          "seq_len": config.seq_len, "stride": config.eval_stride or config.seq_len}


def main(argv):
  del argv
  start = time.time()
  log = print if common.is_primary() else lambda *_: None
  config = common.config_from_flags()
  workdir = common.prepare_workdir(config)
  studies = config_lib.parse_studies(config.studies)
  if INIT_WORKDIR.value:
    config, dataset, trained = load_base(config)
    base = {"model": INIT_WORKDIR.value, "step": trained.step}
  else:
    base_dir = studies.run_dir(config_lib.run_config(config), workdir, "base")
    dataset = studies.load_dataset(config, base_dir)
    base = {"model": "WORKDIR/base", "step": config.num_steps}
  log(f"data: {dataset.description}; vocabulary {dataset.vocab_size}")
  config_lib.check(config, dataset.vocab_size)
  target = load_target(config, dataset) if "lora" in studies else None
  runs = {names: (cfg, studies.run_dir(cfg, workdir, *names))  # Every run's config checked first.
          for names, cfg in config_lib.plan_runs(config, studies, base).items()}
  if INIT_WORKDIR.value:
    params, origin = trained.params, f"loaded from --init_workdir={INIT_WORKDIR.value}"
  else:
    result = train_lib.train(config, dataset, base_dir, log=log)
    studies.completed(result)
    params, origin = train_lib.to_host(result.state.params), f"trained in {base_dir}"
  timings = {"base model": time.time() - start}

  model = model_lib.Transformer(train_config.model_config(config, dataset.vocab_size))
  windows = evaluation.validation_windows(config, dataset.val_ids)
  evaluate = evaluation.evaluator(config, windows, model.apply)
  float_nll = evaluate(params)
  log(f"base model: val nll {float_nll:.4f} nats")
  results = {"experiment": "compression", "data": dataset.description,
             "evaluation": describe(config, dataset, windows),
             "references": evaluation.reference_nlls(dataset, windows),
             "base": {"origin": origin, "step": base["step"], "model": dict(config.model),
                      "params": flops_lib.count_params(params),
                      **compression.nll_record(float_nll)}}
  for study in studies:
    t0 = time.time()
    if study == "svd":
      results["svd"] = compression.svd_sweep(
          params, evaluate, float_nll, rank_fractions=config.svd.rank_fractions,
          energies=config.svd.energies, pattern=config.svd.pattern, log=log)
    elif study == "quant":
      results["quant"] = compression.quant_sweep(
          params, evaluate, float_nll, config.quant.schemes.split(","),
          scale_dtype=config.quant.scale_dtype, pattern=config.quant.pattern, log=log)
    elif study == "lora":
      results["lora"] = lora_study(config, runs, params, model, target, log)
    else:
      results["distill"] = distill_study(config, runs, params, model, dataset, windows, float_nll,
                                         log)
    timings[study] = time.time() - t0
  results.update(headline=plot_compression.headline(results), timings_s=timings,
                 wall_time_s=time.time() - start, config=json.loads(config.to_json_best_effort()))
  if common.is_primary():
    report = plot_compression.report(results)
    common.write_results(workdir, results, report)
    figures = plot_compression.plot_all(results, workdir)
    print(report)
    print(f"wrote {os.path.join(workdir, 'results.json')}, results.md, {', '.join(figures)} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
  common.run(main, "compression.py")
