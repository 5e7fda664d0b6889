r"""Perplexity of a Transformer LM against honest baselines and, on the synthetic source, the exact floor.

PPL = exp(mean NLL). Every model and baseline is scored on the same validation tokens with the same
context per token, and results say which (split, tokens scored, context).

  python -m experiments.perplexity --workdir=/tmp/ppl                    # embedded synthetic source
  python -m experiments.perplexity --workdir=/tmp/shakespeare \
      --config=experiments/configs/tinyshakespeare_cpu.py --data=text:../shared/data/tinyshakespeare.txt

Writes to --workdir: results.json (one record per model or baseline, the evaluation protocol and the
config), results.md (the table), perplexity.png, metrics.jsonl, checkpoints/.
"""

import json
import math
import os
import sys
import time

import jax
import numpy as np

from experiments import common
from llm_math import data as data_lib
from llm_math import information
from llm_math import plotting
from llm_math import train as train_lib

_CONFIG = common.define_config("perplexity.py")


def _record(name, kind, nll, n_tokens, n_chars, **extra):
  return {"name": name, "kind": kind, "val_nll_nats": float(nll),
          "val_ppl": information.perplexity(nll), "bits_per_token": information.nats_to_bits(nll),
          "bits_per_char": information.bits_per_char(nll, n_tokens, n_chars), **extra}


def baseline_records(dataset: data_lib.Dataset, windows: data_lib.EvalWindows) -> list[dict]:
  """Uniform (PPL = |V|), add-one unigram, and for the synthetic source its exact floor."""
  scored = windows.weights_NxT > 0
  targets = windows.targets_NxT[scored]
  n_tokens = len(targets)
  n_chars = int(dataset.tokenizer.char_lengths[targets].sum())
  v = dataset.vocab_size
  counts = np.bincount(dataset.train_ids, minlength=v) + 1.0
  unigram_nll = float(-np.mean(np.log(counts[targets] / counts.sum())))
  records = [
      _record("uniform", "baseline", math.log(v), n_tokens, n_chars, params=0),
      _record("unigram (add-one)", "baseline", unigram_nll, n_tokens, n_chars, params=v - 1),
  ]
  source = dataset.source
  if source is not None:
    floor = source.conditional_nll(dataset.val_ids, windows.positions_NxT[scored],
                                   windows.context_NxT[scored]).mean()
    records.append(_record("floor (true model, same context)", "floor", floor, n_tokens, n_chars,
                           params=0))
    records.append(_record("entropy_rate (true model, unlimited context)", "floor",
                           source.entropy_rate(), n_tokens, n_chars, params=0))
  return records


def markdown_table(results: dict) -> str:
  floor = next((r["val_nll_nats"] for r in results["records"] if r["name"].startswith("floor")), None)
  ev = results["evaluation"]
  lines = [
      f"# Perplexity: {results['data']}", "",
      f"Measured on the {plotting.measurement_caption(ev)}; {ev['chars_scored']:,} characters.", "",
      "| model | params | val NLL (nats/token) | perplexity | bits/token | bits/char |"
      + (" NLL - floor |" if floor is not None else ""),
      "|---|---:|---:|---:|---:|---:|" + ("---:|" if floor is not None else ""),
  ]
  for r in results["records"]:
    row = (f"| {r['name']} | {r['params']:,} | {r['val_nll_nats']:.4f} | {r['val_ppl']:.3f} | "
           f"{r['bits_per_token']:.4f} | {r['bits_per_char']:.4f} |")
    if floor is not None:
      row += f" {r['val_nll_nats'] - floor:+.4f} |"
    lines.append(row)
  for r in results["records"]:
    if r["kind"] == "model":
      lines += ["", f"{r['name']}: {r['train_steps']} steps, {r['train_tokens']:,} training tokens, "
                f"{r['flops_per_token']:.3g} FLOPs/token (6N + 12LTd), {r['train_flops']:.3g} "
                f"training FLOPs, {r['tokens_per_s']:,.0f} tokens/s, {r['wall_time_s']:.0f} s wall."]
  return "\n".join(lines) + "\n"


def write_results(workdir: str, results: dict):
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown_table(results))
  plotting.plot_perplexity(results, os.path.join(workdir, "perplexity.png"))


def main(argv):
  del argv
  start = time.time()
  config = common.config_from_flags(_CONFIG)
  workdir = common.prepare_workdir(config)
  dataset = data_lib.load(
      config.data, tokenizer=config.tokenizer, vocab_size=config.vocab_size or None,
      seed=config.seed, synthetic_config=config.synthetic,
      tfds_data_dir=config.tfds_data_dir or None, max_chars=config.max_chars or None,
      workdir=workdir)
  data_lib.check_fits(dataset, config.seq_len)
  print(f"data: {dataset.description}; vocabulary {dataset.vocab_size}; "
        f"{len(dataset.train_ids):,} training / {len(dataset.val_ids):,} validation tokens")
  print(f"devices: {jax.device_count()} {jax.devices()[0].platform} in {jax.process_count()} "
        f"process(es), this is process {jax.process_index()}; mesh {config.mesh}")
  windows = train_lib.validation_windows(config, dataset)
  records = baseline_records(dataset, windows)
  for r in records:
    print(f"  {r['name']:48s} {r['val_nll_nats']:.4f} nats  ppl {r['val_ppl']:.3f}")

  result = train_lib.train(config, dataset, workdir, windows=windows,
                           log=print if common.is_primary() else lambda *_: None)
  if result.interrupted:
    sys.exit(130)
  scored = windows.weights_NxT > 0
  n_tokens = int(scored.sum())
  n_chars = int(dataset.tokenizer.char_lengths[windows.targets_NxT[scored]].sum())
  final_nll = result.val_curve[-1][1]
  train_tokens = result.final_step * config.batch_size * config.seq_len
  records.append(_record(
      "transformer", "model", final_nll, n_tokens, n_chars, params=result.params,
      flops_per_token=result.flops_per_token, train_steps=result.final_step,
      train_tokens=train_tokens, train_flops=result.flops_per_token * train_tokens,
      tokens_per_s=result.tokens_per_second, wall_time_s=time.time() - start))
  results = {
      "experiment": "perplexity",
      "data": dataset.description,
      "evaluation": {"split": "validation", **windows.describe(), "chars_scored": n_chars,
                     "stride": config.eval_stride or config.seq_len, "seq_len": config.seq_len},
      "records": records,
      "curves": {"transformer": {"step": [s for s, _ in result.val_curve],
                                 "val_nll": [v for _, v in result.val_curve]}},
      "config": json.loads(config.to_json_best_effort()),
  }
  if common.is_primary():
    write_results(workdir, results)
    print(markdown_table(results))
    print(f"wrote {os.path.join(workdir, 'results.json')}, results.md, perplexity.png "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
  common.run(main)
