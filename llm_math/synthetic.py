"""A synthetic token source whose true conditional distribution, and entropy rate, are known exactly.

The lagged-copy source: draw x_0 .. x_{L-1} i.i.d. from a Zipf distribution pi over V tokens, then

    x_t = x_{t-L}        with probability alpha      (copy the token L positions back)
    x_t ~ pi             with probability 1 - alpha  (a fresh draw)

so the Bayes-optimal predictor is

    p(x_t = v | past) = alpha * [v == x_{t-L}] + (1 - alpha) * pi(v).

Every x_t is marginally pi-distributed and depends on the past only through x_{t-L}, so a model whose
context is shorter than L (any n-gram of order <= L) can do no better than the unigram entropy H(pi),
while attention can look back L positions and reach the entropy rate

    H = sum_u pi(u) * ( -a_u log a_u  -  sum_{v != u} b_v log b_v ),
        a_u = alpha + (1 - alpha) pi(u),   b_v = (1 - alpha) pi(v).

Tokens whose context does not reach back L positions are, given that context, distributed as pi (the
residue classes t mod L are independent chains), so `conditional_nll` gives the exact floor for any
context each token actually had.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LaggedCopySource:
  vocab_size: int = 32
  lag: int = 16
  copy_prob: float = 0.8
  zipf_exponent: float = 1.0

  def __post_init__(self):
    if self.vocab_size < 2 or self.lag < 1:
      raise ValueError(f"need vocab_size >= 2 and lag >= 1, got {self.vocab_size}, {self.lag}")
    if not 0.0 <= self.copy_prob < 1.0:
      raise ValueError(f"copy_prob must be in [0, 1), got {self.copy_prob}")

  @property
  def unigram(self) -> np.ndarray:
    """pi(v) proportional to (v + 1)^-s, v = 0 .. V-1."""
    w = np.arange(1, self.vocab_size + 1, dtype=np.float64) ** -self.zipf_exponent
    return w / w.sum()

  def sample(self, num_tokens: int, seed: int) -> np.ndarray:
    """A stream of `num_tokens` int32 tokens, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    rows = -(-num_tokens // self.lag)
    fresh_RxL = rng.choice(self.vocab_size, size=(rows, self.lag), p=self.unigram)
    copy_RxL = rng.random((rows, self.lag)) < self.copy_prob
    copy_RxL[0] = False
    # Within each residue class (a column) a copied token equals the latest fresh draw above it.
    last_fresh_row = np.where(copy_RxL, 0, np.arange(rows)[:, None])
    last_fresh_row = np.maximum.accumulate(last_fresh_row, axis=0)
    tokens_RxL = np.take_along_axis(fresh_RxL, last_fresh_row, axis=0)
    return tokens_RxL.reshape(-1)[:num_tokens].astype(np.int32)

  def conditional_nll(self, stream: np.ndarray, positions: np.ndarray,
                      context_lengths: np.ndarray) -> np.ndarray:
    """Exact -log p(x_i | the `context_lengths` tokens before i), in nats, for i in `positions`."""
    pi = self.unigram
    positions = np.asarray(positions)
    x = stream[positions]
    sees_lag = (positions >= self.lag) & (np.asarray(context_lengths) >= self.lag)
    lagged = stream[np.where(sees_lag, positions - self.lag, 0)]
    p_copy = self.copy_prob * (x == lagged) + (1.0 - self.copy_prob) * pi[x]
    return -np.log(np.where(sees_lag, p_copy, pi[x]))

  def entropy_rate(self) -> float:
    """The closed form in the module docstring, in nats per token."""
    pi, alpha = self.unigram, self.copy_prob
    b = (1.0 - alpha) * pi
    a = alpha + b
    all_b = -np.sum(b * np.log(b))
    per_u = -a * np.log(a) + all_b + b * np.log(b)
    return float(np.sum(pi * per_u))

  def unigram_entropy(self) -> float:
    """H(pi): the best any model with context shorter than the lag can do."""
    pi = self.unigram
    return float(-np.sum(pi * np.log(pi)))
