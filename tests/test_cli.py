"""The experiment command line: user mistakes are one-line errors, and a killed run resumes exactly."""
import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from tests import helpers


def _run(args, workdir=None, timeout=240):
  cmd = [sys.executable, "-m", "experiments.perplexity"] + ([f"--workdir={workdir}"] if workdir
                                                             else []) + args
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  return subprocess.run(cmd, cwd=helpers.REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _assert_one_line_error(proc, *fragments):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
  assert errors, proc.stderr
  for fragment in fragments:
    assert fragment in proc.stderr, (fragment, proc.stderr)


@pytest.mark.parametrize("args,fragments", [
    (["--data=text:/no/such/corpus.txt"], ["error: --data=text:/no/such/corpus.txt: no such file"]),
    (["--data=imagenet"], ["error: --data='imagenet'", "expected 'synthetic'"]),
    (["--data=tfds:not_a_real_dataset"], ["has no dataset of that name"]),
    (["--tokenizer=sentencepiece"], ["needs --vocab_size"]),
    (["--config.model.d_model=30", "--config.model.num_heads=4"], ["divisible by num_heads"]),
    (["--config.model.attention_impl=fused", "--config.model.attn_logit_softcap=30"],
     ["--config.model: attn_logit_softcap=30.0 needs attention_impl='explicit'"]),
    (["--config.seq_len=100000"], ["fewer than one context window"]),
    (["--config.checkpoint_schedule=logs"],
     ["error: --config.checkpoint_schedule='logs': expected one of rolling, log"]),
    (["--config.no_such_field=1"], ["no_such_field"]),
    (["--config=/no/such/config.py"], ["/no/such/config.py"]),
])
def test_user_mistakes_are_one_line_errors(tmp_path, args, fragments):
  _assert_one_line_error(_run(args, tmp_path / "w"), *fragments)


def test_empty_file_and_vocab_too_large(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  _assert_one_line_error(_run([f"--data=text:{empty}"], tmp_path / "w1"), "the file is empty")
  small = tmp_path / "small.txt"
  small.write_text("a few words of text, repeated. " * 60)
  _assert_one_line_error(
      _run([f"--data=text:{small}", "--tokenizer=sentencepiece", "--vocab_size=20000"],
           tmp_path / "w2"), "--vocab_size=20000")


def test_missing_or_unwritable_workdir(tmp_path):
  _assert_one_line_error(_run([]), "--workdir is required")
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
  if os.access(locked, os.W_OK):  # root ignores permissions
    target = tmp_path / "a_file"
    target.write_text("x")
    _assert_one_line_error(_run([], target / "w"), "not a writable directory")
  else:
    _assert_one_line_error(_run([], locked / "w"), "not a writable directory")


def test_reusing_a_workdir_with_another_config_is_refused(tmp_path):
  proc = _run(helpers.TINY_OVERRIDES + ["--config.num_steps=4"], tmp_path)
  assert proc.returncode == 0, proc.stderr
  _assert_one_line_error(_run(helpers.TINY_OVERRIDES + ["--config.model.d_model=64"], tmp_path),
                         "holds a run with a different config", "model")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_results(tmp_path):
  """SIGINT to the real command, then the same command again == one uninterrupted run."""
  args = helpers.TINY_OVERRIDES + ["--config.num_steps=60", "--config.checkpoint_every=10",
                                   "--config.eval_every=20"]
  full = _run(args, tmp_path / "full")
  assert full.returncode == 0, full.stderr
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  part = tmp_path / "part"
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.perplexity", f"--workdir={part}"] + args,
      cwd=helpers.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if line.startswith("step     2") and "loss" in line:  # training is under way
      proc.send_signal(signal.SIGINT)
      break
  out = proc.stdout.read()
  assert proc.wait(timeout=120) != 0
  assert "checkpoint saved" in out, out
  assert not (part / "results.json").exists()
  resumed = _run(args, part)
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from the checkpoint at step" in resumed.stdout
  load = lambda d: {r["name"]: r["val_nll_nats"] for r in json.load(open(d / "results.json"))["records"]}
  assert load(part) == load(tmp_path / "full")


def test_a_run_saved_before_scan_layers_and_remat_policies_still_resumes(tmp_path):
  """config.json of a run from before `model.scan_layers` existed and when `model.remat` was a bool
  matches today's default config (the same model), and a real change is still refused."""
  from llm_math import studies  # pylint: disable=g-import-not-at-top
  from experiments.configs import perplexity  # pylint: disable=g-import-not-at-top
  from llm_math.errors import UsageError  # pylint: disable=g-import-not-at-top
  config = perplexity.get_config()
  old = json.loads(config.to_json_best_effort())
  del old["model"]["scan_layers"]
  old["model"]["remat"] = False
  (tmp_path / "checkpoints" / "500").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps(old))
  studies.save_config(config, str(tmp_path), "--workdir holds a run", write=False)
  config.model.scan_layers = True
  with pytest.raises(UsageError, match="model"):
    studies.save_config(config, str(tmp_path), "--workdir holds a run", write=False)
