r"""Spectra of attention over training, entropy at a high learning rate, rank collapse with depth
(`llm_math.studies.attention_spectra`): a causal, a high learning-rate and a bidirectional
(masked-LM) model analysed layer by layer and head by head as they train, and deep models of four
architectures profiled for rank collapse.

  python -m experiments.attention_spectra --workdir=/tmp/spectra        # embedded synthetic source
  python -m experiments.attention_spectra --workdir=/tmp/spectra_shakespeare \
      --data=text:../shared/data/tinyshakespeare.txt

Every model trains in its own directory under --workdir (models/<run>/, models/deep/<architecture>/)
and resumes after preemption (SIGTERM or Ctrl-C saves a checkpoint; rerun the same command). Writes
results.json, spectra.npz (window-0 eigenvalues, singular values, stationary distributions and the
final attention), results.md (`llm_math.reports.attention_spectra`) and eigenvalues.png,
singular_values.png, stationary.png, entropy_gap.png, rank_collapse.png, sink_mass.png,
attention_maps.png, entropy_lr.png and dynamics.png (`llm_math.figures.attention_spectra`);
`python -m experiments.redraw --workdir=DIR` redraws them from results.json and spectra.npz.
"""

from experiments import common
from llm_math import studies
from llm_math.studies import attention_spectra


def main(argv):
  del argv
  config = common.config_from_flags()
  attention_spectra.check(config)
  workdir = common.prepare_workdir(config)
  studies.use_compilation_cache(workdir)
  common.run_study(attention_spectra.run, config, workdir, attention_spectra.summarize_seeds)


if __name__ == "__main__":
  common.run(main, "attention_spectra.py")
