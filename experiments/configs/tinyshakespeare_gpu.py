"""nanoGPT's 'baby GPT' recipe on tiny shakespeare, character level (its README: val loss 1.4697).

6 layers, 6 heads, d_model 384, context 256, batch 64, dropout 0.2, lr 1e-3 cosine to 1e-4 over 5000
steps after 100 warmup steps, AdamW betas (0.9, 0.99), weight decay 0.1; bf16 compute, fused attention.

Fused attention here is cuDNN flash attention on an Ampere or newer GPU (bf16, head dim 64; see
`llm_math.model.fused_attention_implementation`), a kernel without attention-probability dropout.
So unlike nanoGPT this recipe drops no attention probabilities: dropout 0.2 applies to the embeddings
and to the attention and MLP outputs added to the residual stream, as is usual in JAX training code
that uses a fused attention kernel.

  launch/gpu.sh perplexity --config=experiments/configs/tinyshakespeare_gpu.py \
      --data=text:../shared/data/tinyshakespeare.txt --workdir=/tmp/shakespeare_gpu
"""
from experiments.configs import tinyshakespeare_cpu


def get_config():
  c = tinyshakespeare_cpu.get_config()
  c.model.update(num_layers=6, num_heads=6, d_model=384, d_ff=1536, dropout_rate=0.2,
                 dtype="bfloat16", attention_impl="fused")
  c.seq_len = 256
  c.batch_size = 64
  c.num_steps = 5000
  c.eval_every = 500
  c.checkpoint_every = 1000
  c.ngram.update(orders="1,3,5,7", methods="kneser_ney")
  return c
