"""Default config of experiments/attention_spectra.py: a few minutes on 2 CPU cores.

The model of experiments/configs/perplexity.py with 4 layers, trained three times on the same data:
causal at the default learning rate, causal at `high_lr_factor` times that rate with no warmup, and
bidirectional (`model.causal=False`) with a masked-token objective. `model.causal` is set per run
(both variants always run). Snapshots of every run are analysed at `spectra.track_steps` on a fixed
batch of validation windows. Rank collapse is measured on `deep.num_layers`-layer models of four
architectures (pure attention, attention + skip, attention + MLP, the full block; one shared
initial draw), at initialization and after `deep.num_steps` steps.

Every run is checkpointed every `checkpoint_every` steps in its own directory under the workdir.
`checkpoint_schedule = "log"`: the three tracked runs also keep their state at steps 0, 1, 2, 4, ...
below `checkpoint_every` and then every `checkpoint_every` steps (models/<run>/snapshots/); their
entropy, effective rank, spectral gap and sink mass over training are measured on these checkpoints
after training (results.json runs.<run>.dynamics, dynamics.png). The rank-collapse models keep the
rolling checkpoints only.
Fields of the perplexity config that this experiment does not read are dropped: the evaluation
fields but eval_batch_size (every snapshot is scored on `spectra.eval_windows` fixed windows),
max_loss_factor (only a non-finite loss stops a run, as diverged: the high learning rate may) and
the n-gram and sweep fields.
"""
import ml_collections

from experiments.configs import perplexity


def get_config() -> ml_collections.ConfigDict:
  c = perplexity.get_config()
  for unused in ("eval_every", "eval_stride", "eval_max_tokens", "eval_sample_every",
                 "max_loss_factor", "ngram", "train_transformer", "model_sizes", "tokenizers"):
    del c[unused]
  c.model.num_layers = 4
  c.model.pos_encoding = "learned"  # GPT-2-style positions, as the README numbers were measured.
  c.batch_size = 16
  c.num_steps = 600
  c.learning_rate = 3e-3
  c.min_learning_rate = 3e-4
  c.warmup_steps = 50
  c.log_every = 25
  c.checkpoint_every = 200
  c.checkpoint_schedule = "log"  # + steps 0, 1, 2, 4, ..., 128, then 200, 400, 600: the dynamics

  c.spectra = ml_collections.ConfigDict(dict(
      # Training steps at which every run is analysed (0 = initialization; must include num_steps).
      track_steps=(0, 10, 25, 50, 100, 200, 300, 450, 600),
      analysis_windows=8,  # validation windows whose attention matrices are analysed
      eval_windows=64,  # validation windows (stride seq_len) scored at every snapshot
      mask_rate=0.15,  # bidirectional run: fraction of positions replaced by a [MASK] token
      high_lr_factor=10.0,  # the high learning-rate run: learning rates times this ...
      high_lr_warmup_steps=0,  # ... with this many warmup steps
  ))
  c.deep = ml_collections.ConfigDict(dict(
      num_layers=12,
      num_steps=150,  # short causal next-token training of each deep model (0 = init only)
      batch_size=16,
      random_inputs=16,  # uniformly random token sequences of length seq_len fed to the models
      # Weight scale of the deep models: 1/sqrt(d_model). At the GPT-2 scale 0.02 a stack without
      # skip connections or LayerNorm shrinks the stream ~1e-5-fold per layer (||W_V W_O||, the
      # MLP likewise) and underflows float32 before layer 12.
      init_std=0.125,
  ))
  return c
