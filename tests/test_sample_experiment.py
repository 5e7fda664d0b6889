"""experiments/sample.py and experiments/embeddings.py end to end on a tiny character model.

A 1-layer model is trained for a few seconds on a generated play-like text (speaker names in
capitals, lowercase verse), then the scripts run as a user would run them.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from llm_math import checkpoint
from llm_math import data as data_lib
from llm_math import generate as generate_lib
from llm_math import model as model_lib
from llm_math import optimizer as optimizer_lib
from llm_math import sampling_session
from llm_math import sharding
from llm_math import train as train_lib
from llm_math.errors import UsageError
from tests import helpers

_SPEAKERS = ["KING HENRY", "QUEEN MARGARET", "ROMEO", "JULIET", "FRIAR LAURENCE", "DUKE VINCENTIO",
             "BAPTISTA", "PAULINA", "CLOWN", "WIZARD OF YORK"]
_WORDS = ("the and to of my a i you in that is not with me it for be his your this but he have "
          "as thou so him will what thy all her no by do shall if are we thee our lord on now "
          "good sir more they from then come would here love how let well queen king sweet night "
          "day").split()


def _play(num_lines: int, seed: int = 0) -> str:
  """Speeches: 'NAME:' then 1-3 lines of lowercase words, the first one capitalized."""
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < num_lines:
    out.append(f"{_SPEAKERS[rng.integers(len(_SPEAKERS))]}:")
    for _ in range(rng.integers(1, 4)):
      words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), rng.integers(4, 9))]
      line = " ".join(words)
      out.append(line[0].upper() + line[1:] + rng.choice([",", ".", ";", "!", "?"]))
    out.append("")
  return "\n".join(out)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A training workdir as experiments.perplexity leaves it: config.json, tokenizer, checkpoints."""
  root = tmp_path_factory.mktemp("sample")
  corpus = root / "play.txt"
  corpus.write_text(_play(1500))
  workdir = root / "run"
  workdir.mkdir()
  config = helpers.tiny_config(data=f"text:{corpus}", tokenizer="char", num_steps=60,
                               learning_rate=1e-2, eval_every=60, log_every=60,
                               checkpoint_every=60, eval_max_tokens=1024)
  dataset = data_lib.load(config.data, tokenizer="char", workdir=str(workdir))
  (workdir / "config.json").write_text(config.to_json_best_effort())
  train_lib.train(config, dataset, str(workdir), log=lambda _: None)
  return workdir


def _run(module, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=helpers.REPO, env=env,
                        capture_output=True, text=True, timeout=240)


def _listing(directory):
  return sorted((p, os.path.getmtime(os.path.join(r, p))) for r, _, files in os.walk(directory)
                for p in files)


def test_sample_prints_text_entropy_and_speed_and_matches_the_library(run_dir, tmp_path):
  before = _listing(run_dir)
  out_json = tmp_path / "samples.json"
  prompt = "ROMEO:\n"
  proc = _run("experiments.sample", f"--workdir={run_dir}", f"--prompt={prompt}",
              "--num_tokens=40", "--temperature=0.8", "--top_k=5", "--num_samples=2", "--seed=3",
              f"--output={out_json}")
  assert proc.returncode == 0, proc.stderr
  assert "identical tokens: yes" in proc.stdout, proc.stdout
  assert "tokens/s" in proc.stdout and "mean entropy of the sampling distribution" in proc.stdout
  # 40 tokens cross the 16-token window twice, so the context rule is announced.
  assert "context rule: windows of at most 16 tokens; when full, keep the last 8" in proc.stdout
  assert _listing(run_dir) == before  # the run's directory is only read
  record = json.loads(out_json.read_text())
  trained = checkpoint.load_trained(str(run_dir))
  alphabet = set(trained.tokenizer.chars)
  assert len(record["samples"]) == 2
  for text in record["samples"]:
    assert text.startswith(prompt) and len(text) == len(prompt) + 40 and set(text) <= alphabet
    assert text in proc.stdout
  assert record["identical_with_and_without_cache"] is True
  assert all(record["speed"][path]["tokens_per_s"] > 0 for path in ("cached", "uncached"))
  # The entropy of a top-5 distribution lies in [0, log 5]; it is per step, 40 steps.
  assert 0 < record["mean_entropy_nats"] <= np.log(5)
  assert len(record["entropy_per_step_nats"]) == 40
  # The command line draws exactly what the library draws for the same seed and settings.
  prompt_ids = np.tile(trained.tokenizer.encode(prompt)[None], (2, 1))
  library = generate_lib.generate(trained.params, trained.model_config, prompt_ids, 40,
                                  jax.random.PRNGKey(3), 0.8, top_k=5)
  np.testing.assert_array_equal(record["tokens"], library.tokens)
  np.testing.assert_allclose(record["mean_entropy_nats"], float(np.mean(library.entropy)),
                             rtol=1e-5)


def test_sample_user_mistakes_are_one_line_errors(run_dir):
  """The command ends with one line naming the flag; the library raises that line's UsageError
  (the command line prints a UsageError as one line, exit status 2, as the first case shows)."""
  proc = _run("experiments.sample", "--workdir=/no/such/run")
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  assert "error: --workdir=/no/such/run: no such directory" in proc.stderr.splitlines(), proc.stderr
  for prompt, settings, message in [
      ("caf\u00e9", {}, "--prompt: character '\u00e9' is not in the tokenizer's alphabet"),
      ("\n", {"top_p": 1.5}, "--top_p=1.5: must lie in (0, 1]")]:
    with pytest.raises(UsageError) as error:
      sampling_session.sample(str(run_dir), prompt, num_tokens=40, **settings)
    assert str(error.value) == message


def test_embeddings_experiment_measures_the_checkpoint(run_dir, tmp_path):
  out_dir = tmp_path / "emb"
  proc = _run("experiments.embeddings", f"--workdir={run_dir}", f"--output_dir={out_dir}",
              "--num_neighbors=3")
  assert proc.returncode == 0, proc.stderr
  results = json.loads((out_dir / "results.json").read_text())
  assert (out_dir / "results.md").read_text().startswith("# Token embeddings")
  trained = checkpoint.load_trained(str(run_dir))
  emb = np.asarray(trained.params["token_embed"]["embedding"], np.float64)
  v = emb.shape[0]
  assert results["texts"] == [trained.tokenizer.chars[i] for i in range(v)]

  # Spectrum: the singular values of the centred checkpoint matrix; the top-2 PCA share from them.
  s = np.linalg.svd(emb - emb.mean(0), compute_uv=False)
  spec = results["trained"]["spectrum"]
  np.testing.assert_allclose(spec["singular_values"], s, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(spec["top2_variance_share"], (s[:2] ** 2).sum() / (s ** 2).sum(),
                             rtol=1e-4)
  # Its variance effective rank: exp of the entropy of the variance shares s_i^2 / sum s^2.
  share = s ** 2 / (s ** 2).sum()
  share = share[share > 0]
  np.testing.assert_allclose(spec["variance_effective_rank"],
                             np.exp(-(share * np.log(share)).sum()), rtol=1e-6)
  assert 1 <= spec["variance_effective_rank"] <= len(s)

  # The initialization is the run's own step-0 embedding (same model, initializer and seed).
  model = model_lib.Transformer(trained.model_config)
  state, _ = train_lib.create_state(
      train_lib.lm_init(model, trained.config.seq_len), optimizer_lib.optimizer(trained.config),
      *sharding.from_config(trained.config),
      jax.random.split(jax.random.PRNGKey(trained.config.seed))[0])
  emb0 = np.asarray(state.params["token_embed"]["embedding"], np.float64)
  s0 = np.linalg.svd(emb0 - emb0.mean(0), compute_uv=False)
  np.testing.assert_allclose(results["initialization"]["spectrum"]["singular_values"], s0,
                             rtol=1e-4, atol=1e-6)

  # Neighbours: the 3 largest cosines of each row (self excluded), in order.
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  cos = unit @ unit.T
  np.fill_diagonal(cos, -np.inf)
  nb = results["trained"]["neighbors"]
  np.testing.assert_allclose(nb["cosine"], -np.sort(-cos, axis=1)[:, :3], atol=1e-5)
  np.testing.assert_allclose(np.take_along_axis(cos, np.asarray(nb["index"]), axis=1),
                             nb["cosine"], atol=1e-5)

  # Case analogies run over every ordered pair of letters present in both cases.
  case = results["trained"]["case"]
  letters = [c for c in "abcdefghijklmnopqrstuvwxyz" if c in results["texts"]
             and c.upper() in results["texts"]]
  assert case["letters"] == "".join(letters) and len(letters) >= 5
  for direction in ("lower_to_upper", "upper_to_lower"):
    d = case[direction]
    assert d["analogies"] == len(letters) * (len(letters) - 1)
    assert 0 <= d["top1"] <= d["top_k"] <= 1
  for name, purity in results["trained"]["class_purity"].items():
    assert 0 <= purity["same_class_share"] <= 1
    assert purity["chance"] == pytest.approx((purity["tokens"] - 1) / (v - 1)), name

  # Figures exist and are redrawn from results.json alone by experiments.redraw.
  figures = ["embedding_spectrum.png", "embedding_pca.png", "embedding_cosine.png"]
  assert results["figures"] == figures
  for name in figures:
    (out_dir / name).unlink()
  proc = _run("experiments.redraw", f"--workdir={out_dir}")
  assert proc.returncode == 0, proc.stderr
  for name in figures:
    assert (out_dir / name).stat().st_size > 10_000, name


@pytest.mark.parametrize("module,flag,fragment", [
    ("experiments.sample", "--data=synthetic",
     "error: --data is not used by sample.py: the data comes from the run in --workdir"),
    ("experiments.sample", "--mesh=data:-1",
     "error: --mesh is not used by sample.py: generation runs on one device"),
    ("experiments.embeddings", "--seed=7",
     "error: --seed is not used by embeddings.py: the initialization compared with uses the run's "
     "own seed (its config.json)"),
    ("experiments.embeddings", "--tokenizer=byte",
     "error: --tokenizer is not used by embeddings.py: the tokenizer is the one saved in --workdir"),
])
def test_shared_flags_the_scripts_do_not_use_are_refused(run_dir, tmp_path, module, flag, fragment):
  """A shared flag that would be silently ignored ends the script with one line naming it."""
  before = _listing(run_dir)
  output = [f"--output_dir={tmp_path}"] if module == "experiments.embeddings" else []
  proc = _run(module, f"--workdir={run_dir}", *output, flag)
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  assert fragment in proc.stderr.splitlines(), proc.stderr
  assert _listing(run_dir) == before and not os.listdir(tmp_path)


_TRAIN_ON_TWO_DEVICES = """
import json, sys
sys.path.insert(0, {repo!r})
from llm_math import xla_cpu
xla_cpu.tune(2)
import jax
import ml_collections
from llm_math import checkpoint
from llm_math import data as data_lib
from llm_math import train as train_lib
assert jax.device_count() == 2
config = ml_collections.ConfigDict(json.load(open({config!r})))
dataset = data_lib.load(config.data, tokenizer="char", workdir={workdir!r})
train_lib.train(config, dataset, {workdir!r}, log=lambda _: None)
"""


@pytest.mark.slow  # ~50 s: a 2-device training in a subprocess, then reading it on one.
def test_a_run_trained_on_two_devices_is_read_on_one_and_nothing_is_moved(run_dir, tmp_path):
  """Training splits the CPU into one device per core by default; sample and embeddings read on one
  device. The checkpoint is restored into the reader's own layout, and the run's files stay as they
  are (a reader once renamed every step of such a run as damaged)."""
  workdir = tmp_path / "two_devices"
  workdir.mkdir()
  for name in ("config.json", "tokenizer.json"):
    if (run_dir / name).exists():
      (workdir / name).write_bytes((run_dir / name).read_bytes())
  code = _TRAIN_ON_TWO_DEVICES.format(repo=helpers.REPO, config=str(workdir / "config.json"),
                                      workdir=str(workdir))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "LLM_MATH_CPU_DEVICES": "2"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  before = _listing(workdir)
  proc = _run("experiments.sample", f"--workdir={workdir}", "--prompt=ROMEO:", "--num_tokens=8",
              "--compare_cache=false")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "damaged" not in proc.stdout + proc.stderr
  proc = _run("experiments.embeddings", f"--workdir={workdir}", f"--output_dir={tmp_path / 'emb'}",
              "--num_neighbors=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _listing(workdir) == before
  # The same parameters as the trained state, read back whole.
  params, step = checkpoint.load_params(str(workdir))
  assert step == 60 and params["token_embed"]["embedding"].shape[0] > 10
