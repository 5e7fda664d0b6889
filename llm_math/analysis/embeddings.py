"""Geometry of an embedding matrix `[V, D]`: neighbours, analogies, spectrum, 2-D PCA.

Similarity is cosine similarity, cos(u, w) = u . w / (|u| |w|); a zero row has similarity 0 to
everything. Indices, `k` and `exclude` are Python ints (static under jit); the arrays may be
traced.

The last section summarizes a whole matrix on the host (numpy in, JSON-able dicts out): every row's
neighbours, how often they share a row's class, paired rows (a letter's two cases) and their
analogies, and the spectrum.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from llm_math.analysis import spectra

_NORM_FLOOR = 1e-12


def _check_embeddings(emb_VxD: jax.Array) -> None:
  if jnp.ndim(emb_VxD) != 2:
    raise ValueError(f"emb must be a 2-D matrix [V, D], got shape {jnp.shape(emb_VxD)}")


def _check_k(k: int, available: int) -> None:
  if not 1 <= k <= available:
    raise ValueError(f"k must be in [1, {available}] (candidates left after exclusions), got {k}")


def normalize_rows(emb_VxD: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  _check_embeddings(emb_VxD)
  norms_Vx1 = jnp.linalg.norm(emb_VxD, axis=-1, keepdims=True)
  return emb_VxD / jnp.maximum(norms_Vx1, _NORM_FLOOR)


def cosine_similarity_matrix(emb_VxD: jax.Array) -> jax.Array:
  """All pairwise cosine similarities `[V, V]` (Gram matrix of the normalized rows)."""
  unit_VxD = normalize_rows(emb_VxD)
  return unit_VxD @ unit_VxD.T


def _top_k_excluding(sims_V: jax.Array, exclude: tuple[int, ...] | jax.Array,
                     k: int) -> tuple[jax.Array, jax.Array]:
  exclude = jnp.asarray(exclude, jnp.int32).reshape(-1)
  sims_V = sims_V.at[exclude].set(-jnp.inf)
  sims_k, idx_k = jax.lax.top_k(sims_V, k)
  return idx_k, sims_k


def nearest_to_vector(emb_VxD: jax.Array, query_D: jax.Array, k: int,
                      exclude: tuple[int, ...] = ()) -> tuple[jax.Array, jax.Array]:
  """The k rows most cosine-similar to a vector, skipping the indices in `exclude`.

  Returns:
    (indices `[k]` int32, similarities `[k]`), most similar first (ties by lower index).
  """
  _check_embeddings(emb_VxD)
  if jnp.shape(query_D) != jnp.shape(emb_VxD)[1:]:
    raise ValueError(f"query must have shape ({emb_VxD.shape[1]},), got {jnp.shape(query_D)}")
  _check_k(k, emb_VxD.shape[0] - len(set(int(i) for i in exclude)))
  unit_query_D = query_D / jnp.maximum(jnp.linalg.norm(query_D), _NORM_FLOOR)
  sims_V = normalize_rows(emb_VxD) @ unit_query_D
  if not exclude:
    sims_k, idx_k = jax.lax.top_k(sims_V, k)
    return idx_k, sims_k
  return _top_k_excluding(sims_V, tuple(exclude), k)


def nearest_neighbors(emb_VxD: jax.Array, index: int, k: int) -> tuple[jax.Array, jax.Array]:
  """The k nearest rows to row `index` by cosine similarity, excluding `index` itself.

  Returns:
    (indices `[k]` int32, similarities `[k]`), most similar first.
  """
  _check_embeddings(emb_VxD)
  if not 0 <= index < emb_VxD.shape[0]:
    raise ValueError(f"index must be in [0, {emb_VxD.shape[0]}), got {index}")
  return nearest_to_vector(emb_VxD, emb_VxD[index], k, exclude=(index,))


def analogy(emb_VxD: jax.Array, a: int, b: int, c: int,
            k: int = 1) -> tuple[jax.Array, jax.Array]:
  """Analogy by vector arithmetic: the rows nearest to a - b + c (3CosAdd), excluding a, b, c.

  Reads "b is to a as c is to ?": a = king, b = man, c = woman -> queen. The three vectors are
  unit-normalized before the arithmetic (Mikolov et al. 2013), so no word dominates by its norm.

  Returns:
    (indices `[k]` int32, cosine similarities to the target `[k]`), best first.
  """
  _check_embeddings(emb_VxD)
  v = emb_VxD.shape[0]
  for name, i in (("a", a), ("b", b), ("c", c)):
    if not 0 <= i < v:
      raise ValueError(f"{name} must be a row index in [0, {v}), got {i}")
  unit_VxD = normalize_rows(emb_VxD)
  target_D = unit_VxD[a] - unit_VxD[b] + unit_VxD[c]
  return nearest_to_vector(emb_VxD, target_D, k, exclude=(a, b, c))


def singular_values(emb_VxD: jax.Array, center: bool = False) -> jax.Array:
  """Singular values of the embedding matrix (optionally mean-centred), descending, `[min(V, D)]`.

  Their squares over V (centred) are the variances along the principal axes; a fast decay means
  the embeddings live near a low-dimensional subspace (anisotropy).
  """
  _check_embeddings(emb_VxD)
  if center:
    emb_VxD = emb_VxD - jnp.mean(emb_VxD, axis=0, keepdims=True)
  return jnp.linalg.svd(emb_VxD, compute_uv=False)


def pca_2d(emb_VxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Projection of the mean-centred rows onto the top two principal axes.

  Axis signs are fixed so that the largest-magnitude loading of each axis is positive
  (a deterministic choice; PCA is otherwise defined only up to sign).

  Returns:
    (coords `[V, 2]`, explained_variance_ratio `[2]`: each axis's share of the total variance).
  """
  _check_embeddings(emb_VxD)
  if min(emb_VxD.shape) < 2:
    raise ValueError(f"emb needs at least 2 rows and 2 columns for a 2-D PCA, got shape "
                     f"{emb_VxD.shape}")
  centered_VxD = emb_VxD - jnp.mean(emb_VxD, axis=0, keepdims=True)
  _, sing, vt_KxD = jnp.linalg.svd(centered_VxD, full_matrices=False)
  axes_2xD = vt_KxD[:2]
  pivot_2 = jnp.argmax(jnp.abs(axes_2xD), axis=-1)
  signs_2x1 = jnp.sign(jnp.take_along_axis(axes_2xD, pivot_2[:, None], axis=-1))
  axes_2xD = axes_2xD * jnp.where(signs_2x1 == 0, 1.0, signs_2x1)
  variance = sing * sing
  ratio_2 = variance[:2] / jnp.maximum(jnp.sum(variance), _NORM_FLOOR)
  return centered_VxD @ axes_2xD.T, ratio_2


# ----------------------------------------------------------------------------------------------
# Summaries of a whole matrix (host side: numpy in, JSON-able values out).
# ----------------------------------------------------------------------------------------------


def all_nearest_neighbors(emb_VxD, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices `[V, k]`, cosines `[V, k]`) of each row's k nearest other rows, most similar first."""
  idx, sims = zip(*(nearest_neighbors(emb_VxD, i, k) for i in range(emb_VxD.shape[0])))
  return np.asarray(idx), np.asarray(sims)


def class_purity(neighbor_idx_VxK: np.ndarray, classes_V: list[str], names) -> dict:
  """How often a row's neighbours share its class, for each class of `names` (in that order) with
  at least 2 rows: {name: {tokens: n, same_class_share: mean over the class's rows of the share of
  their K neighbours (`neighbor_idx_VxK`, e.g. from `all_nearest_neighbors`) in the class, chance:
  (n - 1) / (V - 1)}}."""
  v = len(classes_V)
  out = {}
  for name in names:
    members = [i for i, c in enumerate(classes_V) if c == name]
    if len(members) < 2:
      continue
    same = [np.mean([classes_V[j] == name for j in neighbor_idx_VxK[i]]) for i in members]
    out[name] = {"tokens": len(members), "same_class_share": float(np.mean(same)),
                 "chance": (len(members) - 1) / (v - 1)}
  return out


def case_analysis(emb_VxD, pairs: list[tuple[int, int]], k: int) -> dict:
  """Structure of paired rows, `pairs` = [(lower row, upper row)] (a letter's two cases, 'a' and
  'A'): is upper the nearest row to lower (rank among all others, self excluded), and within the k
  nearest; do the analogies upper_x - lower_x + lower_y -> upper_y (3CosAdd, `analogy`) and the
  reverse hold over all ordered pairs x != y, top-1 and top-k, against the "only c" baseline (the
  nearest row to lower_y alone, a, b, c excluded); and the mean pairwise cosine of the offsets
  unit(upper) - unit(lower). The analogy entries are left out with fewer than 2 pairs."""
  v = emb_VxD.shape[0]
  cos_VxV = np.array(cosine_similarity_matrix(emb_VxD))
  np.fill_diagonal(cos_VxV, -np.inf)
  ranks = [int(np.sum(cos_VxV[lo] > cos_VxV[lo, up])) for lo, up in pairs]
  result = {"pairs": len(pairs),
            "upper_is_nearest_to_lower": float(np.mean([r == 0 for r in ranks])),
            "upper_in_top_k_of_lower": float(np.mean([r < k for r in ranks])),
            "chance_nearest": 1 / (v - 1)}
  if len(pairs) < 2:
    return result
  for direction in ("lower_to_upper", "upper_to_lower"):
    top1, topk, only_c = [], [], []
    for (x_lo, x_up), (y_lo, y_up) in itertools.permutations(pairs, 2):
      # "b is to a as c is to ?": a - b + c with a = X, b = x, c = y -> Y (or the reverse).
      a, b, c, want = ((x_up, x_lo, y_lo, y_up) if direction == "lower_to_upper"
                       else (x_lo, x_up, y_up, y_lo))
      idx, _ = analogy(emb_VxD, a, b, c, k=k)
      idx = np.asarray(idx)
      top1.append(idx[0] == want)
      topk.append(want in idx)
      row = cos_VxV[c].copy()
      row[[a, b, c]] = -np.inf
      only_c.append(int(np.argmax(row)) == want)
    result[direction] = {"analogies": len(top1), "top1": float(np.mean(top1)),
                         "top_k": float(np.mean(topk)), "only_c_baseline": float(np.mean(only_c)),
                         "chance_top1": 1 / (v - 3)}
  unit_VxD = np.asarray(normalize_rows(emb_VxD))
  offsets_PxD = np.stack([unit_VxD[up] - unit_VxD[lo] for lo, up in pairs])
  offset_cos_PxP = np.asarray(cosine_similarity_matrix(offsets_PxD))
  result["offset_mean_cosine"] = float(offset_cos_PxP[~np.eye(len(pairs), dtype=bool)].mean())
  return result


def spectrum(emb_VxD) -> dict:
  """The spectrum of the mean-centred matrix: singular_values `[min(V, D)]` (descending),
  variance_effective_rank exp(H(p)) with p_i = s_i^2 / sum s^2 (`spectra.variance_effective_rank`,
  float64), and its 2-D PCA (`pca_2d`): pca_coords `[V, 2]`, pca_variance_ratio `[2]` and their
  sum, top2_variance_share."""
  s = np.asarray(singular_values(emb_VxD, center=True), np.float64)
  emb64_VxD = np.asarray(emb_VxD, np.float64)
  rank = spectra.variance_effective_rank(emb64_VxD - emb64_VxD.mean(axis=0, keepdims=True))
  coords, ratio = pca_2d(emb_VxD)
  return {"singular_values": s.tolist(), "variance_effective_rank": float(rank),
          "top2_variance_share": float(np.sum(np.asarray(ratio))),
          "pca_coords": np.asarray(coords).tolist(),
          "pca_variance_ratio": np.asarray(ratio).tolist()}
