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

The checks of these fields and the config of every training run the study makes are
`llm_math.studies.compression` (`check`, `check_shapes`, `plan_runs`).
"""
import ml_collections

from experiments.configs import perplexity


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

