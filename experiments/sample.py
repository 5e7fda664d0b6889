r"""Text from a trained model: sampling with a key/value cache, its entropy and its speed.

  python -m experiments.sample --workdir=/tmp/shakespeare_cpu --prompt="ROMEO:" --num_tokens=500 \
      --temperature=0.8 --top_k=40 --seed=0

Loads the latest checkpoint of a training run (e.g. of experiments.perplexity) and draws
--num_samples continuations of --prompt from the model (`llm_math.sampling_session`): each token
from temperature -> top-k -> top-p filtered conditionals (`llm_math.analysis.sampling`;
--temperature=0 is greedy). Prints the text, the mean entropy per token of the distributions
actually sampled from, and the speed in generated tokens/s with the key/value cache and
(--compare_cache, on by default) without it, after compilation; both paths use the same key and must
give the same tokens. The model sees at most its training context W; longer generations follow the
context rule of `llm_math.generate` (when the window is full keep its last W/2 tokens and re-read
them). Writes nothing to --workdir; --output=FILE.json saves everything printed. --seed (default 0)
seeds the sampling key; the other shared flags (--data, --tokenizer, --vocab_size, --tfds_data_dir,
--mesh) are refused with an error, since the run in --workdir fixes its data and tokenizer and
generation runs on one device.

For a run on the synthetic source, --prompt is a list of token ids ("3 1 4").
"""

from absl import flags

from experiments import common
from llm_math import studies
from llm_math import files
from llm_math import sampling_session
from llm_math.errors import UsageError

PROMPT = flags.DEFINE_string("prompt", "\n",
                             "Text the samples continue (token ids for synthetic runs).")
NUM_TOKENS = flags.DEFINE_integer("num_tokens", 500, "New tokens per sample.")
TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy.")
TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens (default: all).")
TOP_P = flags.DEFINE_float("top_p", None,
                           "Keep the smallest set with probability >= p (default: 1).")
NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Independent samples (a batch).")
COMPARE_CACHE = flags.DEFINE_bool("compare_cache", True,
                                  "Also generate without the cache: speed and identical tokens.")
OUTPUT = flags.DEFINE_string("output", None, "Optional JSON file for the samples and numbers.")

# Shared flags (experiments/common.py) that sampling from a finished run has no use for, and why.
UNUSED_FLAGS = (
    (common.DATA, "the data comes from the run in --workdir"),
    (common.TOKENIZER, "the tokenizer is the one saved in --workdir"),
    (common.VOCAB_SIZE, "the vocabulary is the one saved in --workdir"),
    (common.TFDS_DATA_DIR, "no dataset is read, only the run in --workdir"),
    (common.MESH, "generation runs on one device"),
)


def main(argv):
  del argv
  common.reject_unused_flags(UNUSED_FLAGS, "sample.py")
  record = sampling_session.sample(
      common.WORKDIR.value, PROMPT.value, num_tokens=NUM_TOKENS.value,
      num_samples=NUM_SAMPLES.value, seed=common.SEED.value if common.SEED.value is not None else 0,
      temperature=TEMPERATURE.value, top_k=TOP_K.value, top_p=TOP_P.value,
      compare_cache=COMPARE_CACHE.value, log=print)
  if OUTPUT.value and studies.is_primary():
    try:
      files.write_json(OUTPUT.value, record, indent=2)  # Strict JSON: an infinite tokens/s is null.
    except OSError as e:
      raise UsageError(f"--output={OUTPUT.value}: cannot write ({e.strerror or e})") from None
    print(f"wrote {OUTPUT.value}")
  if record["identical_with_and_without_cache"] is False:
    raise SystemExit("error: cached and uncached generation gave different tokens")


if __name__ == "__main__":
  common.run(main)
