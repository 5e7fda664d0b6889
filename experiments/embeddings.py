r"""Geometry of a trained model's token embeddings: neighbours, analogies, spectrum and 2-D PCA
(`llm_math.studies.embeddings`).

  python -m experiments.embeddings --workdir=/tmp/shakespeare_cpu --output_dir=/tmp/shakespeare_emb

Reads the token embedding matrix of the training run in --workdir (latest checkpoint) and the same
matrix at the run's initialization. Writes to --output_dir (default <workdir>/embeddings, so the
run's own results stay untouched): results.json, results.md (`llm_math.reports.embeddings`),
embedding_spectrum.png, embedding_pca.png and embedding_cosine.png (`llm_math.figures.embeddings`);
`python -m experiments.redraw --workdir=OUTPUT_DIR` redraws them from results.json alone.

Everything comes from the run in --workdir, so the shared flags --data, --tokenizer, --vocab_size,
--seed, --tfds_data_dir and --mesh are refused with an error rather than silently ignored (the
initialization compared with is always the run's own seed).
"""

import os
import time

from absl import flags

from experiments import common
from llm_math import studies
from llm_math.studies import embeddings

OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                 "Where results and figures go (default: <workdir>/embeddings).")
NUM_NEIGHBORS = flags.DEFINE_integer("num_neighbors", 5, "k of the nearest-neighbour statistics.")

# Shared flags (experiments/common.py) that analysing a finished run has no use for, and why.
UNUSED_FLAGS = (
    (common.DATA, "the data comes from the run in --workdir"),
    (common.TOKENIZER, "the tokenizer is the one saved in --workdir"),
    (common.VOCAB_SIZE, "the vocabulary is the one saved in --workdir"),
    (common.SEED, "the initialization compared with uses the run's own seed (its config.json)"),
    (common.TFDS_DATA_DIR, "no dataset is read, only the run in --workdir"),
    (common.MESH, "the analysis runs on one device"),
)


def main(argv):
  del argv
  start = time.time()
  common.reject_unused_flags(UNUSED_FLAGS, "embeddings.py")
  workdir = common.WORKDIR.value
  trained = embeddings.load_run(workdir)
  embeddings.check(trained, NUM_NEIGHBORS.value)
  out_dir = embeddings.prepare_output_dir(OUTPUT_DIR.value or os.path.join(workdir, "embeddings"))
  results = embeddings.run(trained, workdir, NUM_NEIGHBORS.value,
                           print if studies.is_primary() else lambda *_: None)
  if studies.is_primary():
    print(studies.write_results(out_dir, results))
    print(f"wrote {os.path.join(out_dir, 'results.json')}, results.md, "
          f"{', '.join(results['figures'])} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
  common.run(main)
