r"""The data pipeline's costs: tokenizing throughput, prepare's peak memory, startup, loader speed.

  python -m benchmarks.data
  python -m benchmarks.data --parts=loader --loader_seq_len=1024 --loader_batch_size=32
  python -m benchmarks.data --text=corpus.txt --repeat=10 --rss_tokenizer=byte --keep

Four parts (`--parts`, default all), on the corpus `--text` (default ../shared/data/english_pd.txt):
  tokenize     `token_store.prepare` into a fresh directory per tokenizer (char, byte, SentencePiece
               with --vocab_size), with the default worker count (cores - 1) and with one worker per core:
               wall time, MB/s of source text, tokens. SentencePiece's time includes training it.
  prepare_rss  `prepare` (--rss_tokenizer) of the corpus and of the corpus repeated --repeat times,
               each in a fresh child process that reports its peak resident set (ru_maxrss of
               RUSAGE_SELF) and its pool workers' (RUSAGE_CHILDREN): prepare streams, so the peak
               should not grow with the corpus.
  startup      per corpus (1x, --repeat x), a fresh child process runs prepare + data.load of
               'tokens:DIR' + train.train of the default perplexity model (the dataset's vocab,
               --startup_seq_len, --startup_batch_size) to the end of step --startup_steps; twice:
               first tokenizing, then again on the same directory (prepare returns reused=True).
               Reports the data work (prepare + load), the validation windows, the RSS after load,
               after the windows and its peak at the end of the last step, and the total from
               launching the child to the end of that step (imports, JAX start-up, compiles and the
               step-0 evaluation included). The run stops there: the final evaluation and checkpoint
               are not part of startup.
  loader       tokens/s that `data.prefetch` of `data.train_batch` delivers from the memmapped train
               split at --loader_seq_len x --loader_batch_size, each batch cast to int32 and
               `jax.device_put` on the default device (what the train step consumes), against
               --target_tokens_per_s (10x the ~600K tokens/s of a GPT-2-small step on one H100);
               and a plain numpy `train_batch` loop without device_put.

Temporary corpora and token directories live under --tmp_dir (default a new temporary directory),
removed at the end unless --keep. Child processes are this module run with --child=prepare|startup.
JAX and the training code are imported only where needed, so the prepare children (and prepare's
spawned workers, which import this module) measure prepare, not JAX.
"""

from llm_math import evaluation
import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from benchmarks import cpu_info
from llm_math.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "english_pd.txt"))
PARTS = ("tokenize", "prepare_rss", "startup", "loader")
TOKENIZER_KINDS = ("char", "byte", "sentencepiece")
RESULT = "RESULT "  # Prefix of the JSON line a child process prints last.
STARTUP_DATA_TARGET_S = 5.0
STARTUP_RSS_TARGET_MB = 100.0

TEXT = flags.DEFINE_string("text", DEFAULT_TEXT, "The UTF-8 corpus.")
PARTS_FLAG = flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {','.join(PARTS)}.")
TOKENIZERS = flags.DEFINE_list("tokenizers", list(TOKENIZER_KINDS), "Tokenizers of the tokenize "
                               "part.")
VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000, "SentencePiece vocabulary size.")
REPEAT = flags.DEFINE_integer("repeat", 10, "The large corpus is the corpus this many times.")
RSS_TOKENIZER = flags.DEFINE_enum("rss_tokenizer", "char", list(TOKENIZER_KINDS),
                                  "Tokenizer of the prepare_rss and startup runs (1x and Nx).")
STARTUP_SEQ_LEN = flags.DEFINE_integer("startup_seq_len", 64, "Context of the startup model.")
STARTUP_BATCH = flags.DEFINE_integer("startup_batch_size", 8, "Batch of the startup model.")
STARTUP_STEPS = flags.DEFINE_integer("startup_steps", 10, "Startup ends with this step.")
STARTUP_EVAL_MAX = flags.DEFINE_integer(
    "startup_eval_max_tokens", 200_000, "config.eval_max_tokens of the startup runs (0 = all, the "
    "default config's: on 2 CPU cores the step-0 evaluation of all of english_pd's validation "
    "split takes over a minute, ten times that at 10x). The windows over the whole split are "
    "built (not evaluated) after the last step, to report their memory.")
STARTUP_CORPORA = flags.DEFINE_list("startup_corpora", ["1x", "Nx"], "Corpora of the startup part: "
                                    "1x (--text) and/or Nx (--text repeated --repeat times).")
JAX_CACHE_DIR = flags.DEFINE_string("jax_cache_dir", "", "A persistent JAX compilation cache for "
                                    "the startup children (default none: every startup compiles, "
                                    "as a real one does; tests set it to save time).")
LOADER_SEQ_LEN = flags.DEFINE_integer("loader_seq_len", 1024, "Context of the loader batches.")
LOADER_BATCH = flags.DEFINE_integer("loader_batch_size", 32, "Global batch of the loader.")
LOADER_STEPS = flags.DEFINE_integer("loader_steps", 200, "Timed loader batches (after 5 warm-up).")
TARGET = flags.DEFINE_float("target_tokens_per_s", 6e6, "Loader target: 10x the ~600K tokens/s "
                            "a GPT-2-small step consumes on one H100.")
TMP_DIR = flags.DEFINE_string("tmp_dir", None, "Directory for temporary data (default: a new one).")
KEEP = flags.DEFINE_bool("keep", False, "Keep --tmp_dir at the end.")
CHILD = flags.DEFINE_enum("child", None, ["prepare", "startup"], "Internal: run one measurement "
                          "of --text into --child_out and print its result as JSON.")
CHILD_OUT = flags.DEFINE_string("child_out", None, "Internal: the child's token directory.")
CHILD_WORKDIR = flags.DEFINE_string("child_workdir", None, "Internal: the startup child's workdir.")


# --------------------------------------------------------------------------------------------------
# Small helpers.


def mib(n_bytes: float) -> str:
  return f"{n_bytes / 2**20:,.0f} MiB"


def rss_status() -> dict:
  """This process's resident set now, from /proc/self/status: {'VmRSS', 'RssAnon', 'RssFile'} in
  bytes (file-backed pages include memory-mapped token files); empty where unavailable."""
  out = {}
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
          out[key] = int(value.split()[0]) * 1024
  except OSError:
    pass
  return out


def current_rss_bytes() -> int:
  """This process's resident set now (0 where unavailable)."""
  return rss_status().get("VmRSS", 0)


def peak_rss_bytes() -> tuple[int, int]:
  """(this process's peak resident set, the largest of its waited-for children's), in bytes."""
  to_bytes = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB.
  return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_bytes,
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_bytes)


def total_tokens(manifest: dict) -> int:
  return sum(s["tokens"] for s in manifest["splits"].values())


def fresh_dir(path: str) -> str:
  """`path`, emptied: a measurement that must tokenize cannot find an earlier result there."""
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  return path


def repeat_corpus(text_path: str, times: int, out_path: str) -> int:
  """Writes the corpus `times` times over into `out_path` (kept if already that size); its size."""
  size = os.path.getsize(text_path)
  if not (os.path.exists(out_path) and os.path.getsize(out_path) == size * times):
    with open(text_path, "rb") as f:
      raw = f.read()
    with open(out_path, "wb") as f:
      for _ in range(times):
        f.write(raw)
  return size * times


def run_child(kind: str, text_path: str, out_dir: str, extra=()) -> dict:
  """Runs this module with --child=`kind` in a fresh process; its RESULT dict plus `launched`."""
  cmd = [sys.executable, "-m", "benchmarks.data", f"--child={kind}", f"--text={text_path}",
         f"--child_out={out_dir}", f"--rss_tokenizer={RSS_TOKENIZER.value}",
         f"--vocab_size={VOCAB_SIZE.value}", *extra]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  if JAX_CACHE_DIR.value:
    env.update(JAX_COMPILATION_CACHE_DIR=JAX_CACHE_DIR.value,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  launched = time.time()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  results = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
  if proc.returncode or not results:
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    raise RuntimeError(f"child {' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
  return dict(json.loads(results[-1][len(RESULT):]), launched=launched)


def print_result(record: dict):
  print(RESULT + json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------------
# Child processes.


def child_prepare() -> dict:
  """Child: prepare --text into --child_out; its wall time and peak resident sets."""
  from llm_math import token_store  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  manifest = token_store.prepare(f"text:{TEXT.value}", CHILD_OUT.value, RSS_TOKENIZER.value,
                                 VOCAB_SIZE.value)
  wall = time.perf_counter() - start
  self_peak, children_peak = peak_rss_bytes()
  return {"wall_s": wall, "reused": manifest["reused"], "tokens": total_tokens(manifest),
          "source_bytes": manifest["source_bytes"], "workers": manifest.get("workers"),
          "peak_rss": self_peak, "children_peak_rss": children_peak}


class _ReachedStep(Exception):
  """Raised from train's log at the end of the last startup step: startup is over."""


def startup_config():
  """The default perplexity config shrunk to the startup run (the vocab comes from the dataset)."""
  # pylint: disable-next=g-import-not-at-top
  from experiments.configs import perplexity as default_config
  c = default_config.get_config()
  steps = STARTUP_STEPS.value
  c.seq_len, c.batch_size, c.num_steps = STARTUP_SEQ_LEN.value, STARTUP_BATCH.value, steps
  c.warmup_steps = min(c.warmup_steps, steps)
  c.eval_stride = min(c.eval_stride, c.seq_len)
  c.eval_every = max(c.eval_every, steps)
  c.log_every = steps
  c.checkpoint_every = max(c.checkpoint_every, steps)
  c.eval_max_tokens = STARTUP_EVAL_MAX.value
  return c


def windows_bytes(windows) -> int:
  """Bytes of memory the validation windows hold: their in-memory arrays, not a memory-mapped stream
  nor arrays broadcast from a row (a zero stride)."""
  total = 0
  for field in dataclasses.fields(windows):
    array = getattr(windows, field.name)
    if (isinstance(array, np.ndarray) and not isinstance(array, np.memmap)
        and 0 not in array.strides):
      total += array.nbytes
  return total


def windows_count(windows) -> int:
  """How many windows (EvalWindows with len(), or the windows materialized as arrays)."""
  try:
    return len(windows)
  except TypeError:
    return len(windows.inputs_NxT)


def child_startup() -> dict:
  """Child: prepare + load + train to the end of step --startup_steps; times and resident sets."""
  t_import = time.perf_counter()
  # pylint: disable=g-import-not-at-top
  from llm_math import data as data_lib
  from llm_math import token_store
  from llm_math import train as train_lib
  from llm_math import xla_cpu
  # pylint: enable=g-import-not-at-top
  xla_cpu.tune()
  record = {"import_s": time.perf_counter() - t_import}

  start = time.perf_counter()
  manifest = token_store.prepare(f"text:{TEXT.value}", CHILD_OUT.value, RSS_TOKENIZER.value,
                                 VOCAB_SIZE.value)
  record["prepare_s"] = time.perf_counter() - start
  record["reused"] = manifest["reused"]
  start = time.perf_counter()
  dataset = data_lib.load(f"tokens:{CHILD_OUT.value}")
  record["load_s"] = time.perf_counter() - start
  record["data_s"] = record["prepare_s"] + record["load_s"]
  record["rss_after_load"] = current_rss_bytes()
  record["peak_rss_after_data"], record["children_peak_rss"] = peak_rss_bytes()
  record["val_tokens"], record["vocab"] = len(dataset.val_ids), dataset.vocab_size

  config = startup_config()
  start = time.perf_counter()
  windows = evaluation.validation_windows(config, dataset.val_ids)
  record["windows_s"] = time.perf_counter() - start
  record["windows_bytes"] = windows_bytes(windows)
  record["windows"] = windows_count(windows)
  record["rss_after_windows"] = current_rss_bytes()

  train_start = time.perf_counter()
  steps = STARTUP_STEPS.value

  def reached_step():
    status = rss_status()
    record.update(step_end_time=time.time(), peak_rss_at_step=peak_rss_bytes()[0],
                  rss_at_step=status.get("VmRSS", 0), rss_anon_at_step=status.get("RssAnon", 0),
                  rss_file_at_step=status.get("RssFile", 0))

  def log(line: str):
    if re.match(r"step\s+0 \| val nll", line):
      record["eval0_s"] = time.perf_counter() - train_start
    elif re.match(rf"step\s+{steps} \| loss", line):
      reached_step()
      raise _ReachedStep()

  try:
    train_lib.train(config, dataset, CHILD_WORKDIR.value, windows=windows, log=log)
  except _ReachedStep:
    pass
  if "step_end_time" not in record:  # The log line changed: the end of train is the next best.
    reached_step()
  record["train_s"] = time.perf_counter() - train_start
  record.update(all_windows_cost(data_lib, dataset, config, windows))
  return record


def all_windows_cost(data_lib, dataset, config, windows) -> dict:
  """Memory and time of the validation windows over the whole split (what eval_max_tokens=0 builds),
  measured after training so they do not count in its peak (`windows` themselves when uncapped)."""
  if not config.eval_max_tokens:
    return {"all_windows": windows_count(windows), "all_windows_bytes": windows_bytes(windows),
            "all_windows_s": 0.0, "all_windows_rss_delta": 0}
  before = current_rss_bytes()
  start = time.perf_counter()
  full = data_lib.eval_windows(dataset.val_ids, config.seq_len, config.eval_stride or None)
  seconds = time.perf_counter() - start
  return {"all_windows": windows_count(full), "all_windows_bytes": windows_bytes(full),
          "all_windows_s": seconds, "all_windows_rss_delta": current_rss_bytes() - before}


# --------------------------------------------------------------------------------------------------
# The parts (parent process). Each prints its lines and returns summary rows (part, what, value).


def part_tokenize(tmp: str) -> list:
  """Tokenizing throughput per tokenizer: the default worker count (cores - 1, at least 1) and one
  worker per core."""
  from llm_math import token_store  # pylint: disable=g-import-not-at-top
  print("\n== tokenize: token_store.prepare into a fresh directory ==")
  rows = []
  for kind in TOKENIZERS.value:
    for workers in (None, os.cpu_count() or 1):
      out = fresh_dir(os.path.join(tmp, "tokenize", f"{kind}_w{workers or 'default'}"))
      start = time.perf_counter()
      manifest = token_store.prepare(f"text:{TEXT.value}", out, kind, VOCAB_SIZE.value,
                                     workers=workers)
      wall = time.perf_counter() - start
      mb_s = manifest["source_bytes"] / 1e6 / wall
      vocab = manifest["tokenizer"]["vocab_size"]
      label = f"{kind} (vocab {vocab:,})"
      asked = "default" if workers is None else "per core"
      print(f"tokenize {label:26s} workers {manifest['workers']:2d} ({asked:7s}): {wall:7.2f} s | "
            f"{mb_s:7.2f} MB/s | {total_tokens(manifest):,} tokens", flush=True)
      rows.append(("tokenize", f"{kind}, {manifest['workers']} workers ({asked})",
                   f"{mb_s:.2f} MB/s ({wall:.1f} s, {total_tokens(manifest):,} tokens)"))
  if "sentencepiece" in TOKENIZERS.value:
    print("  (sentencepiece's wall time includes training the tokenizer)")
  return rows


def corpora(tmp: str) -> list[tuple[str, str]]:
  """[(label, path)] of the 1x corpus and the repeated one (written on first use)."""
  big = os.path.join(tmp, f"corpus_x{REPEAT.value}.txt")
  repeat_corpus(TEXT.value, REPEAT.value, big)
  return [("1x", TEXT.value), (f"{REPEAT.value}x", big)]


def part_prepare_rss(tmp: str) -> list:
  """Peak resident set of prepare, per corpus, each in a fresh child process."""
  print(f"\n== prepare_rss: prepare ({RSS_TOKENIZER.value}) in a fresh process per corpus ==")
  rows = []
  for label, path in corpora(tmp):
    out = fresh_dir(os.path.join(tmp, "prepare_rss", label))
    r = run_child("prepare", path, out)
    print(f"prepare {label:>4s} ({r['source_bytes'] / 1e6:,.1f} MB, {r['tokens']:,} tokens, "
          f"{r['workers']} workers): {r['wall_s']:.2f} s | peak RSS {mib(r['peak_rss'])} | "
          f"workers' peak RSS {mib(r['children_peak_rss'])}", flush=True)
    rows.append(("prepare_rss", f"{label} ({r['source_bytes'] / 1e6:,.1f} MB)",
                 f"peak {mib(r['peak_rss'])}, workers {mib(r['children_peak_rss'])}, "
                 f"{r['wall_s']:.1f} s"))
  return rows


def part_startup(tmp: str) -> list:
  """Training startup per corpus, first tokenizing, then on the prepared directory."""
  print(f"\n== startup: prepare ({RSS_TOKENIZER.value}) + data.load + train.train to step "
        f"{STARTUP_STEPS.value} (seq_len {STARTUP_SEQ_LEN.value}, batch {STARTUP_BATCH.value}), "
        "a fresh process per run ==")
  extra = [f"--startup_seq_len={STARTUP_SEQ_LEN.value}",
           f"--startup_batch_size={STARTUP_BATCH.value}", f"--startup_steps={STARTUP_STEPS.value}",
           f"--startup_eval_max_tokens={STARTUP_EVAL_MAX.value}"]
  rows, peaks = [], {}
  chosen = [c for c in corpora(tmp) if c[0] == "1x" and "1x" in STARTUP_CORPORA.value
            or c[0] != "1x" and "Nx" in STARTUP_CORPORA.value]
  for label, path in chosen:
    out = fresh_dir(os.path.join(tmp, "startup", label))
    runs = []
    for run in ("first", "second"):
      workdir = fresh_dir(os.path.join(tmp, "startup", f"{label}_workdir_{run}"))
      r = run_child("startup", path, out, extra + [f"--child_workdir={workdir}"])
      r["total_s"] = r["step_end_time"] - r["launched"]
      runs.append(r)
      print(f"startup {label:>4s} {run:6s} run (reused={r['reused']}): data {r['data_s']:.2f} s "
            f"(prepare {r['prepare_s']:.2f} + load {r['load_s']:.3f}) | peak RSS at step "
            f"{STARTUP_STEPS.value} {mib(r['peak_rss_at_step'])} | total startup "
            f"{r['total_s']:.1f} s", flush=True)
      print(f"    time: imports {r['import_s']:.1f} s, train() to the end of the step-0 eval "
            f"{r.get('eval0_s', float('nan')):.1f} s (init, compile, {r['windows']:,} windows), to "
            f"the end of step {STARTUP_STEPS.value} {r['train_s']:.1f} s", flush=True)
      print(f"    memory: RSS after load {mib(r['rss_after_load'])}, after the val windows "
            f"{mib(r['rss_after_windows'])}, at step {STARTUP_STEPS.value} "
            f"{mib(r['rss_at_step'])} (anonymous {mib(r['rss_anon_at_step'])}, file-backed "
            f"{mib(r['rss_file_at_step'])}); "
            f"prepare workers' peak {mib(r['children_peak_rss'])}; val windows "
            f"{mib(r['windows_bytes'])} ({r['windows']:,}, {r['val_tokens']:,} val tokens); all "
            f"{r['all_windows']:,} windows of the split {mib(r['all_windows_bytes'])}, built in "
            f"{r['all_windows_s']:.2f} s, RSS +{mib(r['all_windows_rss_delta'])}", flush=True)
    first, second = runs
    ok = second["reused"] and second["data_s"] < STARTUP_DATA_TARGET_S
    print(f"startup {label:>4s} data work: first run (tokenizing) {first['data_s']:.2f} s | second "
          f"run (reused={second['reused']}) {second['data_s']:.2f} s | target < "
          f"{STARTUP_DATA_TARGET_S:.0f} s: {'met' if ok else 'MISSED'}", flush=True)
    rows.append(("startup", f"{label} data work first / second",
                 f"{first['data_s']:.2f} s / {second['data_s']:.2f} s "
                 f"({'met' if ok else 'MISSED'} < {STARTUP_DATA_TARGET_S:.0f} s)"))
    rows.append(("startup", f"{label} peak RSS first / second",
                 f"{mib(first['peak_rss_at_step'])} / {mib(second['peak_rss_at_step'])} "
                 f"(all val windows {mib(second['all_windows_bytes'])})"))
    rows.append(("startup", f"{label} total first / second",
                 f"{first['total_s']:.1f} s / {second['total_s']:.1f} s "
                 f"(train() to step-0 eval end {second.get('eval0_s', float('nan')):.1f} s)"))
    peaks[label] = (first["peak_rss_at_step"], second["peak_rss_at_step"])
  if len(peaks) == 2:  # The corpus-size test: the same startup memory at 1x and Nx.
    (small, large) = peaks.values()
    for i, run in enumerate(("first", "second")):
      delta = (large[i] - small[i]) / 1e6
      verdict = "met" if abs(delta) < STARTUP_RSS_TARGET_MB else "MISSED"
      print(f"startup peak RSS, larger corpus minus 1x ({run} runs): {delta:+,.0f} MB | target "
            f"|difference| < {STARTUP_RSS_TARGET_MB:.0f} MB: {verdict}", flush=True)
      rows.append(("startup", f"peak RSS Nx - 1x ({run} runs)", f"{delta:+,.0f} MB ({verdict})"))
  return rows


def time_loop(next_batch, steps: int, warmup: int = 5) -> float:
  """Seconds per batch of `next_batch()` over `steps` calls, after `warmup` calls."""
  for _ in range(warmup):
    next_batch()
  start = time.perf_counter()
  for _ in range(steps):
    next_batch()
  return (time.perf_counter() - start) / steps


def part_loader(tmp: str) -> list:
  """Tokens/s of the training batches, with and without prefetch + device_put."""
  # pylint: disable=g-import-not-at-top
  import jax
  from llm_math import data as data_lib
  from llm_math import token_store
  from llm_math import xla_cpu
  # pylint: enable=g-import-not-at-top
  xla_cpu.tune()
  out = os.path.join(tmp, "loader_tokens")
  token_store.prepare(f"text:{TEXT.value}", out, "char")
  ids = data_lib.load(f"tokens:{out}").train_ids
  t, b, steps = LOADER_SEQ_LEN.value, LOADER_BATCH.value, LOADER_STEPS.value
  device = jax.devices()[0]
  print(f"\n== loader: seq_len {t}, batch {b}, {steps} batches from the memmapped train split "
        f"({len(ids):,} {ids.dtype} char tokens, {type(ids).__name__}) ==")
  seed = 0
  counter = iter(range(10**9))
  x, _ = data_lib.train_batch(ids, t, b, seed, 0)
  numpy_s = time_loop(lambda: data_lib.train_batch(ids, t, b, seed, next(counter)), steps)

  def make_batch(step):
    return tuple(jax.device_put(np.asarray(a, np.int32), device)
                 for a in data_lib.train_batch(ids, t, b, seed, step))

  batches = data_lib.prefetch(make_batch, 0, steps + 5)
  prefetch_s = time_loop(lambda: jax.block_until_ready(next(batches)), steps)
  batches.close()
  tokens = b * t
  rows = []
  for what, seconds in (("numpy train_batch (no device_put)", numpy_s),
                        (f"prefetch + int32 device_put to {device.platform}", prefetch_s)):
    rate = tokens / seconds
    print(f"loader {what:45s}: {seconds * 1e3:8.3f} ms/batch | {rate:15,.0f} tokens/s | "
          f"{rate / TARGET.value:6.2f}x the target {TARGET.value:,.0f} tokens/s", flush=True)
    rows.append(("loader", what, f"{rate:,.0f} tokens/s ({rate / TARGET.value:.2f}x target)"))
  print(f"  (train_batch returns {x.dtype}"
        + ("" if x.dtype == np.int32 else "; cast to int32 before device_put") + ")")
  return rows


def print_summary(rows: list):
  print("\n== summary ==")
  width = [max(len(r[i]) for r in rows) for i in range(2)]
  for part, what, value in rows:
    print(f"{part:{width[0]}s}  {what:{width[1]}s}  {value}")


def run_parts(tmp: str):
  print(f"cpu: {cpu_info.describe()}")
  print(f"corpus: {TEXT.value} ({os.path.getsize(TEXT.value) / 1e6:,.1f} MB); tmp_dir {tmp}")
  functions = {"tokenize": part_tokenize, "prepare_rss": part_prepare_rss,
               "startup": part_startup, "loader": part_loader}
  rows = []
  for part in PARTS:
    if part in PARTS_FLAG.value:
      rows += functions[part](tmp)
  print_summary(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint operation at INFO.
  if not os.path.isfile(TEXT.value):
    sys.exit(f"error: --text={TEXT.value}: no such file (pass --text=PATH to a UTF-8 corpus)")
  if CHILD.value:
    print_result(child_prepare() if CHILD.value == "prepare" else child_startup())
    return
  unknown = sorted(set(PARTS_FLAG.value) - set(PARTS))
  if unknown:
    sys.exit(f"error: --parts: unknown {','.join(unknown)}; expected some of {','.join(PARTS)}")
  unknown = sorted(set(STARTUP_CORPORA.value) - {"1x", "Nx"})
  if unknown:
    sys.exit(f"error: --startup_corpora: unknown {','.join(unknown)}; expected some of 1x,Nx")
  unknown = sorted(set(TOKENIZERS.value) - set(TOKENIZER_KINDS))
  if unknown:
    sys.exit(f"error: --tokenizers: unknown {','.join(unknown)}; expected some of "
             f"{','.join(TOKENIZER_KINDS)}")
  tmp = TMP_DIR.value or tempfile.mkdtemp(prefix="benchmark_data_")
  os.makedirs(tmp, exist_ok=True)
  try:
    run_parts(tmp)
  except UsageError as e:
    sys.exit(f"error: {e}")
  finally:
    if KEEP.value:
      print(f"kept {tmp}")
    else:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
