"""Perplexity of Transformer LMs against honest baselines and, on the synthetic source, the floor.

PPL = exp(mean NLL). For each tokenizer of the config (config.tokenizers, '' = config.tokenizer)
the study scores, on the same validation tokens with the same context per token: the reference
models of `evaluation.reference_nlls` (uniform, add-one unigram and, on the synthetic source, the
true model), n-gram models counted on the training split (`llm_math.analysis.ngram`), and one
Transformer per size of config.model_sizes ('' = the config's model), each trained (or resumed) by
`train.train`. Every row is a record (`record`): NLL in nats/token, perplexity, bits/token,
bits/char and bits per UTF-8 byte, which put different tokenizers on one scale. With 3 or more sizes, power laws L(N) and
L(C) are fitted over the models of each tokenizer (`fit_scaling`).

A sweep (several sizes or tokenizers) keeps each tokenizer's data in tokenizers/<tokenizer>/ and
each model in models/<tokenizer>/d<D>_L<L>/, a run of its own (`studies.run_dir`); a single model
trains in the workdir itself.
"""

import json
import os
import time
from typing import NamedTuple

import jax

from llm_math import data as data_lib
from llm_math import evaluation
from llm_math import files
from llm_math import studies
from llm_math import train as train_lib
from llm_math.studies import seeds as seeds_lib
from llm_math.analysis import information
from llm_math.analysis import intervals
from llm_math.analysis import ngram
from llm_math.analysis import scaling_laws
from llm_math.errors import UsageError
from llm_math.reports.perplexity import ngram_caption

# The rows of `evaluation.reference_nlls`: its key -> (record name, kind).
REFERENCE_ROWS = {"uniform": ("uniform", "baseline"),
                  "unigram": ("unigram (add-one)", "baseline"),
                  "floor": ("floor (true model, same context)", "floor"),
                  "entropy_rate": ("entropy_rate (true model, unlimited context)", "floor")}


def parse_model_sizes(text: str) -> list[tuple[int, int]]:
  """config.model_sizes '64x2,128x4' -> [(64, 2), (128, 4)] (d_model, layers); '' -> [] (the
  config's model)."""
  sizes = []
  for item in filter(None, (s.strip() for s in str(text).split(","))):
    d, _, layers = item.partition("x")
    if not (d.isdigit() and layers.isdigit() and int(d) > 0 and int(layers) > 0):
      raise UsageError(f"--config.model_sizes={text!r} (--model_sizes): expected 'DxL,...' such as "
                       "'64x2,128x4'")
    sizes.append((int(d), int(layers)))
  return sizes


def parse_tokenizers(text: str, default_kind: str, default_vocab: int) -> list[tuple[str, int]]:
  """config.tokenizers 'char,sentencepiece:1000' -> [('char', 0), ('sentencepiece', 1000)];
  '' -> [(default_kind, default_vocab)]."""
  if not text:
    return [(default_kind, default_vocab)]
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    kind, _, vocab = item.partition(":")
    if vocab and not vocab.isdigit():
      raise UsageError(f"--config.tokenizers={text!r} (--tokenizers): expected "
                       "KIND[:VOCAB_SIZE],...")
    out.append((kind, int(vocab or 0)))
  return out


def tokenizer_name(kind: str, vocab_size: int) -> str:
  """How records and directories name a tokenizer: 'sentencepiece:1000', 'char', 'byte'."""
  return f"{kind}:{vocab_size}" if kind == "sentencepiece" else kind


def ngram_orders(ngram_config) -> list[int]:
  """config.ngram.orders '1,3,5' -> [1, 3, 5] (each >= 1)."""
  text = ngram_config.orders
  try:
    values = [int(x) for x in str(text).split(",") if x.strip()]
  except ValueError:
    raise UsageError(f"--config.ngram.orders={text!r} (--ngram_orders): expected comma-separated "
                     "integers") from None
  if any(v < 1 for v in values):
    raise UsageError(f"--config.ngram.orders={text!r} (--ngram_orders): values must be >= 1")
  return values


def ngram_methods(ngram_config) -> list[str]:
  """config.ngram.methods 'kneser_ney,add_k' -> ['kneser_ney', 'add_k'] (each in ngram.METHODS)."""
  methods = [m for m in str(ngram_config.methods).split(",") if m]
  for method in methods:
    if method not in ngram.METHODS:
      raise UsageError(f"--config.ngram.methods: {method!r} is not one of {ngram.METHODS}")
  return methods


def ngram_train_tokens(num_train_tokens: int, ngram_config) -> int:
  """How many training tokens (the first) the n-grams are counted on: all, or at most
  ngram.max_train_tokens (0 = all)."""
  cap = ngram_config.get("max_train_tokens", 0)
  if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
    raise UsageError(f"--config.ngram.max_train_tokens={cap!r}: expected an integer >= 0 (0 = all)")
  return min(num_train_tokens, cap) if cap else num_train_tokens


def check(config):
  """The study's fields beyond `train.check_config`: model sizes, tokenizers and the n-grams; a
  one-line UsageError naming the field otherwise."""
  parse_model_sizes(config.model_sizes)
  parse_tokenizers(config.tokenizers, config.tokenizer, config.vocab_size)
  ngram_methods(config.ngram)
  ngram_orders(config.ngram)
  ngram_train_tokens(0, config.ngram)
  studies.fit_bootstrap(config)


def is_sweep(config) -> bool:
  """Several model sizes or tokenizers: each model and each tokenizer's data get directories of
  their own under the workdir."""
  return (len(parse_tokenizers(config.tokenizers, config.tokenizer, config.vocab_size)) > 1
          or len(parse_model_sizes(config.model_sizes)) > 1)


def size_config(config, size: tuple[int, int] | None):
  """The config of one size (d_model, layers) of the sweep: d_ff = 4 d_model, and the config's head
  count, or the largest below it that divides d_model. None: the config itself."""
  if size is None:
    return config
  d_model, layers = size
  heads = config.model.num_heads
  if d_model % heads:
    heads = max(h for h in range(1, heads + 1) if d_model % h == 0)
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.update(d_model=d_model, num_layers=layers, num_heads=heads, d_ff=4 * d_model)
  return c


def model_name(size: tuple[int, int] | None, tokenizer: str, several_tokenizers: bool) -> str:
  """'transformer', 'transformer d64 L2', 'transformer d64 L2 [char]'."""
  return ("transformer" + (f" d{size[0]} L{size[1]}" if size else "")
          + (f" [{tokenizer}]" if several_tokenizers else ""))


class Scored(NamedTuple):
  """What a validation score covers: tokens, and the characters and UTF-8 bytes of their text."""
  tokens: int
  chars: int
  bytes: int


def record(name: str, kind: str, nll: float, scored: Scored, tokenizer: str, **extra) -> dict:
  """One row of the results: a model's mean NLL (nats/token) on the `scored` tokens, with its
  perplexity, bits/token, bits/char and bits/byte; `extra` fields added."""
  return {"name": name, "kind": kind, "tokenizer": tokenizer, "val_nll_nats": float(nll),
          "tokens_scored": scored.tokens, "val_ppl": information.perplexity(nll),
          "bits_per_token": information.nats_to_bits(nll),
          "bits_per_char": information.bits_per_char(nll, scored.tokens, scored.chars),
          "bits_per_byte": information.bits_per_byte(nll, scored.tokens, scored.bytes), **extra}


def scored_counts(dataset, windows) -> Scored:
  """The tokens scored by `windows` of the validation split, with their characters and bytes."""
  positions, _ = windows.scored()
  ids = dataset.val_ids[positions]
  tok = dataset.tokenizer
  return Scored(len(positions), int(tok.char_lengths[ids].sum()), int(tok.byte_lengths[ids].sum()))


def reference_records(dataset, windows, tokenizer: str) -> list[dict]:
  """The records of `evaluation.reference_nlls` (REFERENCE_ROWS): uniform (PPL = |V|), the add-one
  unigram (|V| - 1 parameters) and, for the synthetic source, its floor and entropy rate."""
  scored = scored_counts(dataset, windows)
  params = {"unigram": dataset.vocab_size - 1}
  return [record(*REFERENCE_ROWS[key], nll, scored, tokenizer, params=params.get(key, 0))
          for key, nll in evaluation.reference_nlls(dataset, windows).items()]


def ngram_records(dataset, windows, tokenizer: str, ngram_config) -> list[dict]:
  """The n-gram models of config.ngram, scored on the tokens `windows` score.

  They are counted once, at their highest order, on the first `ngram_train_tokens` training tokens,
  and record that number as train_tokens. Each is scored twice: with each token's context capped as
  in `windows` (equal terms) or, with ngram.window = W > 0, as in independent windows of W tokens
  over the same stream (the validation split up to eval_max_tokens); and with the full left context
  of the validation stream.
  """
  positions, contexts = windows.scored()
  scored = scored_counts(dataset, windows)
  if ngram_config.window:
    # The same positions, each with the context it has in windows of W over the Transformer's stream
    # (one window when the stream is shorter: no reset within it).
    reset = data_lib.eval_windows(windows.ids, min(ngram_config.window, len(windows.ids) - 1))
    contexts_w = reset.context_at(positions)
    equal = f"context reset every {ngram_config.window}"
  else:
    contexts_w, equal = contexts, "Transformer's windows"
  methods, orders = ngram_methods(ngram_config), ngram_orders(ngram_config)
  fit_tokens = ngram_train_tokens(len(dataset.train_ids), ngram_config)
  counts = (ngram.count(dataset.train_ids[:fit_tokens], dataset.vocab_size, max(orders))
            if methods and orders else None)
  records = []
  for method in methods:
    label = "KN" if method == ngram.KNESER_NEY else f"add-{ngram_config.add_k:g}"
    for order in orders:
      model = ngram.smooth(counts, order, method, k=ngram_config.add_k)
      table_size = int(sum(k.size for k in model.ngram_keys))
      for context, ctx in ((equal, contexts_w), ("full left context", positions)):
        nll_M = ngram.score_at(model, dataset.val_ids, positions, ctx)
        records.append(record(f"{label} {order}-gram ({context})", "ngram", nll_M.mean(),
                              scored, tokenizer, params=table_size, method=method,
                              order=order, train_tokens=fit_tokens,
                              context="full" if context.startswith("full") else "equal"))
  return records


def baseline_records(dataset, windows, tokenizer: str, ngram_config) -> list[dict]:
  """Every record but the Transformers', all on the tokens `windows` score: uniform and unigram,
  the n-grams (`ngram_records`), then (synthetic source) the floor and the entropy rate."""
  references = reference_records(dataset, windows, tokenizer)
  grams = ngram_records(dataset, windows, tokenizer, ngram_config)
  return ([r for r in references if r["kind"] == "baseline"] + grams
          + [r for r in references if r["kind"] != "baseline"])


def train_models(config, dataset, windows, tokenizer: str, workdir: str, sweep: bool,
                 log=print) -> tuple[list, dict]:
  """Trains (or reuses) one Transformer per size of config.model_sizes, in models/<tokenizer>/
  d<D>_L<L>/ of `workdir` when `sweep`, else in `workdir`; returns (records, {name: curve}), a
  curve being the validation NLL at each evaluation step with its elapsed training time."""
  scored = scored_counts(dataset, windows)
  several_tokenizers = len(parse_tokenizers(config.tokenizers, "", 0)) > 1
  records, curves = [], {}
  for size in parse_model_sizes(config.model_sizes) or [None]:
    cfg = size_config(config, size)
    name = model_name(size, tokenizer, several_tokenizers)
    run_dir = (studies.run_dir(cfg, workdir, "models", tokenizer.replace(":", "_"),
                               f"d{cfg.model.d_model}_L{cfg.model.num_layers}")
               if sweep else workdir)
    log(f"--- {name}: {run_dir}")
    result = studies.completed(train_lib.train(cfg, dataset, run_dir, windows=windows, log=log))
    train_tokens = result.final_step * cfg.batch_size * cfg.seq_len
    records.append(record(
        name, "model", result.val_curve[-1][1], scored, tokenizer,
        params=result.params, d_model=cfg.model.d_model, num_layers=cfg.model.num_layers,
        flops_per_token=result.flops_per_token, train_steps=result.final_step,
        train_tokens=train_tokens, train_flops=result.flops_per_token * train_tokens,
        tokens_per_s=result.tokens_per_second, wall_time_s=result.train_time_s))
    curves[name] = {"step": [s for s, _ in result.val_curve],
                    "val_nll": [v for _, v in result.val_curve],
                    "elapsed_s": result.val_elapsed_s, "tokenizer": tokenizer}
  return records, curves


def fit_scaling(records: list[dict], bootstrap: int = 0, seed: int = 0) -> dict:
  """{tokenizer: {"params": fit, "compute": fit}}: L(N) and L(C) power laws
  (`scaling_laws.power_law_record`: a, alpha, c, rms_log_residual, and with `bootstrap` > 0 their
  percentile-bootstrap 95% intervals over resampled models, ci95, with a note on what makes a fit
  doubtful) over the model records of each tokenizer with at least 3 distinct parameter counts."""
  fits = {}
  for tokenizer in sorted({r["tokenizer"] for r in records if r["kind"] == "model"}):
    models = [r for r in records if r["kind"] == "model" and r["tokenizer"] == tokenizer]
    if len({r["params"] for r in models}) < 3:
      continue
    loss = [r["val_nll_nats"] for r in models]
    fits[tokenizer] = {
        axis: scaling_laws.power_law_record([r[key] for r in models], loss, bootstrap=bootstrap,
                                            seed=seed)
        for axis, key in (("params", "params"), ("compute", "train_flops"))}
  return fits


def paired_comparisons(results: dict) -> list[dict]:
  """Paired comparisons over the seeds of a multi-seed aggregate (`seeds.run_seeds`), per tokenizer:
  each model against the next smaller one, against the best count-based model with at most the
  models' context (lowest mean NLL of those n-grams and the unigram) and against the floor on the synthetic source. Each is {'tokenizer',
  'a', 'b', 'field': 'val_nll_nats', and `intervals.paired_ci95` of a - b: 'mean', 'ci95', 'n',
  'below' (seeds on which a scored lower)}."""
  n = results["n_seeds"]
  out = []
  for tokenizer in results["evaluations"]:
    recs = [r for r in results["records"] if r["tokenizer"] == tokenizer]
    models = sorted((r for r in recs if r["kind"] == "model"), key=lambda r: r["params"])
    counted = [r for r in recs if r["kind"] in ("ngram", "baseline") and r["params"]
               and r.get("context") != "full"]  # On equal terms: at most the models' context.
    pairs = list(zip(models[1:], models[:-1]))
    if counted:
      best = min(counted, key=lambda r: r["val_nll_nats"])
      pairs += [(m, best) for m in models]
    pairs += [(m, r) for m in models for r in recs if r["name"].startswith("floor")]
    for a, b in pairs:
      stat = intervals.paired_ci95(seeds_lib.per_seed_values(a, "val_nll_nats", n),
                                   seeds_lib.per_seed_values(b, "val_nll_nats", n))
      out.append({"tokenizer": tokenizer, "a": a["name"], "b": b["name"],
                  "field": "val_nll_nats", **stat})
  return out


def summarize_seeds(results: dict, per_seed: list[dict] | None = None) -> dict:
  """A multi-seed aggregate with its paired comparisons (`paired_comparisons`) and the power laws
  refitted on every (model, seed) point (`fit_scaling`: the bootstrap resamples those points), in
  place of the mean of each seed's fitted parameters, which is no fit of anything. (The aggregate's
  `per_seed` lists suffice: `per_seed` results are not read.)"""
  del per_seed
  n = results["n_seeds"]
  pooled = seeds_lib.pooled([r for r in results["records"] if r["kind"] == "model"],
                            "val_nll_nats", n)
  bootstrap = results["config"].get("fit_bootstrap", 0)
  fits = fit_scaling(pooled, bootstrap, seed=0)
  for fit in fits.values():
    for f in fit.values():
      f["points"] = f"{len(pooled)} points: each model on each of {n} seeds"
  return {**results, "paired": paired_comparisons(results), "power_law": fits}


def run(config, workdir: str, log=print) -> dict:
  """Scores the baselines and trains (or reuses) the models of every tokenizer; the results
  (evaluations per tokenizer, records, curves, power_law; see the module docstring)."""
  check(config)
  sweep = is_sweep(config)
  log(f"devices: {jax.device_count()} {jax.devices()[0].platform} in {jax.process_count()} "
      f"process(es), this is process {jax.process_index()}; mesh {config.mesh}")
  results = {"experiment": "perplexity", "evaluations": {}, "records": [], "curves": {}}
  for kind, vocab_size in parse_tokenizers(config.tokenizers, config.tokenizer, config.vocab_size):
    tokenizer = tokenizer_name(kind, vocab_size)
    tok_dir = os.path.join(workdir, "tokenizers", tokenizer.replace(":", "_")) if sweep else workdir
    files.path(tok_dir).mkdir(parents=True, exist_ok=True)
    dataset = studies.load_dataset(config, tok_dir, tokenizer=kind, vocab_size=vocab_size)
    if dataset.source is not None:
      tokenizer = "synthetic"
    log(f"data: {dataset.description}; tokenizer {tokenizer}, vocabulary {dataset.vocab_size}; "
        f"{len(dataset.train_ids):,} training / {len(dataset.val_ids):,} validation tokens")
    windows = evaluation.validation_windows(config, dataset.val_ids)
    train_tokens = {"train_tokens": len(dataset.train_ids),
                    "ngram_train_tokens": ngram_train_tokens(len(dataset.train_ids), config.ngram)}
    start = time.time()
    records = baseline_records(dataset, windows, tokenizer, config.ngram)
    for r in records:
      log(f"  {r['name']:58s} {r['val_nll_nats']:.4f} nats  {r['bits_per_char']:.4f} bits/char")
    grams = (f"; {ngram_caption(train_tokens)}" if any(r["kind"] == "ngram" for r in records)
             else "")
    log(f"  (baselines and n-grams: {time.time() - start:.1f} s{grams})")
    if config.train_transformer:
      model_records, curves = train_models(config, dataset, windows, tokenizer, workdir, sweep, log)
      records += model_records
      results["curves"].update(curves)
    scored = scored_counts(dataset, windows)
    results["evaluations"][tokenizer] = {
        "split": "validation", **windows.describe(), "vocab_size": dataset.vocab_size,
        "chars_scored": scored.chars, "bytes_scored": scored.bytes,
        "stride": config.eval_stride or config.seq_len, "seq_len": config.seq_len, **train_tokens}
    results["records"] += records
    results["data"] = dataset.description.split(" (")[0] if sweep else dataset.description
  results["power_law"] = fit_scaling(results["records"], studies.fit_bootstrap(config),
                                       config.seed)
  results["config"] = json.loads(config.to_json_best_effort())
  return results
