"""Small configs, datasets and parameter trees shared by the tests."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import perplexity as default_config
from llm_math import data as data_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("LLM_MATH_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
TINY_SHAKESPEARE = os.path.join(SHARED_DATA, "tinyshakespeare.txt")

TINY_OVERRIDES = [
    "--config.num_steps=12", "--config.seq_len=16", "--config.batch_size=8",
    "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.d_ff=64",
    "--config.model.num_heads=2", "--config.synthetic.train_tokens=20000",
    "--config.synthetic.val_tokens=2000", "--config.synthetic.lag=4",
    "--config.eval_every=6", "--config.log_every=2", "--config.checkpoint_every=4",
    "--config.eval_stride=0", "--config.warmup_steps=2",
]


def tiny_config(**overrides):
  """The default config shrunk to a model that trains in a second or two."""
  c = default_config.get_config()
  c.num_steps = 12
  c.seq_len = 16
  c.batch_size = 8
  c.model.update(num_layers=1, d_model=32, d_ff=64, num_heads=2)
  c.synthetic.update(train_tokens=20000, val_tokens=2000, lag=4)
  c.eval_every, c.log_every, c.checkpoint_every, c.eval_stride = 6, 2, 4, 0
  c.warmup_steps = 2
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c


def tiny_dataset(config):
  return data_lib.load("synthetic", seed=config.seed, synthetic_config=config.synthetic)


def x64():
  """Scoped float64 (jax.enable_x64 context manager on recent jax, jax.experimental before)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


# Shapes of `transformer_params`: vocab, context, d_model, heads, head dim, MLP width.
V, T, D, H, DH, F = 11, 8, 16, 2, 8, 32


def transformer_params(seed=0, n_layers=2):
  """A hand-built params tree with the project's Transformer layout (random values)."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  ln = lambda: {"scale": jnp.ones((D,)), "bias": jnp.zeros((D,))}
  params = {"token_embed": {"embedding": f(V, D)}, "pos_embed": {"embedding": f(T, D)}}
  for i in range(n_layers):
    params[f"block_{i}"] = {
        "ln_attn": ln(),
        "attn": {
            "query": {"kernel": f(D, H, DH), "bias": f(H, DH)},
            "key": {"kernel": f(D, H, DH), "bias": f(H, DH)},
            "value": {"kernel": f(D, H, DH), "bias": f(H, DH)},
            "out": {"kernel": f(H, DH, D), "bias": f(D)},
        },
        "ln_mlp": ln(),
        "mlp": {"fc_in": {"kernel": f(D, F), "bias": f(F)},
                "fc_out": {"kernel": f(F, D), "bias": f(D)}},
    }
  params["ln_final"] = ln()
  params["lm_head"] = {"kernel": f(D, V)}
  return params


CORPUS_WORDS = ["the", "cat", "sat", "on", "a", "mat", "naïve", "café", "日本", "zebra", "of", "and",
                "\t"]


def write_corpus(path, n_chars: int, seed: int = 0, newline: str = "\n") -> str:
  """A random text of about `n_chars` characters (some lines empty, some non-ASCII); returns it."""
  rng = random.Random(seed)
  lines, n = [], 0
  while n < n_chars:
    line = " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(0, 12)))
    lines.append(line)
    n += len(line) + 1
  text = newline.join(lines)
  path.write_bytes(text.encode("utf-8"))
  return text


def other_settings(stop_after: str) -> list:
  """`run_study` settings a study's one-device result must survive: 8 devices on a data x fsdp x
  tensor mesh (not slow, so the default run has it), 2 processes, and SIGTERM once a line matching
  `stop_after` is printed, then the same command again."""
  return [
      pytest.param({"devices": 8, "mesh": "data:2,fsdp:2,tensor:2"}, id="8_devices"),
      pytest.param({"processes": 2}, id="2_processes", marks=pytest.mark.slow),
      pytest.param({"stop_after": stop_after}, id="preempted_and_resumed", marks=pytest.mark.slow),
  ]


def run_study(study: str, workdir, args: list[str], *, devices: int = 1, processes: int = 1,
              stop_after: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
  """Runs `python -m experiments.<study> --workdir=... args` through the launch scripts: one process
  with `devices` CPU devices (launch/local.sh), or `processes` processes (launch/local_multiprocess.sh).

  With `stop_after` (a regular expression), SIGTERM goes to the run's processes as soon as a line of
  its output matches: a preemption at that point. Returns the completed process (stdout holds the
  output of all processes).
  """
  env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
         "LLM_MATH_CPU_DEVICES": str(devices), "PYTHONUNBUFFERED": "1"}
  if processes > 1:
    cmd = ["bash", "launch/local_multiprocess.sh", study]
    env["NUM_PROCESSES"] = str(processes)
  else:
    cmd = ["bash", "launch/local.sh", study]
    env["DEVICES"] = str(devices)
  cmd += [f"--workdir={workdir}"] + list(args)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  lines, stopped = [], False
  deadline = time.time() + timeout
  for line in proc.stdout:
    lines.append(line)
    if stop_after and not stopped and re.search(stop_after, line):
      os.kill(proc.pid, signal.SIGTERM)  # launch/local_multiprocess.sh passes it on, once.
      stopped = True
    if time.time() > deadline:
      os.killpg(proc.pid, signal.SIGKILL)
      raise AssertionError(f"{study} ran past {timeout} s:\n" + "".join(lines[-40:]))
  proc.wait()
  out = "".join(lines)
  if stop_after:
    assert stopped, f"no output line matched {stop_after!r}:\n{out[-3000:]}"
  elif proc.returncode:
    raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}")
  return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def results(workdir) -> dict:
  with open(os.path.join(str(workdir), "results.json")) as f:
    return json.load(f)


def pick(tree, path: str):
  """tree['a'][0]['b'] for the path 'a.0.b'."""
  for key in path.split("."):
    tree = tree[int(key)] if isinstance(tree, list) else tree[key]
  return tree


def assert_same_numbers(a: dict, b: dict, paths: list[str], rtol: float, atol: float = 0.0):
  """The numbers at `paths` (see `pick`) of two results.json agree to rtol/atol (None == None)."""
  for path in paths:
    x, y = pick(a, path), pick(b, path)
    if x is None or y is None or isinstance(x, (str, bool)):
      assert x == y, (path, x, y)
    else:
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol,
                                 atol=atol, err_msg=path)
