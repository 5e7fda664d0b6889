"""Conventions shared by every experiment script.

Flags: --workdir, --config (an ml_collections config file; --config.field=value overrides), and the
shortcuts --data, --tokenizer, --vocab_size, --seed, --tfds_data_dir, which override the config fields of
the same names. Flags flow into the config, the config into the model and the training loop; nothing
flows back. User mistakes end with one line `error: ...` and exit status 2.
"""

import errno
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from llm_math import files
from llm_math import studies
from llm_math.errors import UsageError

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results, figures.")
DATA = flags.DEFINE_string(
    "data", None, "'synthetic', 'text:PATH[,PATH...]', 'tfds:NAME[/CONFIG]' or 'tokens:DIR' "
    "(prepared by experiments.prepare_data).")
TOKENIZER = flags.DEFINE_enum("tokenizer", None, ["char", "byte", "sentencepiece"], "Tokenizer.")
VOCAB_SIZE = flags.DEFINE_integer("vocab_size", None, "SentencePiece vocabulary size.")
SEED = flags.DEFINE_integer("seed", None, "Seed of initialization, data order and synthetic data.")
SEEDS = flags.DEFINE_list(
    "seeds", None, "Run the study once per seed (e.g. 0,1,2), each in --workdir/seeds/seed_<s>, and "
    "write the mean over seeds with 95% intervals (llm_math.studies.seeds).")
TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "A prepared tensorflow-datasets data_dir.")
DATA_CACHE = flags.DEFINE_string(
    "data_cache", None, "Local directory where text: and tfds: sources are tokenized once "
    "(default $LLM_MATH_DATA_CACHE or ~/.cache/llm_math/tokens).")
MESH = flags.DEFINE_string("mesh", None, "Device mesh, e.g. 'data:-1,fsdp:1,tensor:1' (-1 = the rest).")


def _define_config(default_file: str):
  """Defines --config with a default file from experiments/configs/.

  Defined when a script runs (in `run`), not when it is imported, so several experiment modules can
  be imported in one process. ml_collections reads `--config.field=value` overrides while the flag is
  defined, so a mistake in one (an unknown field) surfaces here and ends the program with one line.
  """
  try:
    config_flags.DEFINE_config_file(
        "config", os.path.join(_CONFIG_DIR, default_file), "Config file (ml_collections).",
        lock_config=True)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    detail = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("'\" ").split())
    print(f"error: a --config.* override names no field of the config: {detail}", file=sys.stderr)
    sys.exit(2)


def config_from_flags():
  """The --config file's config with the shortcut flags applied."""
  try:
    config = flags.FLAGS.config
    config.get("data")  # The file loads lazily: touch it here so a bad file fails here.
  except (OSError, SyntaxError, AttributeError, ImportError) as e:
    reason = next((l.strip() for l in str(e).splitlines() if "Errno" in l), str(e).splitlines()[0])
    raise UsageError(f"--config={flags.FLAGS['config'].config_filename}: cannot load this config "
                     f"file ({reason})") from None
  with config.unlocked():
    for flag, field in ((DATA, "data"), (TOKENIZER, "tokenizer"), (VOCAB_SIZE, "vocab_size"),
                        (SEED, "seed"), (TFDS_DATA_DIR, "tfds_data_dir"), (MESH, "mesh")):
      if flag.value is not None:
        config[field] = flag.value
  if config.tokenizer == "sentencepiece" and not config.vocab_size:
    raise UsageError("--tokenizer=sentencepiece needs --vocab_size (e.g. 1000)")
  return config


def prepare_workdir(config, ignored=frozenset()) -> str:
  """Checks the config, creates --workdir (a local path or a URL such as gs://bucket/run), checks
  that it is writable, and saves (or checks) the config in it (fields in `ignored` may differ: a
  sweep's grid, whose runs each check their own config, may grow).

  Until training saves its first checkpoint, a UsageError (see `run`) puts the workdir back as it was.
  """
  workdir = WORKDIR.value
  if not workdir:
    raise UsageError("--workdir is required: the directory for checkpoints and results")
  from llm_math import train_config  # pylint: disable=g-import-not-at-top
  train_config.check_config(config)
  root = files.path(workdir)
  try:
    before = {p.name for p in root.iterdir()} if root.is_dir() else None
    root.mkdir(parents=True, exist_ok=True)
    files.check_writable(root)
  except OSError as e:
    raise UsageError(f"--workdir={workdir}: not a writable directory "
                     f"({e.strerror or e})") from None
  if studies.is_primary():
    _FAILED_START_UNDO.append(lambda: _undo_start(root, before))
  studies.save_config(config, workdir, f"--workdir={workdir} holds a run", ignored,
                      write=studies.is_primary())
  return workdir


def run_study(run, config, workdir: str, summarize=None) -> dict:
  """`run(config, workdir, log) -> results` once, or once per --seeds seed and their aggregate
  (passed through the study's `summarize`, see `seeds.run_seeds`); then results.json, the figures
  and results.md are written (process 0) and the report printed."""
  from llm_math.studies import seeds as seeds_lib  # pylint: disable=g-import-not-at-top
  log = (lambda *a: print(*a, flush=True)) if studies.is_primary() else lambda *_: None
  if SEEDS.value:
    if SEED.value is not None:
      raise UsageError("--seed and --seeds: give one (--seeds runs the study once per seed)")
    try:
      seeds = [int(s) for s in SEEDS.value]
    except ValueError:
      raise UsageError(f"--seeds={','.join(SEEDS.value)}: expected integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
      raise UsageError(f"--seeds={','.join(SEEDS.value)}: expected distinct seeds")
    results = seeds_lib.run_seeds(run, config, workdir, seeds, log, summarize)
  else:
    results = run(config, workdir, log)
  report = studies.write_results(workdir, results)
  log(report)
  return results


_FAILED_START_UNDO = []


def _undo_start(root, before: set[str] | None):
  """Removes what a failed start added to a local `root`, unless a checkpoint was saved there
  meanwhile. (Object stores are left alone: they cannot list a tree cheaply.)"""
  if not files.is_local(root) or any(
      os.path.basename(d) == "checkpoints" and any(n.isdigit() for n in sub)
      for d, sub, _ in os.walk(root)):
    return
  if before is None:
    root.rmtree(missing_ok=True)
    return
  for p in root.iterdir():
    if p.name not in before:
      p.rmtree(missing_ok=True) if p.is_dir() else p.unlink(missing_ok=True)


def reject_unused_flags(unused, script: str):
  """A one-line UsageError for the first flag of `unused` ((flag, why it has no use) pairs) that
  the user set: a script that analyses a finished run must not silently ignore a shared flag."""
  for flag, reason in unused:
    if flag.value is not None:
      raise UsageError(f"--{flag.name} is not used by {script}: {reason}")


def _mesh_fits(devices: int) -> bool:
  """mesh_fits for the --config (and --mesh) of this run; False when the config does not load."""
  try:
    config = flags.FLAGS.config
    from llm_math import sharding  # pylint: disable=g-import-not-at-top
    return sharding.mesh_fits(MESH.value or config.mesh, config.batch_size, config.grad_accum_steps,
                              devices)
  except Exception:  # pylint: disable=broad-except
    return False  # The config is checked (with a clear error) once main starts.


_DISK_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)


def run(main, config_file: str | None = None):
  """app.run(main), turning user mistakes into one-line errors and NaN losses into a clean stop.

  With `config_file` (a file in experiments/configs/) the script takes --config, read by
  `config_from_flags()`.
  """
  if config_file:
    _define_config(config_file)
  from llm_math.train import DivergenceError  # pylint: disable=g-import-not-at-top
  from llm_math.studies import Interrupted  # pylint: disable=g-import-not-at-top

  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    try:
      from llm_math import sharding  # pylint: disable=g-import-not-at-top
      from llm_math import xla_cpu  # pylint: disable=g-import-not-at-top
      xla_cpu.tune(xla_cpu.host_devices(_mesh_fits) if config_file else 1)
      sharding.initialize_distributed()
      if DATA_CACHE.value:
        os.environ["LLM_MATH_DATA_CACHE"] = DATA_CACHE.value
      return main(argv)
    except Interrupted:  # The run saved its state: the same command resumes it.
      sys.exit(130)
    except UsageError as e:
      print(f"error: {e}", file=sys.stderr)
      while _FAILED_START_UNDO:
        _FAILED_START_UNDO.pop()()
      sys.exit(2)
    except DivergenceError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(3)
    except OSError as e:  # A disk that fills up or turns read-only under a running job.
      if e.errno not in _DISK_ERRORS:
        raise
      print(f"error: cannot write {e.filename or 'a file'} ({e.strerror}); what was saved before "
            "is intact: fix the disk and rerun to resume", file=sys.stderr)
      sys.exit(2)

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except
      message = str(e).strip().splitlines()
      message = message[0] if message else type(e).__name__
      if config_file and ("config_config" in message or isinstance(
          e, (SyntaxError, ImportError, AttributeError, OSError))):
        path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
        reason = message.replace("module 'config_config'", "the file")
        message = f"--config={path}: cannot load this config file ({reason})"
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)

  app.run(wrapped, flags_parser=parse_flags)
