"""GPT-2 small (124M parameters) with nanoGPT's OpenWebText recipe, for pods and large GPUs.

nanoGPT's train_gpt2 recipe: 12 layers, 12 heads, d_model 768, context 1024, vocabulary 50304 (GPT-2's
50257 padded to a multiple of 64), tied embeddings, no biases, learned positions, GELU MLP of width
4d, no dropout; AdamW at 6e-4 (betas 0.9, 0.95, weight decay 0.1, clipping at 1.0), 2000 warmup
steps and cosine decay to 6e-5 over 600,000 steps of 480 x 1024 tokens (0.5M tokens per step:
nanoGPT's 12 x 1024 x 40 accumulated). bf16 compute with float32 parameters.

Adapted to our data flags: SentencePiece BPE of that vocabulary trained on the corpus
(--data=tfds:openwebtext with a prepared --tfds_data_dir, or text:/tokens: files); GPT-2's own BPE is
not in the stack. Check it for a topology before paying for one:

  python -m experiments.compile --config=experiments/configs/gpt2_small.py --topology=v5e:2x2 \
      --config.mesh=fsdp:-1 --config.batch_size=32 --workdir=/tmp/compile_gpt2
"""
from experiments.configs import perplexity


def get_config():
  c = perplexity.get_config()
  c.data = "tfds:openwebtext"
  c.tokenizer = "sentencepiece"
  c.vocab_size = 50304
  c.model.update(num_layers=12, num_heads=12, d_model=768, d_ff=3072, dropout_rate=0.0,
                 pos_encoding="learned", tie_embeddings=True, use_bias=False, dtype="bfloat16",
                 param_dtype="float32", init_std=0.02, scan_layers=True,
                 remat="dots_with_no_batch_dims_saveable")
  c.seq_len = 1024
  c.batch_size = 480
  c.num_steps = 600_000
  c.learning_rate = 6e-4
  c.min_learning_rate = 6e-5
  c.warmup_steps = 2000
  c.b1, c.b2 = 0.9, 0.95
  c.weight_decay = 0.1
  c.grad_clip = 1.0
  c.eval_every = 2000
  c.eval_max_tokens = 1 << 20
  c.eval_stride = 0
  c.eval_batch_size = 64
  c.loss_chunk = 128  # The [B, 1024, 50304] logits are never held whole.
  c.log_every = 100
  c.checkpoint_every = 2000
  c.mesh = "fsdp:-1"
  c.ngram.update(orders="1,2,3", methods="kneser_ney")
  return c
