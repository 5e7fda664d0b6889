r"""Check a run before paying for it: compile a config's train and evaluation steps for a TPU topology.

  pip install -e ".[tpu]"   # libtpu, the TPU compiler (no TPU needed)
  python -m experiments.compile --config=experiments/configs/gpt2_small.py --topology=v5e:2x2 \
      --config.mesh=fsdp:-1 --workdir=/tmp/compile_gpt2_v5e

Compiles exactly the step `llm_math.train.fit` would run for the config (`llm_math.aot`): the same
model, optimizer, shardings, donation and batch layout, on abstract shapes only, so it needs no TPU,
no network and no data. The vocabulary comes from the config (the synthetic source's, or
`vocab_size`), or from --vocab_size for tokenizers whose vocabulary depends on the data (char, byte).
--topology=local compiles for this machine's devices instead.

Writes DIR/compile_report.json (per-chip argument, output and temporary bytes, whether they fit in
the chip's HBM, FLOPs per step from XLA's cost analysis beside the 6N + 12LTd count, bytes of each
collective kind, compile seconds, the roofline step time and the MFU it bounds) and prints a one-line
summary last. A config that does not fit exits with status 1 and a line naming the largest buffers.
"""

import os
import sys

# A compile touches no chips: let several processes load libtpu at once (it otherwise takes a
# machine-wide lock file, and a second compile, or a test beside one, fails).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags  # pylint: disable=g-import-not-at-top

from experiments import common
from llm_math import aot
from llm_math import files
from llm_math.errors import UsageError

TOPOLOGY = flags.DEFINE_string(
    "topology", "local", "A TPU topology to compile for without its chips (v5e:2x2, v4:2x2x2, "
    "v5p:2x2x2, v6e:4x4, ...), or 'local' for this machine's devices.")

UNUSED_FLAGS = (
    (common.DATA, "no data is read: the shapes come from the config"),
    (common.TOKENIZER, "no data is tokenized: give the vocabulary with --vocab_size"),
    (common.TFDS_DATA_DIR, "no data is read"),
)


def vocabulary(config, flag_value: int | None) -> int:
  """The vocabulary the model is compiled for: --vocab_size, else the synthetic source's, else the
  config's SentencePiece vocab_size; char and byte vocabularies depend on the data, so they need
  the flag."""
  if flag_value is not None:
    if flag_value < 2:
      raise UsageError(f"--vocab_size={flag_value}: expected at least 2")
    return flag_value
  if config.data == "synthetic":
    return config.synthetic.vocab_size
  if config.get("tokenizer") == "byte":
    return 256
  if config.get("tokenizer") == "sentencepiece" and config.get("vocab_size", 0) > 0:
    return config.vocab_size
  raise UsageError(f"--vocab_size is needed: the vocabulary of --config.data={config.data!r} with "
                   f"tokenizer {config.get('tokenizer')!r} depends on the data")


def run_config(config):
  """The config of the run to compile: the config itself, or for a sweep study whose runs each get
  their own training fields (llm_math.studies.batch_size), the run with the largest batch."""
  if "batch_sizes" in config and "batch_size" not in config:
    from llm_math.studies import batch_size  # pylint: disable=g-import-not-at-top
    return batch_size.run_config(config, max(config.batch_sizes), config.learning_rate,
                                 num_steps=max(config.get("warmup_steps", 0), 1), target=0.0)
  return config


def main(argv):
  del argv
  common.reject_unused_flags(UNUSED_FLAGS, "compile.py")
  config = common.config_from_flags()
  workdir = common.WORKDIR.value
  if not workdir:
    raise UsageError("--workdir is required: the directory for compile_report.json")
  try:
    files.path(workdir).mkdir(parents=True, exist_ok=True)
    files.check_writable(workdir)
  except OSError as e:
    raise UsageError(f"--workdir={workdir}: not a writable directory ({e.strerror or e})") from None
  vocab_size = vocabulary(config, common.VOCAB_SIZE.value)
  devices = aot.topology_devices(TOPOLOGY.value)
  report = aot.compile_report(run_config(config), devices, vocab_size, TOPOLOGY.value)
  report["config"] = flags.FLAGS["config"].config_filename if "config" in flags.FLAGS else None
  files.write_json(files.path(workdir) / "compile_report.json", report, indent=2)
  print(f"wrote {files.path(workdir) / 'compile_report.json'}")
  if report["fits"] is False:
    need = (f"{report['per_chip_bytes']['total'] / aot.GiB:.2f} GiB per chip"
            if report["per_chip_bytes"] else report["compile_error"])
    print(f"error: does not fit ({need}; the chip has "
          f"{report['hbm_bytes_per_chip'] / aot.GiB:.0f} GiB); largest buffers of the step "
          f"(global shapes): {', '.join(report['largest_buffers'])}", file=sys.stderr)
  print(aot.summary_line(report))
  if report["fits"] is False:
    sys.exit(1)


if __name__ == "__main__":
  common.run(main, "perplexity.py")
