r"""Perplexity of Transformer LMs against honest baselines and, on the synthetic source, the exact floor
(`llm_math.studies.perplexity`).

PPL = exp(mean NLL). Every model and baseline of a tokenizer is scored on the same validation tokens
with the same context per token, and results say which (split, tokens scored, context). Bits per
character put different tokenizers on one scale.

  python -m experiments.perplexity --workdir=/tmp/ppl                    # embedded synthetic source
  python -m experiments.perplexity --workdir=/tmp/shakespeare \
      --config=experiments/configs/tinyshakespeare_cpu.py --data=text:../shared/data/tinyshakespeare.txt
  # n-gram table only, orders 1..8:
  python -m experiments.perplexity --workdir=/tmp/ngrams --data=text:../shared/data/tinyshakespeare.txt \
      --train_transformer=false --ngram_orders=1,2,3,4,5,6,7,8
  # model-size sweep with a fitted power law L(N) = a N^-alpha + c:
  python -m experiments.perplexity --workdir=/tmp/sizes --config=experiments/configs/size_sweep.py

Sweeps: --model_sizes=64x2,128x4 (d_model x layers), --tokenizers=char,sentencepiece:1000 (each
tokenizer gets its own baselines, n-grams and models). Writes to --workdir: results.json, results.md
(`llm_math.reports.perplexity`), figures (perplexity.png, loss_vs_time.png, ngram_orders.png,
scaling.png: `llm_math.figures.perplexity`), and per model metrics.jsonl + checkpoints/ (in
models/<tokenizer>/<size>/ when sweeping); `python -m experiments.redraw --workdir=DIR` redraws the
figures and results.md from results.json alone.
"""

from absl import flags

from experiments import common
from llm_math.studies import perplexity

NGRAM_ORDERS = flags.DEFINE_string("ngram_orders", None, "n-gram orders, e.g. '1,3,5,7'.")
NGRAM_WINDOW = flags.DEFINE_integer(
    "ngram_window", None, "Reset n-gram context every W tokens (0: the Transformer's windows).")
TRAIN_TRANSFORMER = flags.DEFINE_bool("train_transformer", None, "Train the Transformer(s).")
MODEL_SIZES = flags.DEFINE_string("model_sizes", None, "Model sizes 'DxL,...' (d_model x layers).")
TOKENIZERS = flags.DEFINE_string(
    "tokenizers", None, "Tokenizers to compare, e.g. 'char,sentencepiece:1000,sentencepiece:4000'.")


def _apply_sweep_flags(config):
  """The shortcut flags above, written into their config fields."""
  with config.unlocked():
    for flag, field in ((NGRAM_ORDERS, "orders"), (NGRAM_WINDOW, "window")):
      if flag.value is not None:
        config.ngram[field] = flag.value
    for flag, field in ((TRAIN_TRANSFORMER, "train_transformer"), (MODEL_SIZES, "model_sizes"),
                        (TOKENIZERS, "tokenizers")):
      if flag.value is not None:
        config[field] = flag.value


def main(argv):
  del argv
  config = common.config_from_flags()
  _apply_sweep_flags(config)
  perplexity.check(config)
  workdir = common.prepare_workdir(config)
  common.run_study(perplexity.run, config, workdir, perplexity.summarize_seeds)


if __name__ == "__main__":
  common.run(main, "perplexity.py")
