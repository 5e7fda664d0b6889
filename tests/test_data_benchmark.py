"""benchmarks.data end to end on a tiny generated corpus: every part prints its lines, with positive
numbers, and a missing corpus is a one-line error naming --text."""
import os
import re
import subprocess
import sys

from tests import helpers

def _run(args, timeout=120):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  return subprocess.run([sys.executable, "-m", "benchmarks.data", *args], cwd=helpers.REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def test_benchmark_prints_every_part_and_rejects_a_missing_corpus(tmp_path):
  corpus = tmp_path / "corpus.txt"
  helpers.write_corpus(corpus, 300_000)
  tmp = tmp_path / "bench"
  proc = _run([f"--text={corpus}", "--repeat=2", "--tokenizers=char,byte,sentencepiece",
               "--vocab_size=300", "--startup_steps=2", "--startup_seq_len=16",
               "--startup_batch_size=4", "--startup_eval_max_tokens=2000", "--startup_corpora=Nx",
               f"--jax_cache_dir={tmp_path / 'jax_cache'}", "--loader_seq_len=64",
               "--loader_batch_size=4", "--loader_steps=10", f"--tmp_dir={tmp}"])
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = proc.stdout.splitlines()

  def find(pattern: str, count: int) -> list[str]:
    found = [l for l in lines if re.match(pattern, l)]
    assert len(found) == count, (pattern, proc.stdout)
    return found

  assert find(r"cpu: ", 1)
  for line in find(r"tokenize (char|byte|sentencepiece) ", 6):
    assert float(re.search(r"([\d.]+) MB/s", line)[1]) > 0
    assert int(re.search(r"\| ([\d,]+) tokens", line)[1].replace(",", "")) > 0
  for line in find(r"prepare +(1x|2x) ", 2):
    assert float(re.search(r"\): ([\d.]+) s", line)[1]) > 0, line
    assert float(re.search(r"\| peak RSS ([\d,]+) MiB", line)[1].replace(",", "")) > 0, line
    assert "workers' peak RSS" in line
  runs = find(r"startup +2x (first|second) +run", 2)  # Only Nx: each run is a fresh process.
  assert all("reused=True" in l for l in runs if "second" in l), runs
  assert all("reused=False" in l for l in runs if "first" in l), runs
  for line in runs:
    assert float(re.search(r"total startup ([\d.]+) s", line)[1]) > 0
    data_s = float(re.search(r"data ([\d.]+) s", line)[1])
    assert data_s > 0 if "first" in line else data_s >= 0  # A reused dataset opens in ~1 ms.
    assert float(re.search(r"peak RSS at step 2 ([\d,]+) MiB", line)[1].replace(",", "")) > 0
  assert len(find(r"    time: imports ", 2)) == len(find(r"    memory: RSS after load ", 2))
  find(r"startup +2x data work: first run", 1)
  for line in find(r"loader (numpy|prefetch)", 2):
    assert float(re.search(r"\| +([\d,]+) tokens/s", line)[1].replace(",", "")) > 0
    assert "x the target" in line
  summary = lines.index("== summary ==")
  assert len(lines) - summary > 10
  assert not tmp.exists()  # Removed without --keep.

  nothing = tmp_path / "nothing.txt"
  missing = _run([f"--text={nothing}"], timeout=60)
  assert missing.returncode != 0 and "Traceback" not in missing.stderr
  assert missing.stderr.strip().splitlines() == [
      f"error: --text={nothing}: no such file (pass --text=PATH to a UTF-8 corpus)"]
