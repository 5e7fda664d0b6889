"""A pod's preemption, on localhost: two processes of one job, each SIGTERMed at its own moment.

The hosts of a pod are told one by one, and each process would otherwise act on its own signal at a
different step (one saving a checkpoint, with its barriers, while the other dispatches a step whose
all-reduce waits for it). The processes agree on the stop step, save it and exit; the rerun ends with
the numbers of an uninterrupted run.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests import helpers

pytestmark = pytest.mark.slow  # Each case is three 400-step runs of two processes (~3 min).

_ARGS = ["--config.num_steps=400", "--config.warmup_steps=50", "--config.eval_every=100",
         "--config.checkpoint_every=100", "--config.log_every=50"]


def _run_two(workdir, signal_0=None, signal_1=None, timeout=300):
  """Runs experiments.perplexity as 2 processes. `signal_0` (a regular expression) SIGTERMs process 0
  when process 0 prints a matching line; `signal_1` SIGTERMs process 1 then: a number of seconds
  after process 0's signal, or a regular expression matched like signal_0's.
  Returns (return codes, seconds from the first signal to each process's exit, the output)."""
  port = 20000 + random.randrange(20000)
  procs = []
  for i in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "PYTHONUNBUFFERED": "1"}
    env.pop("LLM_MATH_CPU_DEVICES", None)
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "experiments.perplexity", f"--workdir={workdir}"] + _ARGS,
        cwd=helpers.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  sent, exited, lines = [None, None], [None, None], []

  def term(i):
    if sent[i] is None:
      sent[i] = time.time()
      procs[i].send_signal(signal.SIGTERM)

  def pump(i):
    for line in procs[i].stdout:
      lines.append(f"[{i}] {line}")
      if i == 0 and signal_0 and re.search(signal_0, line) and sent[0] is None:
        term(0)
        if isinstance(signal_1, (int, float)):
          threading.Timer(signal_1, term, (1,)).start()
      if i == 0 and isinstance(signal_1, str) and sent[0] and re.search(signal_1, line):
        term(1)
    procs[i].wait()
    exited[i] = time.time()

  threads = [threading.Thread(target=pump, args=(i,), daemon=True) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout)
  if any(t.is_alive() for t in threads):
    for p in procs:
      p.kill()
    raise AssertionError("the processes did not exit (a hang):\n" + "".join(lines[-40:]))
  waits = [None if sent[0] is None else e - sent[0] for e in exited]
  return [p.returncode for p in procs], waits, "".join(lines)


def _final_nll(workdir) -> float:
  results = json.loads(open(os.path.join(workdir, "results.json")).read())
  return next(r["val_nll_nats"] for r in results["records"] if r.get("kind") == "model")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  codes, _, out = _run_two(workdir)
  assert codes == [0, 0], out[-3000:]
  return _final_nll(workdir)


@pytest.mark.parametrize("signal_0, signal_1", [
    (r"step +150 \|", 0.7),  # Mid-run, 0.7 s apart.
    (r"step +100 \| loss", r"step +100 \| val nll"),  # Either side of the end of an evaluation.
], ids=["0.7s_apart", "around_an_evaluation"])
def test_two_processes_signalled_apart_agree_save_and_resume_exactly(uninterrupted, tmp_path,
                                                                      signal_0, signal_1):
  workdir = str(tmp_path / "run")
  codes, waits, out = _run_two(workdir, signal_0, signal_1)
  assert codes == [130, 130], out[-3000:]
  assert all(w is not None and w < 90 for w in waits), (waits, out[-3000:])  # No hang.
  saved = re.findall(r"received SIGTERM at step (\d+): checkpoint saved", out)
  assert saved, out[-3000:]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", saved[0]))
  codes, _, out = _run_two(workdir)
  assert codes == [0, 0], out[-3000:]
  assert f"resumed from the checkpoint at step {saved[0]}" in out
  assert abs(_final_nll(workdir) - uninterrupted) <= 1e-5
