"""Decoding in llm_math.analysis.sampling: limits, exact truncation sets, and empirical frequencies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from llm_math.analysis import sampling as s


# One compilation serves every numeric setting (traced temperature / top_k / top_p); the static
# variant compiles the Python-number code path once per setting.
_sample_traced = jax.jit(s.sample)
_sample_static = jax.jit(s.sample, static_argnames=("temperature", "top_k", "top_p"))
_distribution_traced = jax.jit(s.sampling_distribution)


def _logits(seed: int, shape: tuple[int, ...], scale: float = 2.0) -> jax.Array:
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _reference_distribution(logits, temperature, top_k, top_p):
  """numpy float64 brute force of temperature -> top-k -> top-p for one row `[V]`."""
  z = np.asarray(logits, np.float64) / temperature
  order = sorted(range(len(z)), key=lambda i: (-z[i], i))  # descending, ties by index
  kept = order[:top_k] if top_k is not None else order
  if top_p is not None:
    w = np.exp(z[kept] - z[kept].max())
    w /= w.sum()
    n = 1
    while n < len(kept) and w[:n].sum() < top_p:
      n += 1
    kept = kept[:n]
  probs = np.zeros_like(z)
  probs[kept] = np.exp(z[kept] - z[kept].max())
  return probs / probs.sum()


def test_greedy_is_argmax_with_first_index_on_ties():
  logits = jnp.array([[0.1, 2.0, 2.0, -1.0], [3.0, 3.0, 3.0, 3.0]])
  np.testing.assert_array_equal(s.greedy(logits), [1, 0])
  np.testing.assert_array_equal(s.sample(jax.random.key(0), logits, temperature=0.0), [1, 0])
  np.testing.assert_array_equal(s.sampling_distribution(logits, 0.0),
                                [[0, 1, 0, 0], [1, 0, 0, 0]])


def test_temperature_to_zero_is_greedy():
  v, n = 12, 4096
  rng = np.random.default_rng(1)
  # Rows are permutations of 0.25 * arange(V): every gap is >= 0.25.
  logits = jnp.asarray(np.stack([rng.permutation(v) for _ in range(n)]) * 0.25, jnp.float32)
  expected = np.asarray(s.greedy(logits))
  for t in (1e-3, 1e-4):
    # Gumbel-max: argmax(z / T + G) = argmax(z + T G); T * (G_i - G_j) < 0.25 for these draws.
    np.testing.assert_array_equal(_sample_traced(jax.random.key(2), logits, t), expected)
  # At T = 1 the draws are not greedy, so the check above is not vacuous.
  assert np.mean(np.asarray(_sample_traced(jax.random.key(2), logits, 1.0)) == expected) < 0.5
  probs = _distribution_traced(logits, 1e-3)
  np.testing.assert_allclose(probs, jax.nn.one_hot(expected, v), atol=1e-6)
  # Traced temperature 0 under jit takes the greedy branch.
  np.testing.assert_array_equal(_sample_traced(jax.random.key(3), logits, 0.0), expected)


@pytest.mark.parametrize("v", [3, 50])
def test_no_truncation_equals_plain_sampling(v):
  logits = _logits(4, (2000, v))
  key = jax.random.key(5)

  @jax.jit
  def all_variants(key, logits):
    return (jax.random.categorical(key, logits, axis=-1),
            jax.random.categorical(key, logits / 0.7, axis=-1),
            s.sample(key, logits),
            s.sample(key, logits, top_k=v),
            s.sample(key, logits, top_k=v + 3),
            s.sample(key, logits, top_p=1.0),
            s.sample(key, logits, 1.0, top_k=v, top_p=1.0),
            s.sample(key, logits, 0.7))  # temperature T = plain sampling from logits / T

  plain, plain_t, *mine, mine_t = all_variants(key, logits)
  for tokens in mine:
    np.testing.assert_array_equal(tokens, plain)
  np.testing.assert_array_equal(mine_t, plain_t)
  np.testing.assert_array_equal(_sample_traced(key, logits, 1.0, v, 1.0), plain)


@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_top_k_keeps_exactly_k_largest(k):
  # Integer logits in a small range: many ties, including at the k-th place.
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.integers(-3, 4, size=(200, 20)), jnp.float32)
  mask = np.asarray(s.top_k_mask(logits, k))
  np.testing.assert_array_equal(mask.sum(-1), k)
  z = np.asarray(logits)
  kept_min = np.where(mask, z, np.inf).min(-1)
  dropped_max = np.where(mask, -np.inf, z).max(-1)
  assert np.all(kept_min >= dropped_max)
  # Among tokens tied with the k-th value the lowest indices are kept.
  for row, keep in zip(z, mask):
    boundary = row[keep].min()
    tied = np.flatnonzero(row == boundary)
    kept_tied = tied[keep[tied]]
    np.testing.assert_array_equal(kept_tied, tied[:len(kept_tied)])
  filtered = np.asarray(s.top_k_filter(logits, k))
  np.testing.assert_array_equal(np.isfinite(filtered), mask)


@pytest.mark.parametrize("p", [1e-6, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_minimal_nucleus(p):
  logits = _logits(7, (300, 16))
  mask = np.asarray(s.top_p_mask(logits, p))
  z = np.asarray(logits, np.float64)
  probs = np.exp(z - z.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  kept_mass = np.where(mask, probs, 0.0).sum(-1)
  smallest_kept = np.where(mask, probs, np.inf).min(-1)
  largest_dropped = np.where(mask, -np.inf, probs).max(-1)
  tol = 1e-6  # float32 cumulative sums
  assert np.all(kept_mass >= p - tol)                 # enough mass
  assert np.all(kept_mass - smallest_kept < p + tol)  # and minimal: one fewer would not be
  assert np.all(smallest_kept >= largest_dropped)     # it is a top set
  assert np.all(mask[np.arange(300), np.asarray(s.greedy(logits))])  # top token always kept
  if p == 1e-6:
    np.testing.assert_array_equal(mask.sum(-1), 1)


def test_top_p_ties_break_by_index():
  logits = jnp.log(jnp.array([0.25, 0.25, 0.25, 0.25]))
  np.testing.assert_array_equal(s.top_p_mask(logits, 0.5), [True, True, False, False])
  np.testing.assert_array_equal(s.top_p_mask(logits, 0.6), [True, True, True, False])


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (0.8, 6, 0.7), (2.0, 3, 0.99)])
def test_distribution_matches_numpy_reference(temperature, top_k, top_p):
  logits = _logits(8, (6, 10))
  probs = np.asarray(s.sampling_distribution(logits, temperature, top_k, top_p))
  for row, prob_row in zip(np.asarray(logits), probs):
    np.testing.assert_allclose(prob_row, _reference_distribution(row, temperature, top_k, top_p),
                               rtol=2e-5, atol=1e-7)


# top_k = V and top_p = 1 switch a filter off; traced values let one compilation serve all cases.
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 6, 0.85), (1.5, 10, 0.6),
                                                     (1.0, 4, 1.0)])
def test_empirical_frequencies_match_truncated_distribution(temperature, top_k, top_p):
  """100k draws against the truncated, renormalized distribution.

  Bounds: Pearson's chi-square over the support must stay below its 1 - 1e-6 quantile, each
  frequency within 5 binomial standard deviations of its probability (a correct sampler fails
  either with probability ~1e-6 per category for a random key), and no draw falls outside.
  """
  n, v = 100_000, 10
  logits = _logits(9, (v,))
  probs = np.asarray(_distribution_traced(logits, temperature, top_k, top_p), np.float64)
  draws = _sample_traced(jax.random.key(10), jnp.broadcast_to(logits, (n, v)), temperature, top_k,
                         top_p)
  counts = np.bincount(np.asarray(draws), minlength=v)
  support = probs > 0
  assert support.sum() < v  # something was truncated (else the test would not test truncation)
  assert counts[~support].sum() == 0
  expected = n * probs[support]
  chi2 = np.sum((counts[support] - expected) ** 2 / expected)
  assert chi2 < stats.chi2.ppf(1 - 1e-6, df=support.sum() - 1)
  freq = counts / n
  assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / n) + 1e-12)


def test_traced_parameters_match_static():
  logits = _logits(11, (64, 30))
  key = jax.random.key(12)
  static_dist = jax.jit(s.sampling_distribution, static_argnames=("temperature", "top_k", "top_p"))
  for temperature, top_k, top_p in [(0.9, 5, 0.8), (0.5, 1, 0.3)]:
    np.testing.assert_array_equal(_sample_traced(key, logits, temperature, top_k, top_p),
                                  _sample_static(key, logits, temperature, top_k, top_p))
    np.testing.assert_allclose(_distribution_traced(logits, temperature, top_k, top_p),
                               static_dist(logits, temperature, top_k, top_p),
                               rtol=1e-6, atol=1e-7)


def test_bad_arguments():
  logits = jnp.zeros((2, 5))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="temperature"):
    s.sample(key, logits, temperature=-1.0)
  with pytest.raises(ValueError, match="top_k"):
    s.sample(key, logits, top_k=0)
  with pytest.raises(ValueError, match="top_k"):
    s.top_k_mask(logits, 2.5)
  with pytest.raises(ValueError, match="top_p"):
    s.sample(key, logits, top_p=0.0)
  with pytest.raises(ValueError, match="top_p"):
    s.sampling_distribution(logits, top_p=1.5)
  with pytest.raises(ValueError, match="temperature"):
    s.apply_temperature(logits, 0.0)
