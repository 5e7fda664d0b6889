"""Embedding geometry in llm_math.analysis.embeddings on constructed matrices with known answers."""
import jax.numpy as jnp
import numpy as np
import pytest

from llm_math.analysis import embeddings as e


def _orthonormal(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
  """n orthonormal vectors in R^d, as rows `[n, d]`."""
  q, _ = np.linalg.qr(rng.standard_normal((d, n)))
  return q.T


def _word_embeddings():
  """Words built from orthogonal concept directions, plus random distractors.

  king = royal + male, queen = royal + female, man = male, woman = female (+ small noise), and
  capitals = country + capital-ness: paris - france + italy = rome, etc.
  """
  rng = np.random.default_rng(0)
  d = 32
  royal, male, female, capital, france, italy, spain, japan = _orthonormal(rng, d, 8)
  words = {
      "king": royal + male, "queen": royal + female, "man": male, "woman": female,
      "france": france, "italy": italy, "spain": spain, "japan": japan,
      "paris": france + capital, "rome": italy + capital, "madrid": spain + capital,
      "tokyo": japan + capital,
  }
  names = list(words)
  emb = np.stack([words[n] for n in names]) + 0.02 * rng.standard_normal((len(names), d))
  distractors = rng.standard_normal((40, d)) / np.sqrt(d)
  names += [f"noise{i}" for i in range(40)]
  return jnp.asarray(np.concatenate([emb, distractors]), jnp.float32), names


@pytest.mark.parametrize("a,b,c,answer", [
    ("king", "man", "woman", "queen"),
    ("queen", "woman", "man", "king"),
    ("paris", "france", "italy", "rome"),
    ("rome", "italy", "japan", "tokyo"),
    ("madrid", "spain", "france", "paris"),
])
def test_analogies(a, b, c, answer):
  emb, names = _word_embeddings()
  idx, sims = e.analogy(emb, names.index(a), names.index(b), names.index(c), k=3)
  assert names[int(idx[0])] == answer
  assert np.all(np.diff(np.asarray(sims)) <= 0)


def test_analogy_excludes_its_inputs():
  emb, names = _word_embeddings()
  a, b, c = names.index("king"), names.index("man"), names.index("woman")
  idx, _ = e.analogy(emb, a, b, c, k=emb.shape[0] - 3)
  assert {a, b, c}.isdisjoint(set(np.asarray(idx).tolist()))
  assert len(set(np.asarray(idx).tolist())) == emb.shape[0] - 3
  # a - b + b = a: the unrestricted nearest row is a itself, which the analogy must skip.
  idx, _ = e.nearest_to_vector(emb, emb[a], k=1)
  assert int(idx[0]) == a
  idx, _ = e.analogy(emb, a, b, b, k=1)
  assert int(idx[0]) not in (a, b)
  idx, _ = e.nearest_to_vector(emb, emb[a], k=1, exclude=(a,))
  assert int(idx[0]) != a


def test_nearest_neighbors_find_the_cluster():
  rng = np.random.default_rng(1)
  n_clusters, size, d = 5, 6, 24
  centers = _orthonormal(rng, d, n_clusters)
  emb = np.repeat(centers, size, axis=0) + 0.05 * rng.standard_normal((n_clusters * size, d))
  emb *= rng.uniform(0.5, 3.0, size=(n_clusters * size, 1))  # cosine ignores the norms
  emb = jnp.asarray(emb, jnp.float32)
  for query in range(0, n_clusters * size, 7):
    idx, sims = e.nearest_neighbors(emb, query, k=size - 1)
    idx = np.asarray(idx)
    assert query not in idx
    np.testing.assert_array_equal(np.sort(idx // size), np.full(size - 1, query // size))
    assert np.all(np.asarray(sims) > 0.8)


@pytest.mark.parametrize("v,d,k", [(10, 3, 4), (50, 16, 9)])
def test_nearest_neighbors_match_brute_force(v, d, k):
  rng = np.random.default_rng(2)
  emb = rng.standard_normal((v, d))
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  for query in (0, v // 2, v - 1):
    sims = unit @ unit[query]
    sims[query] = -np.inf
    expected = np.argsort(-sims, kind="stable")[:k]
    idx, got_sims = e.nearest_neighbors(jnp.asarray(emb, jnp.float32), query, k)
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(got_sims, sims[expected], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(e.cosine_similarity_matrix(jnp.asarray(emb, jnp.float32)),
                             unit @ unit.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("v,d,rank", [(40, 10, 10), (40, 10, 3), (8, 20, 5)])
def test_singular_values_of_a_constructed_matrix(v, d, rank):
  rng = np.random.default_rng(3)
  s = np.sort(rng.uniform(0.5, 5.0, rank))[::-1]
  u = _orthonormal(rng, v, rank).T  # [V, rank]
  w = _orthonormal(rng, d, rank)    # [rank, D]
  emb = (u * s[None, :]) @ w
  got = np.asarray(e.singular_values(jnp.asarray(emb, jnp.float32)))
  expected = np.concatenate([s, np.zeros(min(v, d) - rank)])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # Centring removes the mean direction: compare with numpy on the centred matrix.
  centred = emb - emb.mean(axis=0, keepdims=True)
  np.testing.assert_allclose(e.singular_values(jnp.asarray(emb, jnp.float32), center=True),
                             np.linalg.svd(centred, compute_uv=False), rtol=1e-4, atol=1e-5)


def test_pca_recovers_a_planar_cloud():
  """Points in a 2-D plane of R^12: the projection is an isometry and explains all variance."""
  rng = np.random.default_rng(4)
  v, d = 100, 12
  axis1, axis2 = _orthonormal(rng, d, 2)
  # In-plane coordinates with zero mean and zero sample correlation, so the principal axes are
  # exactly axis1 (larger spread) and axis2.
  coef = rng.standard_normal((v, 2))
  coef -= coef.mean(0)
  coef, _ = np.linalg.qr(coef)
  a, b = 30.0 * coef[:, 0], 10.0 * coef[:, 1]
  offset = 5.0 * rng.standard_normal(d)
  emb = offset[None, :] + a[:, None] * axis1[None, :] + b[:, None] * axis2[None, :]
  coords, ratio = e.pca_2d(jnp.asarray(emb, jnp.float32))
  coords = np.asarray(coords, np.float64)
  np.testing.assert_allclose(np.sum(ratio), 1.0, rtol=1e-5)
  assert ratio[0] > ratio[1]
  dist_emb = np.linalg.norm(emb[:, None] - emb[None, :], axis=-1)
  dist_2d = np.linalg.norm(coords[:, None] - coords[None, :], axis=-1)
  np.testing.assert_allclose(dist_2d, dist_emb, atol=1e-3)
  # The coordinates are (a, b) up to the sign of each axis; the shares are 30^2 : 10^2.
  for got, want in ((coords[:, 0], a), (coords[:, 1], b)):
    sign = np.sign(got @ want)
    np.testing.assert_allclose(sign * got, want, atol=1e-3)
  np.testing.assert_allclose(ratio, [0.9, 0.1], rtol=1e-5)


def test_pca_matches_covariance_eigenvectors_and_sign_convention():
  rng = np.random.default_rng(5)
  emb = rng.standard_normal((60, 8)) * np.array([4.0, 2.5, 1.0, 0.5, 0.3, 0.2, 0.1, 0.1])
  coords, ratio = e.pca_2d(jnp.asarray(emb, jnp.float32))
  centred = emb - emb.mean(0)
  eigval, eigvec = np.linalg.eigh(centred.T @ centred)
  top = eigvec[:, ::-1][:, :2]
  top *= np.sign(top[np.argmax(np.abs(top), axis=0), [0, 1]])[None, :]  # same sign convention
  np.testing.assert_allclose(coords, centred @ top, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ratio, eigval[::-1][:2] / eigval.sum(), rtol=1e-4)
  # Deterministic orientation: negating the data negates the coordinates.
  coords_neg, _ = e.pca_2d(jnp.asarray(-emb, jnp.float32))
  np.testing.assert_allclose(coords_neg, -np.asarray(coords), rtol=1e-4, atol=1e-4)


def test_all_nearest_neighbors_and_class_purity_on_clusters():
  """Rows in orthogonal clusters: every row's k = size - 1 neighbours are its cluster, so each class
  (a cluster) is pure; a class of one row has no neighbours to share and is left out."""
  rng = np.random.default_rng(6)
  n_clusters, size, d = 4, 5, 16
  centers = _orthonormal(rng, d, n_clusters + 1)
  emb = np.concatenate([np.repeat(centers[:n_clusters], size, axis=0)
                        + 0.05 * rng.standard_normal((n_clusters * size, d)), centers[-1:]])
  v = len(emb)
  classes = [f"c{i // size}" for i in range(n_clusters * size)] + ["alone"]
  idx, sims = e.all_nearest_neighbors(jnp.asarray(emb, jnp.float32), size - 1)
  assert idx.shape == sims.shape == (v, size - 1)
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  cos = unit @ unit.T
  np.fill_diagonal(cos, -np.inf)
  np.testing.assert_allclose(sims, -np.sort(-cos, axis=1)[:, :size - 1], atol=1e-5)
  np.testing.assert_allclose(np.take_along_axis(cos, idx, axis=1), sims, atol=1e-5)
  names = ["c2", "alone", "c0", "c1", "c3", "absent"]
  purity = e.class_purity(idx, classes, names)
  assert list(purity) == ["c2", "c0", "c1", "c3"]  # the order of `names`, classes of >= 2 rows
  for r in purity.values():
    assert r == {"tokens": size, "same_class_share": 1.0, "chance": (size - 1) / (v - 1)}


def _case_embeddings(pairs: int, noise: int = 20, d: int = 64):
  """Lowercase rows b_i (orthonormal), uppercase rows b_i + c (one shared case direction c), and
  random distractor rows: every case offset is parallel, so every case analogy holds."""
  rng = np.random.default_rng(7)
  basis = _orthonormal(rng, d, pairs + 1)
  lower, case = basis[:pairs], basis[pairs]
  distractors = rng.standard_normal((noise, d)) / np.sqrt(d)
  emb = np.concatenate([lower, lower + case[None], distractors])
  return jnp.asarray(emb, jnp.float32), [(i, pairs + i) for i in range(pairs)]


def test_case_analysis_with_parallel_case_offsets():
  emb, pairs = _case_embeddings(4)
  v = emb.shape[0]
  r = e.case_analysis(emb, pairs, k=3)
  assert r["pairs"] == 4 and r["upper_is_nearest_to_lower"] == r["upper_in_top_k_of_lower"] == 1.0
  assert r["chance_nearest"] == pytest.approx(1 / (v - 1))
  for direction in ("lower_to_upper", "upper_to_lower"):
    d = r[direction]
    assert d["analogies"] == 4 * 3
    assert d["top1"] == d["top_k"] == 1.0
    assert d["only_c_baseline"] == 1.0  # c's own partner is its nearest row here
    assert d["chance_top1"] == pytest.approx(1 / (v - 3))
  # Offsets unit(b + c) - b = b (1/sqrt2 - 1) + c / sqrt2: pairwise cosine (1/2) / (2 - sqrt2).
  assert r["offset_mean_cosine"] == pytest.approx(0.5 / (2 - np.sqrt(2)), rel=1e-5)
  # With one pair there is no analogy to form.
  one = e.case_analysis(emb, pairs[:1], k=3)
  assert "lower_to_upper" not in one and "offset_mean_cosine" not in one and one["pairs"] == 1


def test_spectrum_of_a_matrix_with_known_centred_singular_values():
  rng = np.random.default_rng(8)
  v, d, s = 30, 12, np.array([4.0, 3.0, 2.0, 2.0, 1.0, 0.5])
  centred = rng.standard_normal((v, len(s)))
  centred -= centred.mean(0)
  u, _ = np.linalg.qr(centred)  # orthonormal columns, each summing to 0
  emb = 3.0 + (u * s) @ _orthonormal(rng, d, len(s))  # a common offset the centring removes
  spec = e.spectrum(jnp.asarray(emb, jnp.float32))
  np.testing.assert_allclose(spec["singular_values"][:len(s)], s, rtol=1e-4)
  np.testing.assert_allclose(spec["singular_values"][len(s):], 0, atol=1e-4)
  share = s ** 2 / np.sum(s ** 2)
  np.testing.assert_allclose(spec["variance_effective_rank"], np.exp(-np.sum(share * np.log(share))),
                             rtol=1e-5)
  np.testing.assert_allclose(spec["top2_variance_share"], share[0] + share[1], rtol=1e-5)
  np.testing.assert_allclose(spec["pca_variance_ratio"], share[:2], rtol=1e-5)
  assert np.shape(spec["pca_coords"]) == (v, 2)


def test_bad_arguments():
  emb = jnp.ones((5, 3))
  with pytest.raises(ValueError, match="emb"):
    e.singular_values(jnp.ones(4))
  with pytest.raises(ValueError, match="index"):
    e.nearest_neighbors(emb, 5, 1)
  with pytest.raises(ValueError, match="k must"):
    e.nearest_neighbors(emb, 0, 5)
  with pytest.raises(ValueError, match="query"):
    e.nearest_to_vector(emb, jnp.ones(4), 1)
  with pytest.raises(ValueError, match="c must"):
    e.analogy(emb, 0, 1, 7)
  with pytest.raises(ValueError, match="emb needs"):
    e.pca_2d(jnp.ones((1, 3)))
