"""Default config of experiments/perplexity.py: the embedded synthetic source, a few minutes on a CPU.

The lagged-copy source (V=32, lag 16, copy probability 0.8) has entropy rate 0.991 nats/token while
every model with context shorter than 16 tokens is stuck at the unigram entropy 2.876: a 2-layer
Transformer with context 64 comes within a few thousandths of a nat of the floor.

Positions are rotary: the dependence sits at a fixed relative offset, which rotary attention scores
see directly. With learned absolute positions the same model has to learn "attend 16 back" at every
position separately and lands +0.004 to +0.038 nats above the floor depending on the seed (seeds 0-3),
against +0.002 to +0.003 with rotary (seeds 0-2).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Data: 'synthetic' | 'text:PATH[,PATH...]' | 'tfds:NAME[/CONFIG]' (the --data flag overrides).
  c.data = "synthetic"
  c.tokenizer = "char"  # char | byte | sentencepiece (ignored for synthetic data)
  c.vocab_size = 0  # SentencePiece vocabulary size.
  c.tfds_data_dir = ""
  c.max_chars = 0  # Read at most this many characters of a text corpus (0 = all).
  # Split of text: sources: '' or 'tail' (last 10% of characters is validation) or 'blocks:K:N'
  # (every K-th block of N characters, cut at a line break, is validation). tfds has its own splits.
  c.data_split = ""
  c.synthetic = ml_collections.ConfigDict(dict(
      vocab_size=32, lag=16, copy_prob=0.8, zipf_exponent=1.0,
      train_tokens=1 << 20, val_tokens=1 << 16))

  # remat: 'none' | 'full' | 'dots_saveable' (keep matmul outputs, recompute the rest) |
  # 'dots_with_no_batch_dims_saveable' (keep only the matmuls with weights) per block;
  # scan_layers: the blocks as one nn.scan over stacked parameters (compiles one block whatever the
  # depth; the large recipes turn it on; analyses read any run unstacked, `train.load_trained`).
  # Training-stability knobs (Wortsman et al. 2023), all off here and in every recipe built on this:
  # qk_norm (LayerNorm of each head's queries and keys), attn_logit_softcap and logit_softcap
  # (c tanh(x / c) on attention and output logits; 0 = off; the attention cap needs 'explicit'
  # attention), z_loss (the objective adds z_loss x mean log^2 Z; the reported loss stays the NLL,
  # the term is logged as z_loss; PaLM used 1e-4).
  c.model = ml_collections.ConfigDict(dict(
      num_layers=2, num_heads=4, d_model=64, d_ff=256, dropout_rate=0.0,
      pos_encoding="rotary", activation="gelu", tie_embeddings=False, causal=True,
      use_bias=True, init_std=0.02, dtype="float32", param_dtype="float32",
      attention_impl="explicit", remat="none", scan_layers=False,
      qk_norm=False, attn_logit_softcap=0.0, logit_softcap=0.0, z_loss=0.0))
  c.seq_len = 64

  # Optimization: AdamW, linear warmup then cosine decay to min_learning_rate ('cosine'), or held
  # at learning_rate and decayed linearly over the last decay_fraction of the steps ('wsd').
  c.batch_size = 32  # Global batch (sequences per step, summed over all devices and processes).
  c.grad_accum_steps = 1  # Split each batch into this many micro-batches (same update, less memory).
  # Output projection + loss computed this many positions at a time (0 = all at once); divides
  # seq_len. Same loss and gradients without the [B, T, V] logits in memory (large vocabularies).
  c.loss_chunk = 0
  c.num_steps = 1500
  c.learning_rate = 3e-3
  c.min_learning_rate = 3e-4
  c.warmup_steps = 100
  c.schedule = "cosine"
  c.decay_fraction = 0.2
  c.b1 = 0.9
  c.b2 = 0.99
  c.eps = 1e-8
  c.weight_decay = 0.1
  c.grad_clip = 1.0
  # Divergence: a training or validation loss above max_loss_factor x ln|V| (the uniform model's
  # loss, where training starts) stops the run like a NaN, without saving. 0 = only NaN/inf stop it.
  c.max_loss_factor = 3.0

  # Evaluation: contiguous validation windows; stride 0 = seq_len (nanoGPT's independent windows).
  # Stride 32 of 64 gives every scored token at least 33 tokens of context, more than the lag, so
  # the floor at that context is (up to the first window) the entropy rate.
  # Each evaluation of the default scores all 65,535 validation tokens (~1.2 s on 2 CPU cores); every
  # 250 steps gives the curve 7 points for 9% of the run's time (every 100: 16 points, 20%).
  c.eval_every = 250
  c.eval_stride = 32
  c.eval_batch_size = 64
  c.eval_max_tokens = 0  # Score at most this many validation tokens (0 = all).
  # Score every K-th of the independent windows (eval_stride 0): a sample spread over the split.
  c.eval_sample_every = 1

  # Baselines: n-gram LMs (orders, 'kneser_ney' and/or 'add_k' with constant add_k), scored on the
  # tokens the Transformer's evaluation windows score, with their contexts (window 0) or with
  # context reset every `window` tokens, and always also with full left context. They are counted
  # on the first max_train_tokens training tokens (0 = all). Counting streams the split, so memory
  # grows with the distinct n-grams, not the corpus; the cap bounds those too. 2^25 (33.5M) covers
  # every shipped corpus (english_pd: 17.3M char tokens); the results and the table caption say how
  # many tokens were used.
  c.ngram = ml_collections.ConfigDict(dict(
      orders="1,2,3,5", methods="kneser_ney,add_k", add_k=0.1, window=0,
      max_train_tokens=1 << 25))
  # Sweeps: train_transformer=False gives baselines only; model_sizes 'DxL,...' (d_model x layers,
  # d_ff = 4 d); tokenizers 'char,sentencepiece:1000,...' ('' = the tokenizer field).
  c.train_transformer = True
  c.model_sizes = ""
  # Percentile-bootstrap resamples behind the 95% interval of every fitted law (0: no intervals).
  c.fit_bootstrap = 1000
  c.tokenizers = ""

  c.log_every = 100
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  # 'log' also keeps the parameters at steps 1, 2, 4, 8, ... and then every checkpoint_every, for
  # analyses over training (Pythia's schedule), apart from the rolling resume checkpoints.
  c.checkpoint_schedule = "rolling"
  # Per-layer statistics at log steps (attention entropy and max logit per block, output log Z, rms
  # of each parameter group's parameters, gradients and updates): llm_math.layer_stats.
  c.layer_stats = False
  # With several processes, how often (in steps) they share their SIGTERM/SIGINT flags, so that all
  # of them stop after the same step and save it (one small collective each time).
  c.stop_check_every = 10

  # Devices: mesh axes (data, fsdp, tensor), -1 = the rest; logical axis -> mesh axis rules (those
  # of llm_math.sharding.DEFAULT_RULES).
  c.mesh = "data:-1"
  c.logical_axis_rules = [["batch", ("data", "fsdp")], ["embed", "fsdp"], ["heads", "tensor"],
                          ["mlp", "tensor"], ["vocab", "tensor"], ["kv", None], ["length", None]]
  return c
