r"""Text from a trained model: sampling with a key/value cache, its entropy and its speed.

  python -m experiments.sample --workdir=/tmp/shakespeare_cpu --prompt="ROMEO:" --num_tokens=500 \
      --temperature=0.8 --top_k=40 --seed=0

Loads the latest checkpoint of a training run (e.g. of experiments.perplexity) and draws
--num_samples continuations of --prompt from the model: each token from temperature -> top-k ->
top-p filtered conditionals (`llm_math.analysis.sampling`; --temperature=0 is greedy). Prints the text, the
mean entropy per token of the distributions actually sampled from, and the speed in generated
tokens/s with the key/value cache and (--compare_cache, on by default) without it, after
compilation; both paths use the same key and must give the same tokens. The model sees at most its
training context W; longer generations follow the context rule of `llm_math.generate` (when the
window is full keep its last W/2 tokens and re-read them). Writes nothing to --workdir;
--output=FILE.json saves everything printed. --seed (default 0) seeds the sampling key; the other
shared flags (--data, --tokenizer, --vocab_size, --tfds_data_dir, --mesh) are refused with an error,
since the run in --workdir fixes its data and tokenizer and generation runs on one device.

For a run on the synthetic source, --prompt is a list of token ids ("3 1 4").
"""

import math
import time

import jax
import numpy as np
from absl import flags
from absl import logging

from experiments import common
from llm_math import checkpoint
from llm_math import files
from llm_math import generate as generate_lib
from llm_math.analysis import information
from llm_math import train as train_lib
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


def check_settings(num_tokens, temperature, top_k, top_p, num_samples):
  """User-facing checks of the sampling flags (UsageError naming the flag)."""
  if num_tokens < 1:
    raise UsageError(f"--num_tokens={num_tokens}: must be at least 1")
  if num_samples < 1:
    raise UsageError(f"--num_samples={num_samples}: must be at least 1")
  if temperature < 0 or not math.isfinite(temperature):
    raise UsageError(f"--temperature={temperature}: must be >= 0 (0 = greedy)")
  if top_k is not None and top_k < 1:
    raise UsageError(f"--top_k={top_k}: must be at least 1")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise UsageError(f"--top_p={top_p}: must lie in (0, 1]")


def encode_prompt(tokenizer, prompt: str, vocab_size: int) -> np.ndarray:
  """Prompt text -> ids [P]; synthetic runs take whitespace-separated ids."""
  if not prompt:
    raise UsageError("--prompt is empty: give at least one token of context (e.g. a newline)")
  if not hasattr(tokenizer, "encode"):
    try:
      ids = np.asarray([int(t) for t in prompt.split()], np.int32)
    except ValueError:
      raise UsageError(f"--prompt={prompt!r}: this run's tokens are ids; give them separated by "
                       f"spaces, each in [0, {vocab_size})") from None
    if not len(ids) or ids.min() < 0 or ids.max() >= vocab_size:
      raise UsageError(
          f"--prompt={prompt!r}: give token ids in [0, {vocab_size}) separated by spaces")
    return ids
  try:
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
  except UsageError as e:
    raise UsageError(f"--prompt: {e}") from None
  if not len(ids):
    raise UsageError(f"--prompt={prompt!r} encodes to no tokens")
  return ids


def timed_generate(params, model_config, prompt_BxP, num_tokens, key, use_cache, **sampling):
  """Generates twice (the first call compiles): -> (Generation, compile s, run s of the second)."""
  start = time.perf_counter()
  out = generate_lib.generate(params, model_config, prompt_BxP, num_tokens, key,
                              use_cache=use_cache, **sampling)
  jax.block_until_ready(out)
  first = time.perf_counter() - start
  start = time.perf_counter()
  again = generate_lib.generate(params, model_config, prompt_BxP, num_tokens, key,
                                use_cache=use_cache, **sampling)
  jax.block_until_ready(again)
  run = time.perf_counter() - start
  return out, max(first - run, 0.0), run


def _validation_nll(workdir: str):
  """The run's final validation NLL from its results.json, when it has one."""
  try:
    records = files.read_json(files.path(workdir) / "results.json").get("records", [])
  except (OSError, ValueError):
    return None
  return next((r["val_nll_nats"] for r in records if r.get("kind") == "model"), None)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Quiet the checkpoint library's INFO lines.
  common.reject_unused_flags(UNUSED_FLAGS, "sample.py")
  workdir = common.WORKDIR.value
  if not workdir:
    raise UsageError("--workdir is required: the directory of a training run")
  if not files.path(workdir).is_dir():
    raise UsageError(f"--workdir={workdir}: no such directory")
  settings = dict(temperature=TEMPERATURE.value, top_k=TOP_K.value, top_p=TOP_P.value)
  check_settings(NUM_TOKENS.value, TEMPERATURE.value, TOP_K.value, TOP_P.value, NUM_SAMPLES.value)
  trained = checkpoint.load_trained(workdir)
  cfg = trained.model_config
  prompt_P = encode_prompt(trained.tokenizer, PROMPT.value, cfg.vocab_size)
  prompt_BxP = np.tile(prompt_P[None], (NUM_SAMPLES.value, 1))
  seed = common.SEED.value if common.SEED.value is not None else 0
  key = jax.random.PRNGKey(seed)
  keep = generate_lib.context_keep(cfg.max_len)
  print(f"model: {workdir} at step {trained.step}; context W = {cfg.max_len} tokens, vocabulary "
        f"{cfg.vocab_size}; prompt {len(prompt_P)} tokens; sampling: temperature "
        f"{settings['temperature']:g}, top_k {settings['top_k'] or 'all'}, top_p "
        f"{settings['top_p'] if settings['top_p'] is not None else 1:g}; seed {seed}")
  if len(prompt_P) + NUM_TOKENS.value > cfg.max_len:
    print(f"context rule: windows of at most {cfg.max_len} tokens; when full, keep the last {keep} "
          "and re-read them (llm_math.generate)")

  out, compile_s, run_s = timed_generate(trained.params, cfg, prompt_BxP, NUM_TOKENS.value, key,
                                         True, **settings)
  n_generated = NUM_SAMPLES.value * NUM_TOKENS.value
  speed = {"cached": {"tokens_per_s": n_generated / run_s, "run_s": run_s, "compile_s": compile_s}}
  identical = None
  if COMPARE_CACHE.value:
    plain, compile_s, run_s = timed_generate(trained.params, cfg, prompt_BxP, NUM_TOKENS.value, key,
                                             False, **settings)
    speed["uncached"] = {"tokens_per_s": n_generated / run_s, "run_s": run_s,
                         "compile_s": compile_s}
    identical = bool(np.array_equal(np.asarray(out.tokens), np.asarray(plain.tokens)))

  texts = [trained.tokenizer.decode(np.concatenate([prompt_P, row]))
           for row in np.asarray(out.tokens)]
  for i, text in enumerate(texts):
    print(f"\n----- sample {i + 1} of {len(texts)} -----\n{text}")
  print("-----\n")
  entropy = float(np.mean(out.entropy))
  logprob = float(np.mean(out.logprob))
  val_nll = _validation_nll(workdir)
  print(f"mean entropy of the sampling distribution: {entropy:.3f} nats/token "
        f"({information.nats_to_bits(entropy):.3f} bits); mean surprisal of the drawn tokens "
        f"under it {-logprob:.3f} nats/token"
        + ("" if val_nll is None else f"; the model's validation NLL: {val_nll:.3f} nats/token"))
  line = (f"speed ({jax.devices()[0].platform}, {n_generated:,} tokens, after compilation): "
          f"with cache {speed['cached']['tokens_per_s']:,.0f} tokens/s")
  if COMPARE_CACHE.value:
    ratio = speed["cached"]["tokens_per_s"] / speed["uncached"]["tokens_per_s"]
    line += (f", without {speed['uncached']['tokens_per_s']:,.0f} tokens/s ({ratio:.1f}x); "
             f"identical tokens: {'yes' if identical else 'NO'}")
  print(line)

  if OUTPUT.value and common.is_primary():
    record = {
        "experiment": "sample", "workdir": workdir, "step": trained.step, "prompt": PROMPT.value,
        "prompt_tokens": int(len(prompt_P)), "num_tokens": NUM_TOKENS.value, "seed": seed,
        "sampling": settings, "context": {"max_len": cfg.max_len, "keep": keep},
        "samples": texts, "tokens": np.asarray(out.tokens).tolist(),
        "mean_entropy_nats": entropy, "mean_surprisal_nats": -logprob,
        "entropy_per_step_nats": np.mean(np.asarray(out.entropy), axis=0).tolist(),
        "validation_nll_nats": val_nll, "speed": speed,
        "identical_with_and_without_cache": identical, "device": jax.devices()[0].platform,
        "how_measured": ("entropy: H(q_t) of the truncated, tempered distribution each token was "
                         "drawn from, averaged over steps and samples; speed: generated tokens / "
                         "wall time of a second, already compiled call (prefill included)"),
    }
    try:
      files.write_json(OUTPUT.value, record, indent=2)  # Strict JSON: an infinite tokens/s is null.
    except OSError as e:
      raise UsageError(f"--output={OUTPUT.value}: cannot write ({e.strerror or e})") from None
    print(f"wrote {OUTPUT.value}")
  if identical is False:
    raise SystemExit("error: cached and uncached generation gave different tokens")


if __name__ == "__main__":
  common.run(main)
