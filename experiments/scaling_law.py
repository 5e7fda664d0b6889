r"""The two-variable scaling law L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022,
approach 3) and the compute-optimal N*(C), D*(C) for C = 6 N D (`llm_math.studies.scaling_law`).

Each model size of --config.model_sizes trains one WSD trunk of the largest of --config.budgets
(training steps); every smaller budget branches off the trunk where its own decay starts and trains
only its cool-down. The fit has bootstrap 95% intervals (--config.fit_bootstrap resamples).

  python -m experiments.scaling_law --workdir=/tmp/scaling_law    # tiny shakespeare, 4 x 4 runs
  python -m experiments.scaling_law --workdir=/tmp/sl_small \
      --config.model_sizes=32x1,48x2,64x2 --config.budgets=250,500,1000

Writes results.json, results.md (`llm_math.reports.scaling_law`) and scaling_law_isoflop.png,
scaling_law_optimal.png, scaling_law_fit.png (`llm_math.figures.scaling_law`) to --workdir, and each
run in models/d<D>_L<L>/{trunk,steps_<S>}/; the study resumes after preemption (rerun the same
command), and `python -m experiments.redraw --workdir=DIR` redraws the report and figures from
results.json alone.
"""

from experiments import common
from llm_math import studies
from llm_math.studies import scaling_law


def main(argv):
  del argv
  config = common.config_from_flags()
  scaling_law.check(config)
  workdir = common.prepare_workdir(config, ignored=scaling_law.GRID_FIELDS)
  studies.use_compilation_cache(workdir)
  common.run_study(scaling_law.run, config, workdir, scaling_law.summarize_seeds)


if __name__ == "__main__":
  common.run(main, "scaling_law.py")
