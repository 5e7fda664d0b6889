r"""The batch-size law of SGD: steps and examples to a target loss, the critical batch size, gradient
noise (`llm_math.studies.batch_size`).

  python -m experiments.batch_size --workdir=/tmp/batch_size                # embedded synthetic source
  python -m experiments.batch_size --workdir=/tmp/batch_size_shakespeare \
      --data=text:../shared/data/tinyshakespeare.txt
  python -m experiments.batch_size --workdir=/tmp/batch_size_sqrt --config.lr_rule=sqrt
  LLM_MATH_CPU_DEVICES=8 python -m experiments.batch_size --workdir=/tmp/batch_size_mesh \
      --mesh=data:2,fsdp:2,tensor:2 --config.batch_sizes=8,16,32,64 --config.noise_microbatches=2

Each run has its own workdir (runs/pilot, runs/b<B>_lr<lr>): rerun the same command after a
preemption and the interrupted run continues, finished ones are reused. Writes results.json,
results.md (`llm_math.reports.batch_size`) and tradeoff.png, gradient_variance.png, noise_scale.png,
sharpness.png, learning_rate.png and loss_curves.png (`llm_math.figures.batch_size`) to --workdir
(and compile_cache/, compiled steps a rerun reuses); `python -m experiments.redraw --workdir=DIR`
redraws the figures and results.md from results.json alone.
"""

from experiments import common
from llm_math import studies
from llm_math.studies import batch_size


def main(argv):
  del argv
  config = common.config_from_flags()
  batch_size.check(config)
  workdir = common.prepare_workdir(config)
  studies.use_compilation_cache(workdir)
  common.run_study(batch_size.run, config, workdir, batch_size.summarize_seeds)


if __name__ == "__main__":
  common.run(main, "batch_size.py")
