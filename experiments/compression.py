r"""What a trained Transformer LM loses under compression: low rank, quantization, LoRA, distillation.

From one base model (trained here in WORKDIR/base, or the run in --init_workdir), on the validation
windows of its own run (`train.validation_windows`, scored with `train.Evaluator`):

  svd      every Dense kernel W [in, out] replaced by its best rank-r approximation U_r S_r V_r^T
           (Eckart-Young), r a fixed fraction of min(in, out) per matrix, or ranks chosen globally to
           keep a share of sum_i s_i^2 over all matrices; perplexity vs the fraction of singular
           values kept, and the parameters r (in + out) that storing the factors would take;
  quant    symmetric absmax round-to-nearest (RTN) int8 / int4 with one scale per tensor, per output
           channel or per group of g inputs ("dequantize on load"); bits/param counts the scales;
  lora     the base model fine-tuned on a second source with the same vocabulary: LoRA
           W + (alpha/r) a b on the attention query and value kernels at ranks 1..16 vs full
           fine-tuning vs no fine-tuning (and vs the same architecture trained from scratch on the
           target), each with its trainable parameter count, all on the same target batches;
  distill  a smaller student trained on alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE at
           several temperatures T vs the same student (same init, batches, optimizer and steps) on
           CE alone (alpha = 0), over several seeds; differences are paired by seed.

  python -m experiments.compression --workdir=/tmp/compression          # synthetic, ~5 min on 2 cores
  python -m experiments.compression --workdir=/tmp/cmp --init_workdir=/tmp/llm_math_ppl
  python -m experiments.compression --workdir=/tmp/cmp_text \
      --data=text:../shared/data/english_pd.txt --tokenizer=byte --config.max_chars=2000000 \
      --config.lora.target_data=text:../shared/data/tinyshakespeare.txt

The LoRA transfer needs one vocabulary for both sources: by default the synthetic lagged-copy source
with lag 16 and Zipf exponent 1.0 -> lag 12 and Zipf 1.5 (V=32 both); with corpora, a byte-level
tokenizer (or a char tokenizer when both corpora have the same alphabet).

Writes to --workdir: results.json (every number with how it was measured, and the config),
results.md, svd.png, quant.png, lora.png, distill.png; base/ holds the base model's run (checkpoints,
metrics.jsonl, config.json) and is reused when the experiment is run again with the same base config.
"""

import dataclasses
import json
import math
import os
import re
import sys
import time

from absl import flags
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common
from experiments import plot_compression
from llm_math.analysis import compression
from llm_math import data as data_lib
from llm_math.analysis import distillation
from llm_math import files
from llm_math import flops as flops_lib
from llm_math.analysis import information
from llm_math.analysis import lora as lora_lib
from llm_math import model as model_lib
from llm_math import sharding
from llm_math import train as train_lib
from llm_math.errors import UsageError

INIT_WORKDIR = flags.DEFINE_string(
    "init_workdir", None, "A finished training run (e.g. of experiments.perplexity) whose model to "
    "compress; default: train the config's model in WORKDIR/base.")

STUDIES = ("svd", "quant", "lora", "distill")
# Config blocks of this experiment (everything else describes the base model and its training).
_STUDY_FIELDS = ("studies", "svd", "quant", "lora", "distill")
_SCHEME = re.compile(r"^int(\d+)-(per_tensor|per_channel|group(\d+))$")
_SCALE_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}


# ------------------------------------------------------------------------------------------------
# Config checks (all before any training, so a mistake costs nothing).


def parse_studies(spec: str) -> list[str]:
  studies = [s.strip() for s in spec.split(",") if s.strip()]
  unknown = [s for s in studies if s not in STUDIES]
  if not studies or unknown:
    raise UsageError(f"--config.studies={spec!r}: expected a comma-separated subset of "
                     f"{','.join(STUDIES)}")
  return [s for s in STUDIES if s in studies]


def parse_scheme(name: str) -> dict:
  """'int8-per_channel' -> {name, bits, granularity, group_size}; 'int4-group32' has group_size 32."""
  m = _SCHEME.match(name.strip())
  if not m or not 2 <= int(m.group(1)) <= 8 or (m.group(3) and int(m.group(3)) < 1):
    raise UsageError(f"--config.quant.schemes: {name.strip()!r} is not int<bits 2-8>-per_tensor, "
                     "int<bits>-per_channel or int<bits>-group<g>")
  group = int(m.group(3)) if m.group(3) else None
  return {"name": name.strip(), "bits": int(m.group(1)),
          "granularity": "group" if group else m.group(2), "group_size": group}


def _matrix_shapes(model_cfg: model_lib.ModelConfig, seq_len: int, pattern: str,
                   field: str) -> dict[str, tuple[int, int]]:
  """{path: (in, out)} of the kernels `pattern` selects, from abstract shapes (nothing computed)."""
  abstract = jax.eval_shape(model_lib.Transformer(model_cfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, seq_len), jnp.int32))
  flat = compression.flatten_tree(nn.meta.unbox(abstract)["params"])
  try:
    re.compile(pattern)
  except re.error as e:
    raise UsageError(f"--config.{field}={pattern!r}: not a regular expression ({e})") from None
  shapes = {}
  for path, leaf in flat.items():
    if re.search(pattern, path):
      n_in = compression.num_input_axes(path)
      shapes[path] = (math.prod(leaf.shape[:n_in]), math.prod(leaf.shape[n_in:]))
  if not shapes:
    raise UsageError(f"--config.{field}={pattern!r} matches no parameter; paths are like "
                     f"{', '.join(list(flat)[:3])}")
  return shapes


def student_config(config) -> ml_collections.ConfigDict:
  """The base config with the model block's fields replaced by `distill.student`."""
  student = ml_collections.ConfigDict(config.to_dict())
  for key, value in config.distill.student.items():
    if key not in student.model:
      raise UsageError(f"--config.distill.student.{key}: not a field of the model block")
    student.model[key] = value
  return student


def check_config(config, vocab_size: int, studies: list[str]):
  """Raises UsageError for any study setting that cannot run on this base model."""
  mcfg = train_lib.model_config(config, vocab_size)
  if "svd" in studies:
    _matrix_shapes(mcfg, config.seq_len, config.svd.pattern, "svd.pattern")
    for f in config.svd.rank_fractions:
      if not 0.0 < f <= 1.0:
        raise UsageError(f"--config.svd.rank_fractions: {f} is not a fraction in (0, 1]")
    for e in config.svd.energies:
      if not 0.0 < e <= 1.0:
        raise UsageError(f"--config.svd.energies: {e} is not a fraction in (0, 1]")
  if "quant" in studies:
    if config.quant.scale_dtype not in _SCALE_DTYPES:
      raise UsageError(f"--config.quant.scale_dtype={config.quant.scale_dtype!r}: expected one of "
                       f"{', '.join(_SCALE_DTYPES)}")
    shapes = _matrix_shapes(mcfg, config.seq_len, config.quant.pattern, "quant.pattern")
    for scheme in map(parse_scheme, config.quant.schemes.split(",")):
      g = scheme["group_size"]
      bad = [p for p, (n_in, _) in shapes.items() if g and n_in % g]
      if bad:
        raise UsageError(f"--config.quant.schemes: {scheme['name']} needs groups of {g} to divide "
                         f"every matrix's input size; '{bad[0]}' has {shapes[bad[0]][0]} inputs")
  if "lora" in studies:
    shapes = _matrix_shapes(mcfg, config.seq_len, config.lora.targets, "lora.targets")
    for r in config.lora.ranks:
      if int(r) != r or r < 1 or r > min(min(s) for s in shapes.values()):
        raise UsageError(f"--config.lora.ranks: {r} is not an integer in [1, "
                         f"{min(min(s) for s in shapes.values())}] (min(in, out) of the targets)")
    _check_positive(config.lora, "lora", ("num_steps", "eval_every", "alpha", "learning_rate",
                                          "full_learning_rate"))
  if "distill" in studies:
    try:
      train_lib.model_config(student_config(config), vocab_size)
    except UsageError as e:
      raise UsageError(str(e).replace("--config.model", "--config.distill.student")) from None
    d = config.distill
    _check_positive(d, "distill", ("num_steps", "eval_every", "learning_rate"))
    if not d.temperatures or any(not t > 0 for t in d.temperatures):
      raise UsageError(f"--config.distill.temperatures={list(d.temperatures)}: expected one or "
                       "more positive temperatures")
    if not d.seeds or len(set(d.seeds)) != len(d.seeds):
      raise UsageError(f"--config.distill.seeds={list(d.seeds)}: expected one or more distinct "
                       "seeds")
    if not 0.0 <= d.alpha <= 1.0:
      raise UsageError(f"--config.distill.alpha={d.alpha}: expected a mixing weight in [0, 1]")


def _check_positive(block, name: str, fields):
  for field in fields:
    if not block[field] > 0:
      raise UsageError(f"--config.{name}.{field}={block[field]}: expected a positive value")


# ------------------------------------------------------------------------------------------------
# The base model.


@dataclasses.dataclass
class Base:
  config: ml_collections.ConfigDict  # The base run's config with this experiment's blocks.
  dataset: data_lib.Dataset
  params: dict | None  # None until trained.
  origin: str
  step: int = 0
  base_dir: str | None = None  # Where the base model is trained (None: from --init_workdir).


def _same_tokenizer(a, b) -> bool:
  if a.kind != b.kind or a.vocab_size != b.vocab_size:
    return False
  if a.kind == "char":
    return a.chars == b.chars
  if a.kind == "sentencepiece":
    return a.model_proto == b.model_proto
  return True


def _load_dataset(config, workdir=None) -> data_lib.Dataset:
  dataset = common.load_dataset(config, workdir)
  return dataset


def config_from_init_workdir(config, init_workdir: str):
  """(config, TrainedModel): the run's config (data, model, training, evaluation windows) with this
  experiment's blocks and eval_batch_size/mesh from `config`."""
  trained = train_lib.load_trained(init_workdir)
  run = trained.config
  for flag, field in ((common.DATA, "data"), (common.TOKENIZER, "tokenizer"),
                      (common.VOCAB_SIZE, "vocab_size"), (common.SEED, "seed")):
    if flag.value is not None and flag.value != run.get(field):
      raise UsageError(f"--{field}={flag.value} disagrees with the model in --init_workdir="
                       f"{init_workdir}, trained with {field}={run.get(field)!r}; drop the flag")
  merged = ml_collections.ConfigDict(run.to_dict())
  for field in _STUDY_FIELDS + ("eval_batch_size", "mesh"):
    merged[field] = config[field]
  return merged, trained


def _prepare_base_dir(config, base_dir: str):
  """Saves the base config in base_dir, refusing to resume a base model trained with another one."""
  files.path(base_dir).mkdir(parents=True, exist_ok=True)
  common.save_config(config, base_dir, f"{base_dir} holds a base model trained",
                     ignored=_STUDY_FIELDS, write=common.is_primary())


def prepare_base(config, workdir: str, log=print) -> Base:
  """The base model's config and data; its parameters when they come from --init_workdir."""
  if INIT_WORKDIR.value:
    config, trained = config_from_init_workdir(config, INIT_WORKDIR.value)
    dataset = _load_dataset(config)
    if not _same_tokenizer(dataset.tokenizer, trained.tokenizer):
      raise UsageError(f"--init_workdir={INIT_WORKDIR.value}: the saved tokenizer differs from the "
                       f"one rebuilt from {config.data}; cannot score the run's validation split")
    params = jax.tree_util.tree_map(jnp.asarray, trained.params)
    log(f"base model: {INIT_WORKDIR.value} (step {trained.step})")
    return Base(config, dataset, params, f"loaded from --init_workdir={INIT_WORKDIR.value}",
                trained.step)
  base_dir = os.path.join(workdir, "base")
  _prepare_base_dir(config, base_dir)
  return Base(config, _load_dataset(config, base_dir), None, f"trained in {base_dir}",
              base_dir=base_dir)


def train_base(base: Base, log=print):
  """Trains (or resumes, or just reloads when finished) the base model in base.base_dir."""
  result = train_lib.train(base.config, base.dataset, base.base_dir,
                           windows=train_lib.validation_windows(base.config, base.dataset), log=log)
  if result.interrupted:
    sys.exit(130)
  base.params = nn.meta.unbox(result.state.params)
  base.step = result.final_step


# ------------------------------------------------------------------------------------------------
# Evaluation.


def _evaluator(config, model: nn.Module, windows: data_lib.EvalWindows) -> train_lib.Evaluator:
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  return train_lib.Evaluator(windows, model.apply, config.eval_batch_size, mesh, rules)


def describe_windows(config, dataset: data_lib.Dataset, windows: data_lib.EvalWindows) -> dict:
  scored = windows.weights_NxT > 0
  n_chars = int(dataset.tokenizer.char_lengths[windows.targets_NxT[scored]].sum())
  return {"data": dataset.description, "split": "validation", **windows.describe(),
          "chars_scored": n_chars, "seq_len": config.seq_len,
          "stride": config.eval_stride or config.seq_len}


def reference_nlls(dataset: data_lib.Dataset, windows: data_lib.EvalWindows) -> dict:
  """Uniform, add-one unigram and (synthetic source) the exact floor, on the scored tokens."""
  scored = windows.weights_NxT > 0
  targets = windows.targets_NxT[scored]
  counts = np.bincount(dataset.train_ids, minlength=dataset.vocab_size) + 1.0
  refs = {"uniform": math.log(dataset.vocab_size),
          "unigram": float(-np.mean(np.log(counts[targets] / counts.sum())))}
  if dataset.source is not None:
    refs["floor"] = float(dataset.source.conditional_nll(
        dataset.val_ids, windows.positions_NxT[scored], windows.context_NxT[scored]).mean())
  return refs


def _nll_record(nll: float, reference: float | None = None) -> dict:
  rec = {"val_nll": float(nll), "val_ppl": information.perplexity(nll),
         "bits_per_token": information.nats_to_bits(nll)}
  if reference is not None:
    rec["ppl_change_pct"] = 100.0 * (information.perplexity(nll - reference) - 1.0)
  return rec


# ------------------------------------------------------------------------------------------------
# Studies.


def svd_study(config, params, evaluate, float_nll: float) -> dict:
  """Perplexity vs rank: uniform rank fractions and global energy budgets."""
  pattern = config.svd.pattern
  flat = compression.flatten_tree(params)
  spectra = {}
  for path, n_in in compression.select_matrices(params, pattern).items():
    spectra[path] = np.asarray(compression.svd(compression.kernel_to_matrix(
        jnp.asarray(flat[path]), n_in))[1], np.float64)
  total_s2 = sum(float(np.sum(s**2)) for s in spectra.values())
  records = []
  settings = ([("rank_fraction", f) for f in config.svd.rank_fractions]
              + [("energy", e) for e in config.svd.energies])
  for method, value in settings:
    compressed, report = compression.svd_compress_tree(params, pattern=pattern, **{method: value})
    ranks = {p: m["rank"] for p, m in report["matrices"].items()}
    total = report["total"]
    rec = {"method": "uniform" if method == "rank_fraction" else "global energy",
           "setting": float(value),
           "singular_values_kept": sum(ranks.values()) / sum(len(s) for s in spectra.values()),
           "energy_kept": total["energy_kept"],
           "relative_error": total["frobenius_error"] / math.sqrt(total_s2),
           "params_dense": total["params_dense"], "params_factored": total["params_factored"],
           "ranks": ranks, **_nll_record(evaluate(compressed), float_nll)}
    records.append(rec)
    print(f"  svd {rec['method']:14s} {value:6.3f}: {rec['singular_values_kept']:.3f} of singular "
          f"values, ppl {rec['val_ppl']:.3f} ({rec['ppl_change_pct']:+.2f}%)")
  return {"pattern": pattern, "records": records,
          "spectra": {p: s.tolist() for p, s in spectra.items()},
          "matrix_shapes": {p: list(compression.kernel_to_matrix(jnp.asarray(flat[p]), n).shape)
                            for p, n in compression.select_matrices(params, pattern).items()}}


def quant_study(config, params, evaluate, float_nll: float) -> dict:
  """Perplexity and bits/param per quantization scheme (float first)."""
  pattern = config.quant.pattern
  flat = compression.flatten_tree(params)
  selected = compression.select_matrices(params, pattern)
  n_quantized = sum(int(np.size(flat[p])) for p in selected)
  n_total = flops_lib.count_params(params)
  norms2 = {p: float(jnp.sum(jnp.asarray(flat[p], jnp.float32)**2)) for p in selected}
  records = [{"scheme": "float32", "bits": 32, "granularity": "-", "group_size": None,
              "bits_per_param": 32.0, "bytes": 4 * n_quantized, "model_bytes": 4 * n_total,
              "relative_error": 0.0, "max_relative_error": 0.0, **_nll_record(float_nll, float_nll)}]
  for scheme in map(parse_scheme, config.quant.schemes.split(",")):
    quantized, report = compression.quantize_tree(
        params, bits=scheme["bits"], granularity=scheme["granularity"],
        group_size=scheme["group_size"], scale_dtype=_SCALE_DTYPES[config.quant.scale_dtype],
        pattern=pattern)
    mats = report["matrices"]
    err2 = sum((m["relative_error"]**2) * norms2[p] for p, m in mats.items())
    rec = {"scheme": scheme["name"], "bits": scheme["bits"], "granularity": scheme["granularity"],
           "group_size": scheme["group_size"], "bits_per_param": report["total"]["bits_per_param"],
           "bytes": report["total"]["bytes"],
           "model_bytes": report["total"]["bytes"] + 4 * (n_total - n_quantized),
           "relative_error": math.sqrt(err2 / sum(norms2.values())),
           "max_relative_error": max(m["relative_error"] for m in mats.values()),
           **_nll_record(evaluate(quantized), float_nll)}
    records.append(rec)
    print(f"  quant {rec['scheme']:16s}: {rec['bits_per_param']:.3f} bits/param, "
          f"ppl {rec['val_ppl']:.3f} ({rec['ppl_change_pct']:+.2f}%)")
  return {"pattern": pattern, "scale_dtype": config.quant.scale_dtype,
          "params_quantized": n_quantized, "params_total": n_total, "records": records}


def _optimizer(config, num_steps: int, learning_rate: float, warmup_steps: int,
               weight_decay: float):
  """train.optimizer (clipping + AdamW, warmup + cosine to lr/10) with these schedule fields."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.update(num_steps=num_steps, learning_rate=learning_rate, min_learning_rate=learning_rate / 10,
           warmup_steps=min(warmup_steps, max(num_steps - 1, 0)), weight_decay=weight_decay)
  return train_lib.optimizer(c)


def _check_finite(loss, name: str, step: int):
  if not math.isfinite(float(loss)):
    raise train_lib.DivergenceError(
        f"{name}: training loss is {float(loss)} at step {step}; lower its learning rate")


def _evaluate_every(every: int, num_steps: int):
  return lambda done: done % every == 0 or done == num_steps


def _mean_nll_loss(model: nn.Module):
  def loss_fn(params, batch):
    inputs_BxT, targets_BxT = batch
    nll_sum, count = model_lib.cross_entropy(
        model.apply({"params": params}, inputs_BxT), targets_BxT)
    return nll_sum / count
  return loss_fn


def train_full(config, model: nn.Module, params, tx, train_ids, num_steps: int, eval_every: int,
               evaluate, name: str) -> tuple[dict, list]:
  """`num_steps` of train.train_step from `params` on (seed, step) batches of `train_ids`."""
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  step_fn = jax.jit(train_lib.train_step)
  rng = jax.random.PRNGKey(config.seed)
  curve = [(0, evaluate(state.params))]
  due = _evaluate_every(eval_every, num_steps)
  for step in range(num_steps):
    batch = data_lib.train_batch(train_ids, config.seq_len, config.batch_size, config.seed, step)
    state, metrics = step_fn(state, *batch, rng)
    if due(step + 1):
      _check_finite(metrics["loss"], name, step + 1)
      curve.append((step + 1, evaluate(state.params)))
  return state.params, curve


def load_target(config, dataset: data_lib.Dataset) -> data_lib.Dataset:
  """The LoRA target: the same vocabulary as the base model's data, or a UsageError saying why not."""
  spec, tok = config.lora.target_data, dataset.tokenizer
  if spec == "synthetic":
    target = data_lib.load("synthetic", seed=config.seed + 1,
                           synthetic_config=config.lora.target_synthetic)
  else:
    if tok.kind not in ("byte", "char"):
      raise UsageError(
          f"--config.lora.target_data={spec}: a corpus target needs a base model with a byte (or "
          f"char) tokenizer, so that both sources share one vocabulary; the base model's is "
          f"{tok.kind} ({config.data}); use --data=text:... --tokenizer=byte")
    try:
      target = data_lib.load(spec, tokenizer=tok.kind,
                             max_chars=config.lora.target_max_chars or None)
    except UsageError as e:
      raise UsageError(f"--config.lora.target_data: {e}") from None
    if not _same_tokenizer(target.tokenizer, tok):
      raise UsageError(
          f"--config.lora.target_data={spec}: its characters differ from the base corpus's "
          f"({target.vocab_size} vs {tok.vocab_size}), so the vocabularies do not match; "
          "use --tokenizer=byte")
  if target.vocab_size != dataset.vocab_size:
    raise UsageError(
        f"--config.lora.target_data={spec}: vocabulary {target.vocab_size}, the base model's is "
        f"{dataset.vocab_size}; LoRA transfer needs one vocabulary (for synthetic targets "
        "set --config.lora.target_synthetic.vocab_size to the base's)")
  data_lib.check_fits(target, config.seq_len)
  return target


def target_changes(config) -> dict | None:
  """{field: [base, target]} of the synthetic source fields the transfer changes (None: corpus)."""
  if config.lora.target_data != "synthetic" or config.data != "synthetic":
    return None
  base, target = dict(config.synthetic), dict(config.lora.target_synthetic)
  return {k: [base.get(k), v] for k, v in sorted(target.items())
          if k not in ("train_tokens", "val_tokens") and base.get(k) != v}


def lora_study(config, base: Base, model: nn.Module, target: data_lib.Dataset) -> dict:
  """No FT vs LoRA at each rank vs full FT (vs scratch) on the target, on the same batches."""
  lc = config.lora
  windows = train_lib.validation_windows(config, target)
  evaluate = _evaluator(config, model, windows)
  params = base.params
  n_total = flops_lib.count_params(params)
  no_ft = evaluate(params)
  runs = [{"name": "no fine-tuning", "kind": "none", "rank": None, "trainable_params": 0,
           "curve": [(0, no_ft)], **_nll_record(no_ft)}]
  print(f"  lora: no fine-tuning, target ppl {information.perplexity(no_ft):.3f}")
  loss_fn = _mean_nll_loss(model)
  due = _evaluate_every(lc.eval_every, lc.num_steps)
  for rank in lc.ranks:
    start = time.time()
    factors = lora_lib.init_lora(jax.random.fold_in(jax.random.PRNGKey(config.seed), rank),
                                 params, int(rank), lc.alpha, lc.targets)
    tx = _optimizer(config, lc.num_steps, lc.learning_rate, lc.warmup_steps, 0.0)
    opt_state = tx.init(factors)
    step_fn = lora_lib.make_lora_train_step(loss_fn, tx)
    curve = [(0, no_ft)]
    for step in range(lc.num_steps):
      batch = data_lib.train_batch(target.train_ids, config.seq_len, config.batch_size,
                                   config.seed, step)
      factors, opt_state, loss = step_fn(factors, opt_state, params, batch)
      if due(step + 1):
        _check_finite(loss, f"LoRA rank {rank}", step + 1)
        curve.append((step + 1, evaluate(lora_lib.merge_lora(params, factors))))
    runs.append({"name": f"LoRA r={rank}", "kind": "lora", "rank": int(rank),
                 "trainable_params": lora_lib.lora_param_count(factors),
                 "adapted_params": lora_lib.adapted_param_count(factors),
                 "adapted_matrices": len(factors.factors), "curve": curve,
                 "wall_time_s": time.time() - start, **_nll_record(curve[-1][1])})
    print(f"  lora: rank {rank:3d}, {runs[-1]['trainable_params']:,} trainable, target ppl "
          f"{runs[-1]['val_ppl']:.3f} ({time.time() - start:.0f} s)")
  # One optimizer object for both runs (a static field of the train state: no recompilation).
  full_tx = _optimizer(config, lc.num_steps, lc.full_learning_rate, lc.warmup_steps,
                       config.weight_decay)
  others = [("full fine-tuning", "full", params)]
  if lc.scratch:
    scratch_init = nn.meta.unbox(model.init(jax.random.PRNGKey(config.seed + 1), jnp.zeros(
        (1, config.seq_len), jnp.int32)))["params"]
    others.append(("scratch on target (same steps)", "scratch", scratch_init))
  for name, kind, init in others:
    start = time.time()
    _, curve = train_full(config, model, init, full_tx, target.train_ids, lc.num_steps,
                          lc.eval_every, evaluate, name)
    runs.append({"name": name, "kind": kind, "rank": None, "trainable_params": n_total,
                 "curve": curve, "wall_time_s": time.time() - start, **_nll_record(curve[-1][1])})
    print(f"  lora: {name}, {n_total:,} trainable, target ppl {runs[-1]['val_ppl']:.3f} "
          f"({time.time() - start:.0f} s)")
  return {"target": target.description, "target_changes": target_changes(config),
          "targets": lc.targets, "alpha": lc.alpha,
          "num_steps": lc.num_steps, "params_total": n_total,
          "evaluation": describe_windows(config, target, windows),
          "references": reference_nlls(target, windows), "runs": runs}


DISTILLED, SCRATCH = "distilled", "scratch (labels only)"


def distill_study(config, base: Base, teacher: nn.Module, windows, teacher_nll: float) -> dict:
  """Distilled vs scratch student, per seed: same init, batches, optimizer and steps.

  The scratch student minimizes the same loss with alpha = 0, i.e. the cross-entropy alone. Each
  seed draws the student's initialization and the order of the training batches.
  """
  d = config.distill
  scfg = student_config(config)
  student = model_lib.Transformer(train_lib.model_config(scfg, base.dataset.vocab_size))
  evaluate = _evaluator(config, student, windows)
  due = _evaluate_every(d.eval_every, d.num_steps)

  def make_step(alpha: float, temperature: float):
    def step(state, teacher_params, inputs_BxT, targets_BxT):
      teacher_logits = teacher.apply({"params": teacher_params}, inputs_BxT)

      def loss_fn(params):
        logits = state.apply_fn({"params": params}, inputs_BxT)
        return distillation.distillation_loss(logits, teacher_logits, targets_BxT,
                                              temperature, alpha)
      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      return state.apply_gradients(grads=grads), loss
    return jax.jit(step)

  methods = [(f"{DISTILLED}, T={t:g}", float(d.alpha), float(t)) for t in d.temperatures]
  methods.append((SCRATCH, 0.0, 1.0))
  step_fns = {name: make_step(alpha, t) for name, alpha, t in methods}
  # One optimizer object for every run: it is a static field of the train state, so a new one
  # would recompile the step for each run.
  tx = _optimizer(scfg, d.num_steps, d.learning_rate, d.warmup_steps, config.weight_decay)
  runs = []
  for seed in d.seeds:
    init = nn.meta.unbox(student.init(jax.random.PRNGKey(seed), jnp.zeros(
        (1, config.seq_len), jnp.int32)))["params"]
    for name, alpha, temperature in methods:
      start = time.time()
      state = train_state.TrainState.create(apply_fn=student.apply, params=init, tx=tx)
      curve = [(0, evaluate(state.params))]
      for step in range(d.num_steps):
        batch = data_lib.train_batch(base.dataset.train_ids, config.seq_len, config.batch_size,
                                     seed, step)
        state, loss = step_fns[name](state, base.params, *batch)
        if due(step + 1):
          _check_finite(loss, f"student ({name}, seed {seed})", step + 1)
          curve.append((step + 1, evaluate(state.params)))
      runs.append({"name": name, "seed": int(seed), "alpha": alpha,
                   "temperature": temperature, "curve": curve,
                   "wall_time_s": time.time() - start, **_nll_record(curve[-1][1])})
      print(f"  distill: seed {seed}, {name}, val nll {curve[-1][1]:.4f} "
            f"({time.time() - start:.0f} s)")
  summary = {}
  scratch_finals = [r["val_nll"] for r in runs if r["name"] == SCRATCH]
  for name, alpha, temperature in methods:
    mine = [r for r in runs if r["name"] == name]
    finals = np.array([r["val_nll"] for r in mine])
    curves = np.array([[v for _, v in r["curve"]] for r in mine])
    diff = finals - np.array(scratch_finals)
    summary[name] = {"alpha": alpha, "temperature": temperature,
                     "val_nll_per_seed": finals.tolist(), "val_nll_mean": float(finals.mean()),
                     "val_nll_min": float(finals.min()), "val_nll_max": float(finals.max()),
                     "val_ppl_mean": information.perplexity(float(finals.mean())),
                     "minus_scratch_per_seed": diff.tolist(),
                     "minus_scratch_mean": float(diff.mean()),
                     "seeds_better_than_scratch": int(np.sum(diff < 0)),
                     "steps": [s for s, _ in mine[0]["curve"]],
                     "curve_mean": curves.mean(0).tolist(), "curve_min": curves.min(0).tolist(),
                     "curve_max": curves.max(0).tolist()}
  abstract = jax.eval_shape(student.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, config.seq_len), jnp.int32))
  return {"student_model": dict(scfg.model), "student_params": flops_lib.count_params(abstract),
          "teacher_params": flops_lib.count_params(base.params), "num_steps": d.num_steps,
          "alpha": float(d.alpha), "temperatures": [float(t) for t in d.temperatures],
          "seeds": [int(x) for x in d.seeds], "teacher": _nll_record(teacher_nll), "runs": runs,
          "summary": summary}


# ------------------------------------------------------------------------------------------------
# Report.


def _caption(ev: dict) -> str:
  return (f"{ev['split']} split of {ev['data']}: {ev['tokens_scored']:,} tokens scored, windows of "
          f"{ev['seq_len']} moved by {ev['stride']}, context {ev['context_min']}-"
          f"{ev['context_max']} tokens (mean {ev['context_mean']:.1f})")


def _steps_to_reach(curve, nll: float):
  return next((s for s, v in curve if v <= nll), None)


def markdown(results: dict) -> str:
  ev, base = results["evaluation"], results["base"]
  lines = [f"# Compression of a Transformer LM: {ev['data']}", "",
           f"Base model: {base['params']:,} parameters, {base['origin']}, step {base['step']}; "
           f"float32 validation NLL {base['val_nll']:.4f} nats, perplexity {base['val_ppl']:.3f}.",
           f"Measured on the {_caption(ev)}."]
  refs = results["references"]
  lines.append("References on the same tokens: " + ", ".join(
      f"{k} {v:.4f} nats (ppl {information.perplexity(v):.3f})" for k, v in refs.items()) + ".")
  if "svd" in results:
    s = results["svd"]
    recs = s["records"]
    lines += ["", "## Perplexity vs rank (SVD truncation)", "",
              f"Matrices `{s['pattern']}` ({len(s['spectra'])} of them) replaced by their best "
              "rank-r approximation; 'uniform' keeps the same fraction of min(in, out) in every "
              "matrix, 'global energy' keeps the largest singular values over all matrices until "
              "that share of sum s^2. Stored as factors they would take r (in + out) numbers.", "",
              "| method | setting | singular values kept | energy kept | rel. Frobenius error | "
              "factored / dense params | val NLL | perplexity | PPL change |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in recs:
      lines.append(
          f"| {r['method']} | {r['setting']:g} | {r['singular_values_kept']:.3f} | "
          f"{r['energy_kept']:.4f} | {r['relative_error']:.4f} | "
          f"{r['params_factored'] / r['params_dense']:.3f} | {r['val_nll']:.4f} | "
          f"{r['val_ppl']:.3f} | {r['ppl_change_pct']:+.2f}% |")
    uni = [r for r in recs if r["method"] == "uniform"]
    lo, hi = min(uni, key=lambda r: r["setting"]), max(uni, key=lambda r: r["setting"])
    within = [r for r in recs if r["ppl_change_pct"] <= 1.0]
    cheapest = min(within, key=lambda r: r["params_factored"]) if within else None
    lines += ["", f"Perplexity falls from {lo['val_ppl']:.3f} at rank fraction {lo['setting']:g} "
              f"to {hi['val_ppl']:.3f} at {hi['setting']:g} (float {base['val_ppl']:.3f})."]
    if cheapest:
      lines[-1] += (f" The fewest factored parameters within 1% of float: {cheapest['method']} "
                    f"{cheapest['setting']:g}, {cheapest['singular_values_kept']:.1%} of the "
                    f"singular values, {cheapest['params_factored']:,} vs "
                    f"{cheapest['params_dense']:,} dense ({cheapest['ppl_change_pct']:+.2f}%).")
  if "quant" in results:
    q = results["quant"]
    lines += ["", "## Perplexity vs quantization scheme", "",
              f"Symmetric absmax round-to-nearest of the {q['params_quantized']:,} parameters in "
              f"`{q['pattern']}` (of {q['params_total']:,}; the rest stay float32), scales stored "
              f"as {q['scale_dtype']} and counted in bits/param; dequantized on load.", "",
              "| scheme | bits/param | quantized bytes | model bytes | rel. weight error | "
              "val NLL | perplexity | PPL change |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in q["records"]:
      lines.append(f"| {r['scheme']} | {r['bits_per_param']:.3f} | {r['bytes']:,} | "
                   f"{r['model_bytes']:,} | {r['relative_error']:.4f} | {r['val_nll']:.4f} | "
                   f"{r['val_ppl']:.3f} | {r['ppl_change_pct']:+.2f}% |")
    by = {r["scheme"]: r for r in q["records"]}
    words = []
    if "int8-per_channel" in by:
      r = by["int8-per_channel"]
      words.append(f"int8 per-channel: perplexity {r['val_ppl']:.3f} vs float "
                   f"{base['val_ppl']:.3f} ({r['ppl_change_pct']:+.3f}%), "
                   f"{'within' if abs(r['ppl_change_pct']) <= 1.0 else 'NOT within'} 1% of float, "
                   f"at {r['bits_per_param']:.3f} bits/param ({32 / r['bits_per_param']:.1f}x "
                   "smaller).")
    int4 = [r for r in q["records"] if r["bits"] == 4]
    if int4:
      words.append("int4 RTN costs " + "; ".join(
          f"{r['scheme']} {r['ppl_change_pct']:+.2f}% perplexity ({r['val_nll'] - base['val_nll']:+.4f}"
          f" nats) at {r['bits_per_param']:.3f} bits/param" for r in int4) + ".")
    lines += [""] + words
  if "lora" in results:
    lo = results["lora"]
    lev = lo["evaluation"]
    lines += ["", "## LoRA transfer: quality vs rank", "",
              f"Pretrained on {ev['data']}, fine-tuned on {lo['target']}"
              + ("; changed: " + ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in
                                            lo["target_changes"].items()) + ";"
                 if lo.get("target_changes") else "")
              + f" for {lo['num_steps']} steps (the same batches for every run). LoRA adapts "
              f"`{lo['targets']}` with W + (alpha/r) a b, alpha = {lo['alpha']:g}; full fine-tuning trains all "
              f"{lo['params_total']:,} parameters.",
              f"Measured on the {_caption(lev)}.",
              "Target references: " + ", ".join(f"{k} {v:.4f} nats (ppl {information.perplexity(v):.3f})"
                                                 for k, v in lo["references"].items()) + ".", "",
              "| run | trainable params | % of full | adapted matrices' params / trainable | "
              "val NLL | perplexity |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in lo["runs"]:
      ratio = (f"{r['adapted_params'] / r['trainable_params']:.0f}x ({r['adapted_matrices']} "
               "matrices)" if r["kind"] == "lora" else "-")
      lines.append(f"| {r['name']} | {r['trainable_params']:,} | "
                   f"{100 * r['trainable_params'] / lo['params_total']:.2f}% | {ratio} | "
                   f"{r['val_nll']:.4f} | {r['val_ppl']:.3f} |")
    runs = {r["kind"]: r for r in lo["runs"] if r["kind"] != "lora"}
    none, full = runs["none"], runs["full"]
    gap = none["val_nll"] - full["val_nll"]
    loras = [r for r in lo["runs"] if r["kind"] == "lora"]
    if loras and gap > 0:
      lines += ["", "Share of full fine-tuning's NLL gain (no FT -> full FT, "
                f"{none['val_nll']:.4f} -> {full['val_nll']:.4f} nats) recovered: "
                + ", ".join(f"r={r['rank']} {(none['val_nll'] - r['val_nll']) / gap:.0%} "
                            f"with {r['trainable_params']:,} parameters" for r in loras) + "."]
      best = min(loras, key=lambda r: r["val_nll"])
      lines[-1] += (f" The best LoRA (r={best['rank']}, {best['val_nll']:.4f} nats) trains "
                    f"{full['trainable_params'] / best['trainable_params']:.0f}x fewer "
                    f"parameters than full fine-tuning and is "
                    f"{best['val_nll'] - full['val_nll']:+.4f} nats from it.")
    if "scratch" in runs:
      sc = runs["scratch"]
      lines += ["", f"The same architecture trained from scratch on the target for the same "
                f"{lo['num_steps']} steps reaches {sc['val_nll']:.4f} nats vs "
                f"{full['val_nll']:.4f} for full fine-tuning ({sc['val_nll'] - full['val_nll']:+.4f}"
                " nats; one seed each, so a gap of a few hundredths of a nat is within what a "
                "different seed or summation order can change)"]
      early = next((s for s, _ in sc["curve"] if s >= lo["num_steps"] / 4), None)
      if early is not None and early < lo["num_steps"]:
        at = lambda r: dict((s, v) for s, v in r["curve"])[early]
        lines[-1] += (f". At step {early} full fine-tuning is "
                      f"at {at(full):.4f} nats, " + ", ".join(
                          f"LoRA r={r['rank']} {at(r):.4f}" for r in loras)
                      + f", scratch {at(sc):.4f}.")
      else:
        lines[-1] += "."
  if "distill" in results:
    lines += _distill_markdown(results["distill"])
  lines += ["", f"Wall time: {results['wall_time_s']:.0f} s (" + ", ".join(
      f"{k} {v:.0f} s" for k, v in results["timings_s"].items()) + ")."]
  return "\n".join(lines) + "\n"


def _distill_markdown(d: dict) -> list[str]:
  summary = d["summary"]
  scratch = summary[SCRATCH]
  n_seeds = len(d["seeds"])
  lines = ["", "## Distillation vs training from scratch", "",
           f"Student {d['student_params']:,} parameters ({_model_words(d['student_model'])}), "
           f"teacher = the base model ({d['teacher_params']:,} parameters). For each of "
           f"{n_seeds} seeds (student initialization and batch order) every student starts from "
           f"the same initialization and sees the same {d['num_steps']} batches with the same "
           f"optimizer; distilled students minimize alpha T^2 KL(teacher_T || student_T) + "
           f"(1 - alpha) CE with alpha = {d['alpha']:g}, the scratch student CE alone (alpha = 0). "
           "Differences are paired by seed (same init, same batches).", "",
           "| model | alpha | T | val NLL, mean over seeds (min-max) | perplexity at mean NLL | "
           "NLL - scratch, per seed | mean NLL - scratch | seeds better than scratch |",
           "|---|---:|---:|---:|---:|---:|---:|---:|",
           f"| teacher ({d['teacher_params']:,} params) | - | - | {d['teacher']['val_nll']:.4f} | "
           f"{d['teacher']['val_ppl']:.3f} | - | - | - |"]
  for name, m in summary.items():
    if name == SCRATCH:
      temperature, per_seed, mean_diff, better = "-", "-", "-", "-"
    else:
      temperature = f"{m['temperature']:g}"
      per_seed = ", ".join(f"{x:+.4f}" for x in m["minus_scratch_per_seed"])
      mean_diff = f"{m['minus_scratch_mean']:+.4f}"
      better = f"{m['seeds_better_than_scratch']}/{n_seeds}"
    lines.append(f"| student, {name} | {m['alpha']:g} | {temperature} | {m['val_nll_mean']:.4f} "
                 f"({m['val_nll_min']:.4f}-{m['val_nll_max']:.4f}) | {m['val_ppl_mean']:.3f} | "
                 f"{per_seed} | {mean_diff} | {better} |")
  distilled = {k: v for k, v in summary.items() if k != SCRATCH}
  best_name = min(distilled, key=lambda k: distilled[k]["val_nll_mean"])
  best = distilled[best_name]
  reach = _steps_to_reach(list(zip(best["steps"], best["curve_mean"])),
                          scratch["val_nll_mean"])
  verdict = ("better than" if best["seeds_better_than_scratch"] == n_seeds
             else "worse than" if best["seeds_better_than_scratch"] == 0 else "mixed against")
  lines += ["", f"After {d['num_steps']} steps the best distilled student ({best_name}) is at "
            f"{best['val_nll_mean']:.4f} nats (mean of {n_seeds} seeds) vs "
            f"{scratch['val_nll_mean']:.4f} from scratch: {best['minus_scratch_mean']:+.4f} nats, "
            f"{verdict} scratch ({best['seeds_better_than_scratch']}/{n_seeds} seeds lower; "
            f"teacher {d['teacher']['val_nll']:.4f})"
            + (f"; its mean curve reached scratch's final loss by step {reach}."
               if reach is not None else ".")]
  others = [f"T={v['temperature']:g} {v['minus_scratch_mean']:+.4f} nats "
            f"({v['seeds_better_than_scratch']}/{n_seeds} seeds better)"
            for k, v in distilled.items() if k != best_name]
  if others:
    lines[-1] += " Other temperatures vs scratch: " + "; ".join(others) + "."
  return lines


def _model_words(m: dict) -> str:
  return f"{m['num_layers']} layer(s), d_model {m['d_model']}, {m['num_heads']} heads, d_ff {m['d_ff']}"


def write_results(workdir: str, results: dict):
  common.write_results(workdir, results, markdown(results))
  return plot_compression.plot_all(results, workdir)


def main(argv):
  del argv
  start = time.time()
  config = common.config_from_flags()
  workdir = common.prepare_workdir(config)
  studies = parse_studies(config.studies)
  base = prepare_base(config, workdir)
  config, dataset = base.config, base.dataset
  print(f"data: {dataset.description}; vocabulary {dataset.vocab_size}")
  check_config(config, dataset.vocab_size, studies)
  target = load_target(config, dataset) if "lora" in studies else None
  if base.params is None:
    train_base(base)
  timings = {"base model": time.time() - start}

  model = model_lib.Transformer(train_lib.model_config(config, dataset.vocab_size))
  windows = train_lib.validation_windows(config, dataset)
  evaluate = _evaluator(config, model, windows)
  float_nll = evaluate(base.params)
  print(f"base model: val nll {float_nll:.4f} nats, ppl {information.perplexity(float_nll):.3f}")
  results = {
      "experiment": "compression",
      "data": dataset.description,
      "evaluation": describe_windows(config, dataset, windows),
      "references": reference_nlls(dataset, windows),
      "base": {"origin": base.origin, "step": base.step, "model": dict(config.model),
               "params": flops_lib.count_params(base.params), **_nll_record(float_nll)},
  }
  for study in studies:
    t0 = time.time()
    if study == "svd":
      results["svd"] = svd_study(config, base.params, evaluate, float_nll)
    elif study == "quant":
      results["quant"] = quant_study(config, base.params, evaluate, float_nll)
    elif study == "lora":
      results["lora"] = lora_study(config, base, model, target)
    else:
      results["distill"] = distill_study(config, base, model, windows, float_nll)
    timings[study] = time.time() - t0
  results["timings_s"] = timings
  results["wall_time_s"] = time.time() - start
  results["config"] = json.loads(config.to_json_best_effort())
  if common.is_primary():
    figures = write_results(workdir, results)
    print(markdown(results))
    print(f"wrote {os.path.join(workdir, 'results.json')}, results.md, {', '.join(figures)} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
  common.run(main, "compression.py")
