r"""What a trained Transformer LM loses under compression: low rank (SVD), quantization, LoRA and
distillation (`llm_math.studies.compression`).

From one base model (trained here in WORKDIR/base, or the run in --init_workdir), scored on the
validation windows of its own run:

  python -m experiments.compression --workdir=/tmp/compression          # synthetic, ~5 min on 2 cores
  python -m experiments.compression --workdir=/tmp/cmp --init_workdir=/tmp/llm_math_ppl
  python -m experiments.compression --workdir=/tmp/cmp_text \
      --data=text:../shared/data/english_pd.txt --tokenizer=byte --config.max_chars=2000000 \
      --config.lora.target_data=text:../shared/data/tinyshakespeare.txt

The LoRA transfer needs one vocabulary for both sources: by default the synthetic lagged-copy source
with lag 16 and Zipf exponent 1.0 -> lag 12 and Zipf 1.5 (V=32 both); with corpora, a byte-level
tokenizer (or a char tokenizer when both corpora have the same alphabet). The study resumes after
preemption: rerun the same command. Writes results.json (every number with how it was measured, the
headline numbers, the config), results.md (`llm_math.reports.compression`) and svd.png, quant.png,
lora.png, distill.png (`llm_math.figures.compression`) to --workdir; `python -m experiments.redraw
--workdir=DIR` redraws both from results.json alone.
"""

import functools

from absl import flags

from experiments import common
from llm_math import studies
from llm_math.studies import compression

INIT_WORKDIR = flags.DEFINE_string(
    "init_workdir", None, "A finished training run (e.g. of experiments.perplexity) whose model to "
    "compress; default: train the config's model in WORKDIR/base.")


def main(argv):
  del argv
  config = common.config_from_flags()
  compression.check(config)
  workdir = common.prepare_workdir(config)
  studies.use_compilation_cache(workdir)
  # With --init_workdir, the data flags the command line set must agree with that run's.
  overrides = {flag.name: flag.value for flag in (common.DATA, common.TOKENIZER, common.VOCAB_SIZE,
                                                  common.SEED) if flag.value is not None}
  common.run_study(functools.partial(compression.run, init_workdir=INIT_WORKDIR.value,
                                     overrides=overrides), config, workdir)


if __name__ == "__main__":
  common.run(main, "compression.py")
