"""A workdir in a bucket: training, resume and results all land at gs://, served by a local GCS emulator.

The emulator (gcp-storage-emulator, in memory on 127.0.0.1) answers the same HTTP API as Cloud
Storage, so everything goes through the real non-local code: etils.epath -> fsspec -> gcsfs for our
files, tensorstore's gcs driver for orbax's arrays. The experiment runs in subprocesses whose
environment points both clients at the emulator with anonymous credentials.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests import helpers

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")


# The emulator answers media downloads without the `x-goog-generation` header that Cloud Storage
# sends. tensorstore's gcs driver reads an object's generation from that header, so it records
# generation 0, and its next conditional read of the same object (OCDBT re-reading its manifest,
# `ifGenerationNotMatch=0`) fails with "Malformed StorageGeneration". This launcher adds the
# object's generation headers to every download and then runs the emulator's own command line.
_EMULATOR = """
import sys
from gcp_storage_emulator import __main__ as cli, server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

plain_download = objects.download

def download(request, response, storage, *args, **kwargs):
  plain_download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj["metageneration"])

objects.download = download  # objects.get (?alt=media) calls it by name
for _, methods in server.HANDLERS:  # the routes hold the function itself
  for method, handler in list(methods.items()):
    if handler is plain_download:
      methods[method] = download
cli.main(sys.argv[1:])
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator_env():
  """Environment for a process whose gs:// paths go to a fresh in-memory emulator."""
  port = _free_port()
  endpoint = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
      [sys.executable, "-c", _EMULATOR, "start", "--host", "127.0.0.1",
       "--port", str(port), "--in-memory", "--default-bucket", "bucket", "--quiet"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        pytest.fail("the GCS emulator did not start")
      time.sleep(0.05)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
         "STORAGE_EMULATOR_HOST": endpoint,  # gcsfs and google-cloud-storage
         "TENSORSTORE_GCS_HTTP_URL": endpoint,  # orbax's array writes
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: no credential lookup
         "FSSPEC_GCS_TOKEN": "anon", "NO_GCE_CHECK": "true",  # gcsfs: anonymous, no metadata server
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # plain HTTP API (no gRPC layout probe)
         "EPATH_USE_TF": "false"}
  try:
    yield env
  finally:
    proc.terminate()
    proc.wait(timeout=10)


_LIST_AND_READ = """
import json, sys
from etils import epath
root = epath.Path(sys.argv[1])
out = {"top": sorted(p.name for p in root.iterdir()),
       "checkpoints": sorted(p.name for p in (root / "checkpoints").iterdir()),
       "metrics": (root / "metrics.jsonl").read_text(),
       "results": json.loads((root / "results.json").read_text())}
print(json.dumps(out))
"""


def test_training_resume_and_results_in_a_bucket(emulator_env):
  workdir = "gs://bucket/runs/tiny"
  run = lambda steps: subprocess.run(
      [sys.executable, "-m", "experiments.perplexity", f"--workdir={workdir}"]
      + helpers.TINY_OVERRIDES + [f"--config.num_steps={steps}", "--config.warmup_steps=2"],
      cwd=helpers.REPO, env=emulator_env, capture_output=True, text=True, timeout=300)
  first = run(8)
  assert first.returncode == 0, first.stderr[-3000:]
  second = run(12)  # num_steps may grow on resume: continues from the bucket's step 8.
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from the checkpoint at step 8" in second.stdout

  listing = subprocess.run([sys.executable, "-c", _LIST_AND_READ, workdir], env=emulator_env,
                           capture_output=True, text=True, timeout=120)
  assert listing.returncode == 0, listing.stderr[-3000:]
  found = json.loads(listing.stdout.strip().splitlines()[-1])
  assert {"config.json", "metrics.jsonl", "results.json", "results.md", "perplexity.png",
          "ngram_orders.png", "checkpoints"} <= set(found["top"])
  assert any(name.startswith("events.out.tfevents") for name in found["top"])
  assert {"8", "12"} <= set(found["checkpoints"])
  train_steps = [r["step"] for r in map(json.loads, found["metrics"].splitlines()) if "loss" in r]
  assert train_steps == [2, 4, 6, 8, 10, 12]
  model = next(r for r in found["results"]["records"] if r["kind"] == "model")
  assert model["train_steps"] == 12
