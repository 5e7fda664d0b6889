"""Every point of a sweep is a run: a changed config is refused, an interrupted sweep continues."""
import json
import os
import signal
import subprocess
import sys

from tests import helpers

_SWEEP = helpers.TINY_OVERRIDES + ["--model_sizes=8x1,16x1", "--ngram_orders=1",
                                   "--config.checkpoint_every=2"]
_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _command(workdir, extra=()):
  return ([sys.executable, "-m", "experiments.perplexity", f"--workdir={workdir}"] + _SWEEP
          + list(extra))


def _model_nll(workdir):
  records = json.load(open(os.path.join(workdir, "results.json")))["records"]
  return {r["name"]: r["val_nll_nats"] for r in records if r["kind"] == "model"}


def test_sweep_refuses_a_changed_config_and_continues_after_an_interruption(tmp_path):
  full = tmp_path / "full"
  proc = subprocess.run(_command(full), cwd=helpers.REPO, env=_ENV, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  reference = _model_nll(full)
  assert len(reference) == 2

  changed = subprocess.run(_command(full, ["--config.learning_rate=0.01"]), cwd=helpers.REPO,
                           env=_ENV, capture_output=True, text=True, timeout=300)
  assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr
  assert changed.stderr.count("\n") == 1 and "learning_rate" in changed.stderr, changed.stderr
  assert "with a different config" in changed.stderr
  assert _model_nll(full) == reference  # Nothing was overwritten.

  part = tmp_path / "part"
  proc = subprocess.Popen(_command(part), cwd=helpers.REPO, env=_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  second_model = False
  for line in proc.stdout:
    second_model = second_model or line.startswith("--- transformer d16 L1")
    if second_model and line.startswith("step      4 | loss"):
      proc.send_signal(signal.SIGTERM)  # Preempted in the middle of the second point.
      break
  out = proc.stdout.read()
  assert proc.wait(timeout=120) != 0 and "checkpoint saved" in out, out
  assert not (part / "results.json").exists()
  resumed = subprocess.run(_command(part), cwd=helpers.REPO, env=_ENV, capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # The first point had finished and is reused; the second continues from its checkpoint.
  assert resumed.stdout.count("reusing the finished run in") == 1, resumed.stdout
  assert resumed.stdout.count("resumed from the checkpoint at step") == 1, resumed.stdout
  assert _model_nll(part) == reference
