"""A GPT of about 1.3B parameters for compile checks and pods.

24 layers, d_model 2048, 16 heads of 128, MLP 8192, context 2048, vocabulary 50304, tied embeddings,
no biases, rotary positions, bf16 compute with float32 parameters and AdamW moments: 1.31B
parameters, about 21 GB of state (parameters and two moments in float32), so it needs fsdp on 16 GiB
chips. Its optimizer and data follow gpt2_small.py at a 1M-token batch.

  python -m experiments.compile --config=experiments/configs/gpt_1b.py --topology=v5p:2x2x2 \
      --config.batch_size=64 --workdir=/tmp/compile_1b
"""
from experiments.configs import gpt2_small


def get_config():
  c = gpt2_small.get_config()
  c.model.update(num_layers=24, num_heads=16, d_model=2048, d_ff=8192, pos_encoding="rotary")
  c.seq_len = 2048
  c.batch_size = 512
  c.learning_rate = 3e-4
  c.min_learning_rate = 3e-5
  c.loss_chunk = 256
  return c
