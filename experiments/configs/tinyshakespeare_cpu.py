"""nanoGPT's CPU recipe on tiny shakespeare, character level (its README: val loss 1.88 nats).

4 layers, 4 heads, d_model 128 (tied embeddings, no biases, GELU MLP of width 4d, as nanoGPT's
defaults), context 64, batch 12, 2000 steps, lr 1e-3 cosine to 1e-4 after 100 warmup steps, AdamW
betas (0.9, 0.99), weight decay 0.1, no dropout.

  python -m experiments.perplexity --config=experiments/configs/tinyshakespeare_cpu.py \
      --data=text:../shared/data/tinyshakespeare.txt --workdir=/tmp/shakespeare_cpu
"""
from experiments.configs import perplexity


def get_config():
  c = perplexity.get_config()
  c.data = "text:../shared/data/tinyshakespeare.txt"
  c.tokenizer = "char"
  c.model.update(num_layers=4, num_heads=4, d_model=128, d_ff=512, dropout_rate=0.0,
                 pos_encoding="learned", activation="gelu", tie_embeddings=True, use_bias=False)
  c.seq_len = 64
  c.batch_size = 12
  c.num_steps = 2000
  c.learning_rate = 1e-3
  c.min_learning_rate = 1e-4
  c.warmup_steps = 100
  c.b1, c.b2 = 0.9, 0.99
  c.weight_decay = 0.1
  c.eval_every = 250
  c.eval_stride = 0  # nanoGPT's convention: independent windows, contexts 1..64.
  c.log_every = 100
  c.checkpoint_every = 500
  return c
