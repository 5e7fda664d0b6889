"""Geometry of an embedding matrix `[V, D]`: neighbours, analogies, spectrum, 2-D PCA.

Similarity is cosine similarity, cos(u, w) = u . w / (|u| |w|); a zero row has similarity 0 to
everything. Indices, `k` and `exclude` are Python ints (static under jit); the arrays may be
traced.
"""
import jax
import jax.numpy as jnp

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
