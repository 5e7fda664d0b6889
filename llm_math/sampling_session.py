"""A sampling session over a trained run: text from its latest checkpoint, the entropy of the
distributions it was drawn from, and the speed of generation with and without the key/value cache.

`sample(workdir, prompt, ...)` loads the run, draws `num_samples` continuations of `prompt` with
`llm_math.generate` (each token from temperature -> top-k -> top-p filtered conditionals,
`llm_math.analysis.sampling`; temperature 0 is greedy), times a second, already compiled call with
the cache and (`compare_cache`) without it, checks that both paths drew the same tokens from the
same key, and returns the record experiments/sample.py prints and saves. The model sees at most its
training context W; longer generations follow the context rule of `llm_math.generate`.

The decoding engine (`llm_math.generate`) is a pure function of params, a ModelConfig and a key; a
session is what a user runs against a workdir (a checkpoint, its tokenizer and results.json, prompt
text, checks that name the flags, wall-clock timing), so it lives here rather than in the engine,
which stays free of runs, files and user errors.
"""

import math
import time

import jax
import numpy as np

from llm_math import checkpoint
from llm_math import files
from llm_math import generate as generate_lib
from llm_math.analysis import information
from llm_math.errors import UsageError


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
  """Prompt text -> ids `[P]`; synthetic runs take whitespace-separated ids."""
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


def validation_nll(workdir: str):
  """The run's final validation NLL from its results.json, when it has one."""
  try:
    records = files.read_json(files.path(workdir) / "results.json").get("records", [])
  except (OSError, ValueError):
    return None
  return next((r["val_nll_nats"] for r in records if r.get("kind") == "model"), None)


def _speed(n_generated: int, compile_s: float, run_s: float) -> dict:
  return {"tokens_per_s": n_generated / run_s, "run_s": run_s, "compile_s": compile_s}


def sample(workdir: str | None, prompt: str, *, num_tokens: int, num_samples: int = 1,
           seed: int = 0, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, compare_cache: bool = True, log=print) -> dict:
  """Samples from the run in `workdir` (see the module docstring), logging the text, the mean
  entropy and the speed; the record: samples (prompt + continuation, decoded) [num_samples], tokens
  [num_samples, num_tokens], mean_entropy_nats, mean_surprisal_nats, entropy_per_step_nats
  [num_tokens], speed {cached, uncached: {tokens_per_s, run_s, compile_s}} and
  identical_with_and_without_cache (None without `compare_cache`)."""
  if not workdir:
    raise UsageError("--workdir is required: the directory of a training run")
  if not files.path(workdir).is_dir():
    raise UsageError(f"--workdir={workdir}: no such directory")
  settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  check_settings(num_tokens, temperature, top_k, top_p, num_samples)
  trained = checkpoint.load_trained(workdir)
  cfg = trained.model_config
  prompt_P = encode_prompt(trained.tokenizer, prompt, cfg.vocab_size)
  prompt_BxP = np.tile(prompt_P[None], (num_samples, 1))
  key = jax.random.PRNGKey(seed)
  keep = generate_lib.context_keep(cfg.max_len)
  log(f"model: {workdir} at step {trained.step}; context W = {cfg.max_len} tokens, vocabulary "
      f"{cfg.vocab_size}; prompt {len(prompt_P)} tokens; sampling: temperature "
      f"{temperature:g}, top_k {top_k or 'all'}, top_p {top_p if top_p is not None else 1:g}; "
      f"seed {seed}")
  if len(prompt_P) + num_tokens > cfg.max_len:
    log(f"context rule: windows of at most {cfg.max_len} tokens; when full, keep the last {keep} "
        "and re-read them (llm_math.generate)")

  n_generated = num_samples * num_tokens
  out, compile_s, run_s = timed_generate(trained.params, cfg, prompt_BxP, num_tokens, key, True,
                                         **settings)
  speed = {"cached": _speed(n_generated, compile_s, run_s)}
  identical = None
  if compare_cache:
    plain, compile_s, run_s = timed_generate(trained.params, cfg, prompt_BxP, num_tokens, key,
                                             False, **settings)
    speed["uncached"] = _speed(n_generated, compile_s, run_s)
    identical = bool(np.array_equal(np.asarray(out.tokens), np.asarray(plain.tokens)))

  texts = [trained.tokenizer.decode(np.concatenate([prompt_P, row]))
           for row in np.asarray(out.tokens)]
  for i, text in enumerate(texts):
    log(f"\n----- sample {i + 1} of {len(texts)} -----\n{text}")
  log("-----\n")
  entropy = float(np.mean(out.entropy))
  logprob = float(np.mean(out.logprob))
  val_nll = validation_nll(workdir)
  log(f"mean entropy of the sampling distribution: {entropy:.3f} nats/token "
      f"({information.nats_to_bits(entropy):.3f} bits); mean surprisal of the drawn tokens "
      f"under it {-logprob:.3f} nats/token"
      + ("" if val_nll is None else f"; the model's validation NLL: {val_nll:.3f} nats/token"))
  line = (f"speed ({jax.devices()[0].platform}, {n_generated:,} tokens, after compilation): "
          f"with cache {speed['cached']['tokens_per_s']:,.0f} tokens/s")
  if compare_cache:
    ratio = speed["cached"]["tokens_per_s"] / speed["uncached"]["tokens_per_s"]
    line += (f", without {speed['uncached']['tokens_per_s']:,.0f} tokens/s ({ratio:.1f}x); "
             f"identical tokens: {'yes' if identical else 'NO'}")
  log(line)
  return {
      "experiment": "sample", "workdir": workdir, "step": trained.step, "prompt": prompt,
      "prompt_tokens": int(len(prompt_P)), "num_tokens": num_tokens, "seed": seed,
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
