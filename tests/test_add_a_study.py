"""The README's "Add a study" example runs as written: its code block, saved as warmup_study.py,
trains, writes results.json, results.md and its figure, and experiments.redraw redraws them."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.num_steps=12", "--config.seq_len=16", "--config.batch_size=8",
        "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.d_ff=64",
        "--config.model.num_heads=2", "--config.synthetic.train_tokens=20000",
        "--config.synthetic.val_tokens=2000", "--config.eval_stride=0", "--config.eval_every=6",
        "--config.checkpoint_every=6", "--config.warmup_steps=2"]


def _example() -> str:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  section = readme[readme.index("## Add a study"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_study_runs_as_written(tmp_path):
  (tmp_path / "warmup_study.py").write_text(_example())
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(tmp_path)])}
  workdir = tmp_path / "warmup"
  proc = subprocess.run([sys.executable, "-m", "warmup_study", f"--workdir={workdir}", *TINY],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert [r["warmup_steps"] for r in results["rows"]] == [0, 10, 12]
  assert all(0 < r["val_nll"] < results["references"]["uniform"] + 0.5 for r in results["rows"])
  assert results["figures"] == ["warmup.png"] and (workdir / "warmup.png").stat().st_size > 0
  assert "| warmup steps | val NLL (nats) |" in (workdir / "results.md").read_text()
  (workdir / "warmup.png").unlink()
  redraw = subprocess.run([sys.executable, "-m", "experiments.redraw", f"--workdir={workdir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert redraw.returncode == 0, redraw.stderr[-3000:]
  assert (workdir / "warmup.png").exists()
