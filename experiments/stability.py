r"""Training instabilities at small scale: learning-rate sweeps with and without qk-layernorm and
z-loss (`llm_math.studies.stability`).

  python -m experiments.stability --workdir=/tmp/stability          # embedded synthetic source
  python -m experiments.stability --workdir=/tmp/stability_shakespeare \
      --data=text:../shared/data/tinyshakespeare.txt

Writes results.json, results.md (`llm_math.reports.stability`) and lr_sweep.png, lr_sensitivity.png
and logit_growth.png (`llm_math.figures.stability`) to --workdir; `python -m experiments.redraw
--workdir=DIR` redraws both from results.json alone.
"""

from experiments import common
from llm_math import studies
from llm_math.studies import stability


def main(argv):
  del argv
  config = common.config_from_flags()
  stability.sizes(config)
  workdir = common.prepare_workdir(config, ignored={"stability"})
  studies.use_compilation_cache(workdir)
  common.run_study(stability.run, config, workdir)


if __name__ == "__main__":
  common.run(main, "stability.py")
