"""Default config of experiments/compression.py: the perplexity default plus four compression studies.

The base model (also the distillation teacher) is the perplexity experiment's default: a 2-layer
Transformer trained for 1500 steps on the synthetic lagged-copy source (V=32, lag 16), or the run in
`--init_workdir`. On top of it:

  svd      validation perplexity vs rank: every Dense kernel truncated to the same fraction of its
           full rank, and a global energy budget over all kernels;
  quant    float vs symmetric absmax round-to-nearest int8/int4, per tensor/channel/group;
  lora     transfer to another source with the same vocabulary: LoRA at several ranks vs full
           fine-tuning vs no fine-tuning (vs training from scratch on the target);
  distill  a smaller student trained on T^2 soft targets mixed with hard labels vs the same student
           trained on hard labels alone, for the same steps.

The default transfer changes the source's lag (16 -> 12) and Zipf exponent (1.0 -> 1.5): where to
look back and what to predict for fresh tokens both change, and the vocabulary (32) stays. Unadapted,
the base model copies from the wrong position and is worse than a unigram model on the target. With a
corpus, use a tokenizer both corpora share (byte level), e.g.

  --data=text:../shared/data/english_pd.txt --tokenizer=byte --config.max_chars=2000000 \
  --config.lora.target_data=text:../shared/data/tinyshakespeare.txt

Next to the fields: their checks (`check`, before any work) and the config of every training run
the experiment makes (`plan_runs`), which that run's directory keeps and checks.
"""
import re

import flax.linen as nn
import jax
import ml_collections

from experiments.configs import perplexity
from llm_math import model as model_lib
from llm_math import train as train_lib
from llm_math import train_config
from llm_math.analysis import compression
from llm_math.errors import UsageError


def get_config() -> ml_collections.ConfigDict:
  c = perplexity.get_config()
  # Learned positions. With the default rotary ones, full fine-tuning at lora.full_learning_rate falls to
  # the unigram level on the lag 16 -> 12 transfer (2.15 nats, while LoRA r >= 2 reaches 0.78 against a
  # floor of 0.77), so "LoRA's share of full fine-tuning's gain" would compare against a failed run.
  c.model.pos_encoding = "learned"
  # Which studies to run, comma separated (any of svd, quant, lora, distill).
  c.studies = "svd,quant,lora,distill"
  # Sequences are tuples, so that they can be overridden: --config.lora.ranks='(1,4,16)'.

  c.svd = ml_collections.ConfigDict(dict(
      # Regex over parameter paths: every Dense kernel (attention q/k/v/out, MLP, LM head);
      # the embedding tables are lookups, not matrix products, and are kept.
      pattern=r"kernel$",
      # r = max(1, round(fraction * min(in, out))) for every matrix.
      rank_fractions=(0.03, 0.06, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0),
      # Global selection: the fewest singular values over all matrices keeping this share of
      # sum_m sum_i s_{m,i}^2 (minimizes the total squared Frobenius error for that count).
      energies=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999),
  ))

  c.quant = ml_collections.ConfigDict(dict(
      pattern=r"kernel$",
      # int<bits>-per_tensor | int<bits>-per_channel | int<bits>-group<g> (g divides every
      # matrix's input size: 64 and 256 here).
      schemes="int8-per_tensor,int8-per_channel,int8-group32,int4-per_tensor,int4-per_channel,"
              "int4-group32,int4-group16",
      scale_dtype="float16",  # How the scales are stored (counted in bits/param).
  ))

  c.lora = ml_collections.ConfigDict(dict(
      # Target source: 'synthetic' (the source `target_synthetic`, drawn with seed + 1) or a
      # corpus 'text:PATH[,PATH...]' tokenized with the base model's tokenizer.
      target_data="synthetic",
      target_synthetic=ml_collections.ConfigDict({**c.synthetic, "lag": 12, "zipf_exponent": 1.5}),
      target_max_chars=0,
      targets=r"attn/(query|value)/kernel$",  # Kernels that get a low-rank update.
      ranks=(1, 2, 4, 8, 16),
      alpha=8.0,  # Update scale alpha / r.
      num_steps=400,
      learning_rate=1e-2,  # LoRA factors (AdamW, warmup + cosine, no weight decay).
      full_learning_rate=1e-3,  # Full fine-tuning (AdamW with the base config's weight decay).
      warmup_steps=20,
      eval_every=50,
      scratch=True,  # Also train the base architecture from scratch on the target, same steps.
  ))

  c.distill = ml_collections.ConfigDict(dict(
      # The student: the base model block with these fields replaced.
      student=ml_collections.ConfigDict(dict(num_layers=1, d_model=64, num_heads=4, d_ff=256)),
      # loss = alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE(labels), one student per T.
      temperatures=(1.0, 2.0, 4.0),
      alpha=0.5,
      num_steps=600,
      learning_rate=3e-3,
      warmup_steps=50,
      eval_every=50,
      # Each seed draws the student's initialization and batch order; both students share them.
      seeds=(0, 1, 2),
  ))
  return c


STUDIES = ("svd", "quant", "lora", "distill")
STUDY_FIELDS = ("studies",) + STUDIES  # Blocks of this experiment, not of a training run.


def parse_studies(spec: str) -> list[str]:
  """'quant, svd' -> ['svd', 'quant'] (in the order the experiment runs them)."""
  studies = [s.strip() for s in spec.split(",") if s.strip()]
  if not studies or set(studies) - set(STUDIES):
    raise UsageError(f"--config.studies={spec!r}: expected a comma-separated subset of "
                     f"{','.join(STUDIES)}")
  return [s for s in STUDIES if s in studies]


def student_config(config) -> ml_collections.ConfigDict:
  """The base config with the model block's fields replaced by `distill.student`."""
  student = ml_collections.ConfigDict(config.to_dict())
  for key, value in config.distill.student.items():
    if key not in student.model:
      raise UsageError(f"--config.distill.student.{key}: not a field of the model block")
    student.model[key] = value
  return student


def check(config, vocab_size: int):
  """A one-line UsageError for any setting of the studies in `config.studies` that cannot run on
  the config's model: every mistake surfaces before any training."""
  studies = parse_studies(config.studies)
  model = model_lib.Transformer(train_config.model_config(config, vocab_size))
  params = nn.meta.unbox(jax.eval_shape(train_lib.lm_init(model, config.seq_len),
                                        jax.random.PRNGKey(0)))

  def need(ok: bool, field: str, value, expected: str):
    if not ok:
      raise UsageError(f"--config.{field}={value!r}: expected {expected}")

  def shapes(block: str, key: str) -> dict[str, tuple[int, int]]:
    try:
      return compression.matrix_shapes(params, config[block][key])
    except (re.error, ValueError) as e:
      paths = ", ".join(list(compression.flatten_tree(params))[:3])
      raise UsageError(f"--config.{block}.{key}={config[block][key]!r}: {e} (paths are like "
                       f"{paths})") from None

  if "svd" in studies:
    shapes("svd", "pattern")
    for field in ("rank_fractions", "energies"):
      values = list(config.svd[field])
      need(values and all(0 < f <= 1 for f in values), f"svd.{field}", values,
           "fractions in (0, 1]")
  if "quant" in studies:
    need(config.quant.scale_dtype in compression.SCALE_DTYPES, "quant.scale_dtype",
         config.quant.scale_dtype, f"one of {', '.join(compression.SCALE_DTYPES)}")
    inputs = sorted({n_in for n_in, _ in shapes("quant", "pattern").values()})
    for name in config.quant.schemes.split(","):
      try:
        group = compression.parse_scheme(name)["group_size"]
      except ValueError as e:
        raise UsageError(f"--config.quant.schemes: {e}") from None
      need(not group or all(n % group == 0 for n in inputs), "quant.schemes", name,
           f"groups that divide every matrix's input size {inputs}")
  if "lora" in studies:
    most = min(min(s) for s in shapes("lora", "targets").values())
    need(all(int(r) == r and 1 <= r <= most for r in config.lora.ranks), "lora.ranks",
         list(config.lora.ranks), f"integers in [1, {most}] (min(in, out) of the targets)")
    for field in ("num_steps", "eval_every", "alpha", "learning_rate", "full_learning_rate"):
      need(config.lora[field] > 0, f"lora.{field}", config.lora[field], "a positive value")
  if "distill" in studies:
    d = config.distill
    try:
      train_config.model_config(student_config(config), vocab_size)
    except UsageError as e:
      raise UsageError(str(e).replace("--config.model", "--config.distill.student")) from None
    for field in ("num_steps", "eval_every", "learning_rate"):
      need(d[field] > 0, f"distill.{field}", d[field], "a positive value")
    need(d.temperatures and all(t > 0 for t in d.temperatures), "distill.temperatures",
         list(d.temperatures), "one or more positive temperatures")
    need(d.seeds and len(set(d.seeds)) == len(d.seeds), "distill.seeds", list(d.seeds),
         "one or more distinct seeds")
    need(0.0 <= d.alpha <= 1.0, "distill.alpha", d.alpha, "a mixing weight in [0, 1]")


def run_config(config, **fields) -> ml_collections.ConfigDict:
  """A training run's own config, what its directory keeps and checks: the base config without the
  study blocks, with `fields` set."""
  run = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items()
                                   if k not in STUDY_FIELDS})
  run.update(fields)
  return run


def _schedule(block, learning_rate: float, weight_decay: float) -> dict:
  """`block`'s steps, warmup and evaluation; AdamW at `learning_rate`, cosine to a tenth of it."""
  return dict(num_steps=block.num_steps, eval_every=block.eval_every, learning_rate=learning_rate,
              min_learning_rate=learning_rate / 10, weight_decay=weight_decay,
              warmup_steps=min(block.warmup_steps, max(block.num_steps - 1, 0)))


def plan_runs(config, studies: list[str], base: dict) -> dict[tuple[str, ...], object]:
  """{directory names: config} of every training run after the base model; `base` (where the base
  model comes from) is part of the config of the runs that start from it."""
  runs, lc, d = {}, config.lora, config.distill
  if "lora" in studies:
    target = {"data": lc.target_data, "synthetic": lc.target_synthetic.to_dict(),
              "max_chars": lc.target_max_chars}
    full = _schedule(lc, lc.full_learning_rate, config.weight_decay)
    for rank in lc.ranks:
      runs["lora", f"rank_{rank}"] = run_config(
          config, **_schedule(lc, lc.learning_rate, 0.0), target=target, base=base,
          adapter={"rank": int(rank), "alpha": float(lc.alpha), "targets": lc.targets})
    runs["lora", "full"] = run_config(config, **full, target=target, base=base)
    if lc.scratch:
      runs["lora", "scratch"] = run_config(config, **full, target=target)
  if "distill" in studies:
    student = student_config(config)
    for seed in d.seeds:
      student_run = dict(_schedule(d, d.learning_rate, config.weight_decay), seed=int(seed))
      for t in d.temperatures:
        runs["distill", f"seed_{seed}", f"T_{t:g}"] = run_config(
            student, **student_run, teacher=base,
            distillation={"temperature": float(t), "alpha": float(d.alpha)})
      runs["distill", f"seed_{seed}", "scratch"] = run_config(student, **student_run)
  return runs
