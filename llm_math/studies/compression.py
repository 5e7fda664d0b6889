r"""What a trained Transformer LM loses under compression: low rank, quantization, LoRA, distillation.

From one base model (trained here in WORKDIR/base, or the run in `init_workdir`), scored on the
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
`train.fit` in its own directory (`studies.run_dir`), with the config `plan_runs` gives it: base/;
lora/rank_R, lora/full, lora/scratch (LoRA params {"base": frozen, "lora": factors});
distill/seed_S/T_t and distill/seed_S/scratch (params {"student", "teacher": frozen}). Rerunning
after a preemption reads finished runs back and continues an interrupted one from its checkpoint; a
setting changed under an existing run is a one-line error naming the run and the field, before any
training.

The LoRA transfer needs one vocabulary for both sources (`load_target`): the synthetic source with
other settings, or with corpora a byte-level tokenizer (or a char tokenizer when both corpora have
the same alphabet).
"""

import dataclasses
import json
import re
import time

import flax.linen as nn
import jax
import ml_collections

from llm_math import checkpoint
from llm_math import data as data_lib
from llm_math import evaluation
from llm_math import flops as flops_lib
from llm_math import model as model_lib
from llm_math import studies
from llm_math import train as train_lib
from llm_math import train_config
from llm_math.analysis import compression
from llm_math.analysis import distillation
from llm_math.analysis import lora as lora_lib
from llm_math.errors import UsageError

STUDIES = ("svd", "quant", "lora", "distill")
STUDY_FIELDS = ("studies",) + STUDIES  # Blocks of this study's config, not of a training run.
SCRATCH = "scratch (labels only)"  # The name of the distillation baseline: a student on CE alone.


# ------------------------------------------------------------------------------------------------
# Checks and the plan of training runs, from the config alone.


def parse_studies(spec: str) -> list[str]:
  """'quant, svd' -> ['svd', 'quant'] (in the order the study runs them)."""
  selected = [s.strip() for s in spec.split(",") if s.strip()]
  if not selected or set(selected) - set(STUDIES):
    raise UsageError(f"--config.studies={spec!r}: expected a comma-separated subset of "
                     f"{','.join(STUDIES)}")
  return [s for s in STUDIES if s in selected]


def student_config(config) -> ml_collections.ConfigDict:
  """The base config with the model block's fields replaced by `distill.student`."""
  student = ml_collections.ConfigDict(config.to_dict())
  for key, value in config.distill.student.items():
    if key not in student.model:
      raise UsageError(f"--config.distill.student.{key}: not a field of the model block")
    student.model[key] = value
  return student


def _need(ok: bool, field: str, value, expected: str):
  if not ok:
    raise UsageError(f"--config.{field}={value!r}: expected {expected}")


def check(config):
  """A one-line UsageError for any setting of the studies in `config.studies` that is wrong on its
  own (a fraction outside (0, 1], an unknown scheme, a non-positive step count, ...). The settings
  that depend on the model's shapes are `check_shapes`'s."""
  selected = parse_studies(config.studies)
  if "svd" in selected:
    for field in ("rank_fractions", "energies"):
      values = list(config.svd[field])
      _need(values and all(0 < f <= 1 for f in values), f"svd.{field}", values,
            "fractions in (0, 1]")
  if "quant" in selected:
    _need(config.quant.scale_dtype in compression.SCALE_DTYPES, "quant.scale_dtype",
          config.quant.scale_dtype, f"one of {', '.join(compression.SCALE_DTYPES)}")
    for name in config.quant.schemes.split(","):
      try:
        compression.parse_scheme(name)
      except ValueError as e:
        raise UsageError(f"--config.quant.schemes: {e}") from None
  if "lora" in selected:
    for field in ("num_steps", "eval_every", "alpha", "learning_rate", "full_learning_rate"):
      _need(config.lora[field] > 0, f"lora.{field}", config.lora[field], "a positive value")
  if "distill" in selected:
    d = config.distill
    for field in ("num_steps", "eval_every", "learning_rate"):
      _need(d[field] > 0, f"distill.{field}", d[field], "a positive value")
    _need(d.temperatures and all(t > 0 for t in d.temperatures), "distill.temperatures",
          list(d.temperatures), "one or more positive temperatures")
    _need(d.seeds and len(set(d.seeds)) == len(d.seeds), "distill.seeds", list(d.seeds),
          "one or more distinct seeds")
    _need(0.0 <= d.alpha <= 1.0, "distill.alpha", d.alpha, "a mixing weight in [0, 1]")


def check_shapes(config, vocab_size: int):
  """A one-line UsageError for any setting of the studies in `config.studies` that cannot run on the
  config's model with `vocab_size` tokens: parameter patterns that select no matrix, quantization
  groups that do not divide a matrix's input size, LoRA ranks above min(in, out) of a target, a
  student that is not a model. Only shapes are computed (jax.eval_shape)."""
  selected = parse_studies(config.studies)
  model = model_lib.Transformer(train_config.model_config(config, vocab_size))
  params = nn.meta.unbox(jax.eval_shape(train_lib.lm_init(model, config.seq_len),
                                        jax.random.PRNGKey(0)))

  def shapes(block: str, key: str) -> dict[str, tuple[int, int]]:
    try:
      return compression.matrix_shapes(params, config[block][key])
    except (re.error, ValueError) as e:
      paths = ", ".join(list(compression.flatten_tree(params))[:3])
      raise UsageError(f"--config.{block}.{key}={config[block][key]!r}: {e} (paths are like "
                       f"{paths})") from None

  if "svd" in selected:
    shapes("svd", "pattern")
  if "quant" in selected:
    inputs = sorted({n_in for n_in, _ in shapes("quant", "pattern").values()})
    for name in config.quant.schemes.split(","):
      group = compression.parse_scheme(name)["group_size"]
      _need(not group or all(n % group == 0 for n in inputs), "quant.schemes", name,
            f"groups that divide every matrix's input size {inputs}")
  if "lora" in selected:
    most = min(min(s) for s in shapes("lora", "targets").values())
    _need(all(int(r) == r and 1 <= r <= most for r in config.lora.ranks), "lora.ranks",
          list(config.lora.ranks), f"integers in [1, {most}] (min(in, out) of the targets)")
  if "distill" in selected:
    try:
      train_config.model_config(student_config(config), vocab_size)
    except UsageError as e:
      raise UsageError(str(e).replace("--config.model", "--config.distill.student")) from None


def run_config(config, **fields) -> ml_collections.ConfigDict:
  """A training run's own config, what its directory keeps and checks: the base config without the
  study blocks, with `fields` set."""
  run = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items()
                                   if k not in STUDY_FIELDS})
  run.update(fields)
  return run


def _schedule(block, learning_rate: float, weight_decay: float) -> dict:
  """`block`'s steps, warmup and evaluation; AdamW at `learning_rate`, cosine to a tenth of it."""
  return dict(num_steps=block.num_steps, eval_every=block.eval_every, learning_rate=learning_rate,
              min_learning_rate=learning_rate / 10, weight_decay=weight_decay,
              warmup_steps=min(block.warmup_steps, max(block.num_steps - 1, 0)))


def plan_runs(config, selected: list[str], base: dict) -> dict[tuple[str, ...], object]:
  """{directory names: config} of every training run after the base model, for the studies in
  `selected`; `base` (where the base model comes from) is part of the config of the runs that
  start from it."""
  runs, lc, d = {}, config.lora, config.distill
  if "lora" in selected:
    target = {"data": lc.target_data, "synthetic": lc.target_synthetic.to_dict(),
              "max_chars": lc.target_max_chars}
    full = _schedule(lc, lc.full_learning_rate, config.weight_decay)
    for rank in lc.ranks:
      runs["lora", f"rank_{rank}"] = run_config(
          config, **_schedule(lc, lc.learning_rate, 0.0), target=target, base=base,
          adapter={"rank": int(rank), "alpha": float(lc.alpha), "targets": lc.targets})
    runs["lora", "full"] = run_config(config, **full, target=target, base=base)
    if lc.scratch:
      runs["lora", "scratch"] = run_config(config, **full, target=target)
  if "distill" in selected:
    student = student_config(config)
    for seed in d.seeds:
      student_run = dict(_schedule(d, d.learning_rate, config.weight_decay), seed=int(seed))
      for t in d.temperatures:
        runs["distill", f"seed_{seed}", f"T_{t:g}"] = run_config(
            student, **student_run, teacher=base,
            distillation={"temperature": float(t), "alpha": float(d.alpha)})
      runs["distill", f"seed_{seed}", "scratch"] = run_config(student, **student_run)
  return runs


def target_changes(config: dict) -> dict | None:
  """{field: [base, target]} of the synthetic source fields the LoRA transfer changes (None when
  either source is a corpus), from a config as a dict."""
  if config["lora"]["target_data"] != "synthetic" or config["data"] != "synthetic":
    return None
  base, target = config["synthetic"], config["lora"]["target_synthetic"]
  return {k: [base.get(k), v] for k, v in sorted(target.items())
          if k not in ("train_tokens", "val_tokens") and base.get(k) != v}


# ------------------------------------------------------------------------------------------------
# The base model and the data.


def _same_tokenizer(a, b) -> bool:
  return (a.kind, a.vocab_size, getattr(a, "chars", None), getattr(a, "model_proto", None)) == (
      b.kind, b.vocab_size, getattr(b, "chars", None), getattr(b, "model_proto", None))


def load_base(config, init_workdir: str, overrides: dict):
  """(config, dataset, TrainedModel) of the finished run in `init_workdir`: that run's config (data,
  model, training, evaluation windows) with this study's blocks and eval_batch_size/mesh from
  `config`. `overrides` ({field: value} the command line set: data, tokenizer, vocab_size, seed)
  must agree with that run's."""
  trained = checkpoint.load_trained(init_workdir)
  for field, value in overrides.items():
    if value != trained.config.get(field):
      raise UsageError(f"--{field}={value} disagrees with the model in --init_workdir="
                       f"{init_workdir}, trained with {field}="
                       f"{trained.config.get(field)!r}; drop the flag")
  merged = ml_collections.ConfigDict(trained.config.to_dict())
  for field in STUDY_FIELDS + ("eval_batch_size", "mesh"):
    merged[field] = config[field]
  dataset = studies.load_dataset(merged)
  if not _same_tokenizer(dataset.tokenizer, trained.tokenizer):
    raise UsageError(f"--init_workdir={init_workdir}: the saved tokenizer differs from the "
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


def describe(config, dataset: data_lib.Dataset, windows: data_lib.EvalWindows) -> dict:
  """How the validation numbers of `dataset` are measured: split, tokens, characters, context."""
  positions, _ = windows.scored()
  return {"data": dataset.description, "split": "validation", **windows.describe(),
          "chars_scored": int(dataset.tokenizer.char_lengths[dataset.val_ids[positions]].sum()),
          "seq_len": config.seq_len, "stride": config.eval_stride or config.seq_len}


# ------------------------------------------------------------------------------------------------
# The training studies.


def frozen_init(model: nn.Module, seq_len: int, params):
  """rng -> `params` boxed with the model's logical axis names: a frozen part of a Task's params,
  sharded like a fresh model's (only the abstract shapes of a fresh model are computed)."""
  abstract = jax.eval_shape(train_lib.lm_init(model, seq_len), jax.random.PRNGKey(0))
  return lambda rng: train_lib.boxed_like(abstract, params)


def fit_run(run: tuple, task: train_lib.Task, evaluate, log) -> train_lib.TrainResult:
  """train.fit of `task` in the run's (config, directory); raises studies.Interrupted when a signal
  stopped it, after saving: rerunning continues."""
  log(f"--- {run[1]}")
  return studies.completed(train_lib.fit(run[0], task, run[1], evaluate=evaluate, log=log))


def record(name: str, result: train_lib.TrainResult, **fields) -> dict:
  """One run's record: name, `fields`, its validation curve [(step, nll)], wall time and the
  `nll_record` of its final validation NLL."""
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
    result = fit_run(run, task, merged, log)
    factors = result.state.params["lora"]
    records.append(record(f"LoRA r={rank}", result, kind="lora", rank=int(rank),
                          trainable_params=lora_lib.lora_param_count(factors),
                          adapted_params=lora_lib.adapted_param_count(factors),
                          adapted_matrices=len(lora_lib.factor_pairs(factors))))
  for kind, name in (("full", "full fine-tuning"), ("scratch", "scratch on target (same steps)")):
    if ("lora", kind) in runs:
      task = train_lib.lm_task(runs["lora", kind][0], target, model)
      task = dataclasses.replace(task, init=base_init) if kind == "full" else task
      result = fit_run(runs["lora", kind], task, evaluate, log)
      records.append(record(name, result, kind=kind, rank=None, trainable_params=result.params))
  full_nll = next(r["val_nll"] for r in records if r["kind"] == "full")
  for r in records:
    if r["kind"] == "lora":
      r["share_of_full_gain"] = lora_lib.share_of_gain(no_ft, full_nll, r["val_nll"])
  return {"target": target.description, "target_changes": target_changes(config.to_dict()),
          "targets": lc.targets, "alpha": lc.alpha, "num_steps": lc.num_steps,
          "params_total": flops_lib.count_params(params),
          "evaluation": describe(config, target, windows),
          "references": evaluation.reference_nlls(target, windows), "runs": records}


def distill_study(config, runs: dict, params, teacher: nn.Module, dataset, windows,
                  teacher_nll: float, log) -> dict:
  """Distilled vs scratch student, per seed: the same init, batches, optimizer and steps (the
  seed draws the student's initialization and the batch order)."""
  d, student_cfg = config.distill, student_config(config)
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
        records.append(record(SCRATCH, fit_run(run, lm, evaluate, log), seed=int(seed), alpha=0.0,
                              temperature=1.0))
        continue
      task = distillation.distillation_task(lm, teacher_init, student.apply, teacher.apply, t,
                                            d.alpha)
      records.append(record(f"distilled, T={t:g}", fit_run(run, task, evaluate_student, log),
                            seed=int(seed), alpha=float(d.alpha), temperature=float(t)))
  return {"student_model": dict(student_cfg.model), "num_steps": d.num_steps,
          "student_params": flops_lib.count_params(jax.eval_shape(
              train_lib.lm_init(student, config.seq_len), jax.random.PRNGKey(0))),
          "teacher_params": flops_lib.count_params(params), "alpha": float(d.alpha),
          "temperatures": [float(t) for t in d.temperatures], "seeds": [int(x) for x in d.seeds],
          "teacher": compression.nll_record(teacher_nll), "runs": records,
          "summary": distillation.paired_summary(records, SCRATCH)}


def headline(results: dict) -> dict:
  """The numbers the README quotes, in one place: base NLL, perplexity change per quantization
  scheme, singular values kept per energy budget, LoRA's share of full fine-tuning's gain per rank,
  distilled minus scratch NLL per temperature (lists of records, so no key holds a dot)."""
  out = {"base_val_nll": results["base"]["val_nll"]}
  if "quant" in results:
    out["quant"] = [{k: r[k] for k in ("scheme", "bits_per_param", "ppl_change_pct")}
                    for r in results["quant"]["records"] if r["bits"] < 32]
  if "svd" in results:
    out["svd_energy"] = [{"energy": r["setting"], "singular_values_kept": r["singular_values_kept"],
                          "ppl_change_pct": r["ppl_change_pct"]}
                         for r in results["svd"]["records"] if r["method"] == "global energy"]
  if "lora" in results:
    out["lora"] = [{k: r[k] for k in ("name", "trainable_params", "val_nll", "share_of_full_gain")
                    if k in r} for r in results["lora"]["runs"]]
  if "distill" in results:
    d = results["distill"]
    out["distill"] = [{"name": name, **{k: m[k] for k in (
        "temperature", "val_nll_mean", "minus_scratch_mean", "seeds_better_than_scratch")}}
                      for name, m in d["summary"].items()]
    out["distill_teacher_val_nll"] = d["teacher"]["val_nll"]
  return out


def run(config, workdir: str, log=print, *, init_workdir: str | None = None,
        overrides: dict | None = None) -> dict:
  """Trains (or reads back) the base model and every run of the studies in `config.studies`; the
  results (see the module docstring). With `init_workdir` the base model is that finished run's
  (see `load_base`; `overrides` are the fields the command line set, which must agree with it)."""
  start = time.time()
  check(config)
  selected = parse_studies(config.studies)
  if init_workdir:
    config, dataset, trained = load_base(config, init_workdir, overrides or {})
    base = {"model": init_workdir, "step": trained.step}
  else:
    base_dir = studies.run_dir(run_config(config), workdir, "base")
    dataset = studies.load_dataset(config, base_dir)
    base = {"model": "WORKDIR/base", "step": config.num_steps}
  log(f"data: {dataset.description}; vocabulary {dataset.vocab_size}")
  check_shapes(config, dataset.vocab_size)
  target = load_target(config, dataset) if "lora" in selected else None
  runs = {names: (cfg, studies.run_dir(cfg, workdir, *names))  # Every run's config checked first.
          for names, cfg in plan_runs(config, selected, base).items()}
  if init_workdir:
    params, origin = trained.params, f"loaded from --init_workdir={init_workdir}"
  else:
    result = studies.completed(train_lib.train(config, dataset, base_dir, log=log))
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
  for study in selected:
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
  results.update(headline=headline(results), timings_s=timings, wall_time_s=time.time() - start,
                 config=json.loads(config.to_json_best_effort()))
  return results
