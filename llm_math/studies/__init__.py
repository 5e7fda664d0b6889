"""What every study shares: its runs' directories and configs, its data, and its results files.

A study is a module of this package with one entry point, `run(config, workdir, log) -> results`
(a JSON-able dict whose "experiment" names the study). It trains through `llm_math.train.fit`, keeps
each run of its grid in a directory of its own (`run_dir`: a changed config there is a one-line
error, the same one resumes), and writes nothing but those runs: the shared runner
(experiments/common.py) writes results.json, then results.md from `llm_math.reports.<study>` and the
figures from `llm_math.figures.<study>`, both functions of the saved results alone.
"""

import dataclasses
import json
import os

from llm_math import files
from llm_math.errors import UsageError

# Config fields that may change when a run is resumed (they do not change what was trained so far).
RESUMABLE_FIELDS = {"num_steps", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints",
                    "eval_batch_size", "mesh", "ngram", "train_transformer", "max_loss_factor",
                    "stop_check_every", "layer_stats", "checkpoint_schedule", "fit_bootstrap"}


def fit_bootstrap(config) -> int:
  """config.fit_bootstrap: the bootstrap resamples behind every fitted law's 95% interval (0: no
  intervals); a one-line UsageError unless an integer >= 0."""
  n = config.get("fit_bootstrap", 0)
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise UsageError(f"--config.fit_bootstrap={n!r}: expected an integer >= 0 (0: no intervals)")
  return n


class Interrupted(Exception):
  """A SIGINT/SIGTERM stopped a run after it saved its state: the same command resumes it."""


def completed(result):
  """`result` of `train.fit`; raises Interrupted when a signal stopped the run (the shared runner
  exits with status 130 on it, the one exit path of an interrupted study)."""
  if result.interrupted:
    raise Interrupted(f"interrupted at step {result.final_step}; its state is saved")
  return result


def is_primary() -> bool:
  """Only process 0 writes results, tables and figures."""
  from llm_math import sharding  # pylint: disable=g-import-not-at-top
  return sharding.is_primary()


def write_results(workdir, results: dict) -> str:
  """On process 0: writes results.json (strict JSON: no NaN), the study's figures (named in
  results["figures"]) and results.md; returns the report ("" on other processes)."""
  if not is_primary():
    return ""
  from llm_math import figures  # pylint: disable=g-import-not-at-top
  from llm_math import reports  # pylint: disable=g-import-not-at-top
  results["figures"] = figures.draw(results, workdir)
  report = reports.report(results)
  files.write_json(files.path(workdir) / "results.json", results)
  files.write_text(files.path(workdir) / "results.md", report)
  return report


def load_dataset(config, workdir=None, tokenizer=None, vocab_size=None):
  """The config's data source, tokenized (`tokenizer`/`vocab_size` override the config's) and checked
  to hold at least one window of `config.seq_len` tokens in each split. text: and tfds: sources are
  prepared once in $LLM_MATH_DATA_CACHE (the runner's --data_cache sets it)."""
  from llm_math import data as data_lib  # pylint: disable=g-import-not-at-top

  dataset = data_lib.load(
      config.data, tokenizer=tokenizer or config.tokenizer,
      vocab_size=(config.vocab_size if vocab_size is None else vocab_size) or None,
      seed=config.seed, synthetic_config=config.synthetic,
      tfds_data_dir=config.tfds_data_dir or None, max_chars=config.max_chars or None,
      workdir=workdir, split=config.get("data_split") or None,
      log=print if is_primary() else None)
  data_lib.check_fits(dataset, config.seq_len)
  return dataset


def use_compilation_cache(workdir: str):
  """Keeps compiled programs in workdir/compile_cache (one process, local disk): every run of a grid
  with one shape loads the step the first one compiled, and a rerun loads them all. A cache set by
  the user ($JAX_COMPILATION_CACHE_DIR) is kept."""
  import jax  # pylint: disable=g-import-not-at-top
  if (jax.process_count() == 1 and files.is_local(workdir)
      and not jax.config.jax_compilation_cache_dir):
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "compile_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# Model field values older configs wrote that mean what a current value means.
_LEGACY_MODEL_VALUES = {"remat": {False: "none", True: "full"}}


def with_new_model_defaults(saved: dict, current: dict) -> dict:
  """`saved` with the training and model fields it predates (in `current`, not in `saved`) at the
  values TrainConfig and ModelConfig give them by default, the values a run saved before such a
  field existed had, and legacy values written as their current names (remat false -> 'none')."""
  from llm_math import model as model_lib  # pylint: disable=g-import-not-at-top
  from llm_math import train_config  # pylint: disable=g-import-not-at-top
  train_defaults = {f.name: f.default for f in dataclasses.fields(train_config.TrainConfig)}
  saved = {**{k: train_defaults[k] for k in current if k not in saved and k in train_defaults},
           **saved}  # Training fields a config gained later, at the values runs then had.
  if not isinstance(saved.get("model"), dict) or not isinstance(current.get("model"), dict):
    return saved
  defaults = {f.name: f.default for f in dataclasses.fields(model_lib.ModelConfig)
              if f.default is not dataclasses.MISSING}
  added = {k: defaults[k] for k in current["model"] if k not in saved["model"] and k in defaults}
  model = {**saved["model"], **added}
  for key, legacy in _LEGACY_MODEL_VALUES.items():
    if key in model and not isinstance(model[key], str) and model[key] in legacy:
      model[key] = legacy[model[key]]
  return {**saved, "model": model}


def save_config(config, directory, what: str, ignored=frozenset(), write: bool = True):
  """Writes config.json in `directory` (if `write`), first refusing a config that differs from the
  one its checkpoints (or a sweep's models/ or runs/) were trained with (fields in RESUMABLE_FIELDS
  or `ignored` may differ)."""
  path = files.path(directory) / "config.json"
  current = json.loads(config.to_json_best_effort())
  trained = [files.path(directory) / sub for sub in ("checkpoints", "models", "runs", "seeds")]
  if path.exists() and any(d.is_dir() and any(d.iterdir()) for d in trained):
    saved = with_new_model_defaults(files.read_json(path), current)
    for key in sorted((set(saved) | set(current)) - RESUMABLE_FIELDS - set(ignored)):
      if saved.get(key) != current.get(key):
        raise UsageError(
            f"{what} with a different config ({key}: {saved.get(key)!r} there, "
            f"{current.get(key)!r} now); use a new --workdir to start another run")
  if write:
    files.write_json(path, current, indent=2)


def run_dir(config, parent, *names: str, ignored=frozenset()) -> str:
  """The workdir of one point of a sweep, `parent/names...`: created, and checked like a single run's
  (a different config there is a one-line error naming the field, `ignored` fields aside; the same
  one resumes)."""
  directory = os.path.join(str(parent), *names)
  files.path(directory).mkdir(parents=True, exist_ok=True)
  save_config(config, directory, f"{directory} holds a run", ignored, write=is_primary())
  return directory
