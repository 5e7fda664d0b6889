"""Information theory of language models: units and identities.

Conventions: natural logarithms (nats) unless a name says bits; `nll` is a mean negative
log-likelihood per token in nats.
"""
import math

LN2 = math.log(2.0)


def perplexity(nll_nats: float) -> float:
  """PPL = exp(mean NLL in nats)."""
  return math.exp(nll_nats)


def nats_to_bits(nats: float) -> float:
  """1 nat = 1/ln 2 bits."""
  return nats / LN2


def bits_per_char(nll_nats_per_token: float, tokens: int, chars: int) -> float:
  """Bits per character from a per-token NLL: total bits over the characters those tokens cover."""
  return nats_to_bits(nll_nats_per_token) * tokens / chars
