"""A word-piece Transformer LM on a real corpus in about 30 minutes of 2 CPU cores.

SentencePiece (BPE) with 8,000 pieces, trained on a sample of the training split; a 4-layer
pre-LayerNorm Transformer (d_model 192, 4 heads, GELU MLP of width 4d, rotary positions, tied
embeddings, no biases; 3.3M parameters, 1.8M of them outside the embedding), context 128, batch
16 x 128 tokens, 1800 steps (3.7M tokens, about 0.7 epochs of the training split), AdamW (betas
0.9/0.99, weight decay 0.1) with lr 2e-3, 100 warmup steps and cosine decay to 1e-4, no dropout (less
than one epoch). Evaluated every 200 steps on every 4th independent window of 128 tokens of the
validation split (a quarter of it, spread over all of it; contexts 1..128); Kneser-Ney n-grams (orders
1-5) on exactly the same tokens, both with the Transformer's windows and with full left context.

Size: at an equal budget of about 11 minutes (2 cores, same schedule shape) d_model 128 and 192
reached 4.940 and 4.963 nats on the first 50K validation tokens (tail split): a tie, and a longer
budget favours the larger model, so the 30-minute recipe takes 192.

The recipe names no file: give any text corpus with --data=text:PATH[,PATH...].

  python -m experiments.perplexity --config=experiments/configs/english_pd.py \
      --data=text:../shared/data/english_pd.txt --workdir=/tmp/english_pd_tail
  # every 10th block of 100,000 characters as validation (all the books, not only the last ones):
  python -m experiments.perplexity --config=experiments/configs/english_pd.py \
      --data=text:../shared/data/english_pd.txt --config.data_split=blocks:10:100000 \
      --workdir=/tmp/english_pd_blocks
"""
from experiments.configs import perplexity


def get_config():
  c = perplexity.get_config()
  c.data = "text:../shared/data/english_pd.txt"
  c.tokenizer = "sentencepiece"
  c.vocab_size = 8000
  c.data_split = "tail"
  c.model.update(num_layers=4, num_heads=4, d_model=192, d_ff=768, dropout_rate=0.0,
                 pos_encoding="rotary", activation="gelu", tie_embeddings=True, use_bias=False)
  c.seq_len = 128
  c.batch_size = 16
  c.num_steps = 1800
  c.learning_rate = 2e-3
  c.min_learning_rate = 1e-4
  c.warmup_steps = 100
  c.b1, c.b2 = 0.9, 0.99
  c.weight_decay = 0.1
  c.eval_every = 200
  c.eval_stride = 0  # Independent windows of seq_len: contexts 1..128.
  c.eval_sample_every = 4
  c.eval_batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 200
  c.ngram.update(orders="1,2,3,4,5", methods="kneser_ney")
  return c
