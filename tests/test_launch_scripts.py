"""launch/cloud_tpu.sh with a fake gcloud on PATH: the commands it sends, their quoting, its errors."""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "cloud_tpu.sh")

# Records each call's arguments (NUL-separated) in its own numbered file; fails any call whose
# arguments contain $FAKE_GCLOUD_FAIL.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
calls=("$FAKE_GCLOUD_DIR"/call-*)
[[ -e "${calls[0]}" ]] || calls=()
printf '%s\0' "$@" > "$FAKE_GCLOUD_DIR/call-$(printf '%03d' "${#calls[@]}")"
if [[ -n "${FAKE_GCLOUD_FAIL:-}" && "$*" == *"$FAKE_GCLOUD_FAIL"* ]]; then exit 3; fi
"""

FLAGS = ["--config.note=two words", "it's", "$HOME", "*", ""]


@pytest.fixture
def launch(tmp_path):
  bin_dir, calls_dir = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  calls_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)

  def run(args, fail=None, **env_vars):
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
           "FAKE_GCLOUD_DIR": str(calls_dir), "TPU_NAME": "llm-math", "ZONE": "us-central2-b",
           "ACCELERATOR": "v4-8", "BUCKET": "gs://my-bucket", "REPO_URL": "https://example.com/r.git",
           **({"FAKE_GCLOUD_FAIL": fail} if fail else {})}
    env.update(env_vars)
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=30)
    calls = [path.read_bytes().decode().split("\0")[:-1] for path in sorted(calls_dir.iterdir())]
    return proc, calls

  return run


def _remote_argv(command):
  """What the worker's shell makes of an ssh --command string, with cd and python3 stubbed out."""
  stubs = "cd() { :; }; python3() { printf '%s\\0' \"$@\"; }; "
  out = subprocess.run(["bash", "-c", stubs + command], capture_output=True, text=True, check=True)
  return out.stdout.split("\0")[:-1]


def _command(call):
  [command] = [a[len("--command="):] for a in call if a.startswith("--command=")]
  return command


def test_default_steps_create_install_run_delete(launch):
  proc, calls = launch(["perplexity", *FLAGS])
  assert proc.returncode == 0, proc.stderr
  assert [c[:4] for c in calls] == [["compute", "tpus", "tpu-vm", verb] for verb in
                                    ("create", "ssh", "ssh", "delete")]
  assert "--accelerator-type=v4-8" in calls[0] and "--spot" not in calls[0]
  assert "--version=tpu-ubuntu2204-base" in calls[0]
  assert "--worker=all" in calls[1] and "--worker=all" in calls[2]
  install = _command(calls[1])
  assert "git clone -q https://example.com/r.git ~/llm_math" in install
  assert "pip install -q -e . gcsfs" in install and "jax[tpu]" in install
  workdir = "gs://my-bucket/llm_math/llm-math/perplexity"
  assert _remote_argv(_command(calls[2])) == ["-m", "experiments.perplexity",
                                              f"--workdir={workdir}", *FLAGS]
  assert f"gcloud storage ls {workdir}" in proc.stdout
  assert f"tensorboard --logdir={workdir}" in proc.stdout


def test_failed_run_keeps_the_vm(launch):
  proc, calls = launch(["perplexity"], fail="experiments.perplexity")
  assert proc.returncode == 3
  assert [c[3] for c in calls] == ["create", "ssh", "ssh"]
  assert "error: run failed (exit 3)" in proc.stderr
  assert "gs://my-bucket/llm_math/llm-math/perplexity" in proc.stderr
  assert "tensorboard" not in proc.stdout


def test_workdir_override_spot_and_chosen_steps(launch):
  proc, calls = launch(["perplexity", "--config.num_steps=5"], STEPS="create run", SPOT="1",
                       BUCKET=None, WORKDIR="gs://other/runs/a b/")
  assert proc.returncode == 0, proc.stderr
  assert [c[3] for c in calls] == ["create", "ssh"]
  assert "--spot" in calls[0]
  assert _remote_argv(_command(calls[1]))[2:] == ["--workdir=gs://other/runs/a b",
                                                  "--config.num_steps=5"]


def test_delete_alone_needs_no_bucket_or_accelerator(launch):
  proc, calls = launch(["perplexity"], STEPS="delete", BUCKET=None, ACCELERATOR=None)
  assert proc.returncode == 0, proc.stderr
  assert [c[3] for c in calls] == ["delete"]


@pytest.mark.parametrize("args,env,message", [
    ([], {}, "error: no experiment given"),
    (["perplexity"], {"TPU_NAME": None}, "error: set TPU_NAME"),
    (["perplexity"], {"ZONE": ""}, "error: set ZONE"),
    (["perplexity"], {"ACCELERATOR": None}, "error: set ACCELERATOR"),
    (["perplexity"], {"BUCKET": None}, "error: set BUCKET"),
    (["perplexity"], {"BUCKET": "my-bucket"}, "error: BUCKET must start with gs://"),
    (["perplexity"], {"WORKDIR": "/tmp/w"}, "error: WORKDIR must start with gs://"),
    (["perplexity"], {"STEPS": "create deploy"}, "error: unknown step 'deploy'"),
    (["perplexity"], {"STEPS": ""}, "error: STEPS is empty"),
    (["perplexity"], {"SPOT": "yes"}, "error: SPOT must be 1 or 0"),
    (["no_such_experiment"], {}, "error: unknown experiment 'no_such_experiment'"),
    (["../perplexity"], {}, "error: unknown experiment"),
    (["perplexity", "--workdir=/tmp/x"], {}, "error: do not pass --workdir"),
])
def test_mistakes_are_one_line_errors_before_any_gcloud_call(launch, args, env, message):
  proc, calls = launch(args, **env)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [proc.stderr.strip()]
  assert proc.stderr.startswith(message), proc.stderr
  assert calls == []


def test_bash_syntax_and_shellcheck():
  subprocess.run(["bash", "-n", SCRIPT], check=True)
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  proc = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
  assert proc.returncode == 0 and not proc.stdout, proc.stdout
