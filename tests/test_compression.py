"""Tests for llm_math.analysis.compression: SVD truncation and symmetric absmax quantization."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_math.analysis import compression as cp

from tests.helpers import D, DH, H, V, transformer_params


# ------------------------------------------------------------------------------------------------
# Tree plumbing.


def test_flatten_and_replace_roundtrip():
  params = transformer_params()
  flat = cp.flatten_tree(params)
  assert "block_1/attn/out/kernel" in flat and flat["lm_head/kernel"] is params["lm_head"]["kernel"]
  new = jnp.zeros((D, V))
  out = cp.replace_leaves(params, {"lm_head/kernel": new})
  assert out["lm_head"]["kernel"] is new
  # Everything else is the very same object, and the input tree is not modified.
  for path, leaf in cp.flatten_tree(out).items():
    if path != "lm_head/kernel":
      assert leaf is flat[path]
  assert params["lm_head"]["kernel"] is flat["lm_head/kernel"]


def test_kernel_matrix_views_follow_input_axes():
  params = transformer_params()
  sel = cp.select_matrices(params, r"block_0/attn/.*/kernel$")
  assert sel == {f"block_0/attn/{n}/kernel": (2 if n == "out" else 1)
                 for n in ("query", "key", "value", "out")}
  out = params["block_0"]["attn"]["out"]["kernel"]
  m = cp.kernel_to_matrix(out, 2)
  assert m.shape == (H * DH, D)
  # Row h*Dh + j of the matrix is input unit (h, j): y = x_flat @ W matches the einsum.
  x = jax.random.normal(jax.random.PRNGKey(1), (3, H, DH))
  np.testing.assert_allclose(x.reshape(3, -1) @ m, jnp.einsum("nhk,hkd->nd", x, out),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cp.matrix_to_kernel(m, out.shape), out)


def test_selection_errors():
  params = transformer_params()
  with pytest.raises(ValueError, match="pattern"):
    cp.select_matrices(params, r"no_such_leaf")
  with pytest.raises(ValueError, match="pattern"):
    cp.select_matrices(params, r"attn/out/bias$")  # 1-D leaf is not a matrix
  with pytest.raises(ValueError, match="n_in"):
    cp.kernel_to_matrix(jnp.zeros((3, 4)), 2)
  boxed = {"dense": {"kernel": nn.LogicallyPartitioned(jnp.zeros((3, 4)), ("embed", "mlp"))}}
  with pytest.raises(ValueError, match="unbox"):
    cp.select_matrices(boxed)
  assert cp.select_matrices(nn.meta.unbox(boxed)) == {"dense/kernel": 1}


# ------------------------------------------------------------------------------------------------
# SVD truncation.


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (20, 20), (33, 5)])
def test_truncation_errors_match_discarded_singular_values(shape):
  rng = np.random.default_rng(sum(shape))
  w = rng.normal(size=shape).astype(np.float32)
  s64 = np.linalg.svd(w.astype(np.float64), compute_uv=False)
  for rank in range(min(shape) + 1):
    w_r = np.asarray(cp.truncate_svd(jnp.asarray(w), rank), np.float64)
    diff = w.astype(np.float64) - w_r
    fro = np.linalg.norm(diff)
    spec = np.linalg.norm(diff, ord=2)
    expected_fro = math.sqrt(np.sum(s64[rank:]**2))
    expected_spec = s64[rank] if rank < min(shape) else 0.0
    np.testing.assert_allclose(fro, expected_fro, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(spec, expected_spec, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cp.truncation_errors(s64, rank), (expected_fro, expected_spec),
                               rtol=1e-12)
    assert np.linalg.matrix_rank(w_r, tol=1e-3) == rank


def test_truncation_beats_other_rank_r_approximations():
  """Eckart-Young by brute force: projections onto random r-dim subspaces never do better."""
  rng = np.random.default_rng(3)
  w = rng.normal(size=(15, 10)) * np.linspace(3, 0.1, 10)[None, :]
  rank = 3
  best = np.linalg.norm(w - np.asarray(cp.truncate_svd(jnp.asarray(w, jnp.float32), rank)))
  for _ in range(200):
    q, _ = np.linalg.qr(rng.normal(size=(10, rank)))  # orthonormal basis of a random subspace
    other = w @ q @ q.T  # best approximation with that row space
    assert np.linalg.norm(w - other) >= best - 1e-4


def test_low_rank_matrix_is_recovered_exactly():
  rng = np.random.default_rng(4)
  w = (rng.normal(size=(18, 4)) @ rng.normal(size=(4, 9))).astype(np.float32)
  left, right = cp.low_rank_factors(jnp.asarray(w), 4)
  assert left.shape == (18, 4) and right.shape == (4, 9)
  np.testing.assert_allclose(left @ right, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95, 0.999])
def test_global_energy_selection_hits_target_minimally(energy):
  params = transformer_params(seed=5)
  new, report = cp.svd_compress_tree(params, energy=energy, pattern=r"block_\d/.*kernel$")
  recs = report["matrices"]
  assert len(recs) == 12
  flat = cp.flatten_tree(params)
  svals = {p: np.linalg.svd(np.asarray(cp.kernel_to_matrix(flat[p], 2 if "attn/out" in p else 1),
                                       np.float64), compute_uv=False) for p in recs}
  total = sum(np.sum(s**2) for s in svals.values())
  kept = sum(np.sum(s[:recs[p]["rank"]]**2) for p, s in svals.items())
  assert kept / total >= energy - 1e-9
  np.testing.assert_allclose(report["total"]["energy_kept"], kept / total, rtol=1e-5)
  # Minimal: dropping the smallest kept singular value anywhere falls below the target.
  smallest_kept = min(s[recs[p]["rank"] - 1] for p, s in svals.items() if recs[p]["rank"] > 0)
  assert (kept - smallest_kept**2) / total < energy
  # Global: no discarded singular value exceeds any kept one.
  largest_dropped = max((s[recs[p]["rank"]] for p, s in svals.items() if recs[p]["rank"] < s.size),
                        default=0.0)
  assert largest_dropped <= smallest_kept + 1e-6
  # Total squared error equals the discarded energy.
  np.testing.assert_allclose(report["total"]["frobenius_error"]**2, total - kept, rtol=1e-3)


def test_rank_for_energy_single_matrix():
  s = np.array([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
  assert cp.rank_for_energy(s, 16 / 22) == 1
  assert cp.rank_for_energy(s, 16 / 22 + 1e-6) == 2
  assert cp.rank_for_energy(s, 1.0) == 4
  with pytest.raises(ValueError, match="energy"):
    cp.rank_for_energy(s, 0.0)


def test_svd_compress_tree_rank_report_and_untouched_leaves():
  params = transformer_params(seed=6)
  new, report = cp.svd_compress_tree(params, rank=3)
  recs = report["matrices"]
  assert set(recs) == {p for p in cp.flatten_tree(params) if p.endswith("kernel")}
  rec = recs["block_0/attn/out/kernel"]
  assert rec["shape"] == (H, DH, D) and rec["matrix_shape"] == (H * DH, D)
  assert rec["params_dense"] == H * DH * D and rec["params_factored"] == 3 * (H * DH + D)
  flat, new_flat = cp.flatten_tree(params), cp.flatten_tree(new)
  for path, leaf in flat.items():
    if path in recs:
      n_in = 2 if "attn/out" in path else 1
      m = np.asarray(cp.kernel_to_matrix(new_flat[path], n_in), np.float64)
      assert new_flat[path].shape == leaf.shape
      assert np.linalg.matrix_rank(m, tol=1e-4) == 3
      err = np.linalg.norm(np.asarray(cp.kernel_to_matrix(leaf, n_in), np.float64) - m)
      np.testing.assert_allclose(recs[path]["frobenius_error"], err, rtol=1e-4)
    else:
      assert new_flat[path] is leaf


def test_svd_compress_tree_rank_fraction():
  params = transformer_params(seed=7)
  _, report = cp.svd_compress_tree(params, rank_fraction=0.25)
  for rec in report["matrices"].values():
    assert rec["rank"] == max(1, round(0.25 * min(rec["matrix_shape"])))
  with pytest.raises(ValueError, match="exactly one"):
    cp.svd_compress_tree(params, rank=2, energy=0.9)
  with pytest.raises(ValueError, match="rank_fraction"):
    cp.svd_compress_tree(params, rank_fraction=1.5)


# ------------------------------------------------------------------------------------------------
# Quantization.


def uneven_matrix(seed, shape=(64, 24)):
  """A matrix whose columns (and rows) have scales spread over two orders of magnitude."""
  rng = np.random.default_rng(seed)
  col = np.exp(rng.uniform(np.log(0.01), np.log(1.0), size=shape[1]))
  row = np.exp(rng.uniform(np.log(0.1), np.log(1.0), size=shape[0]))
  return jnp.asarray(rng.normal(size=shape) * row[:, None] * col[None, :], jnp.float32)


CASES = [(8, "per_tensor", None), (8, "per_channel", None), (8, "group", 16),
         (4, "per_tensor", None), (4, "per_channel", None), (4, "group", 16), (4, "group", 8)]


def test_qmax_symmetric_range():
  # Symmetric codes drop -2^(b-1): +w and -w must get codes of equal size, and a block whose absmax
  # is positive could not use +128.
  assert cp.qmax(8) == 127 and cp.qmax(4) == 7
  with pytest.raises(ValueError, match="bits"):
    cp.qmax(9)


@pytest.mark.parametrize("bits,granularity,group_size", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_quantization_error_codes_and_absmax(bits, granularity, group_size, seed):
  w = uneven_matrix(seed)
  codes, scales = cp.quantize(w, bits, granularity, group_size)
  q = cp.qmax(bits)
  assert codes.dtype == jnp.int8
  assert int(codes.min()) >= -q and int(codes.max()) <= q
  assert int(jnp.max(jnp.abs(codes))) == q  # the grid is used up to +-qmax
  scale_IxO = np.asarray(cp.broadcast_scales(scales, w.shape))
  w_hat = np.asarray(cp.dequantize(codes, scales))
  # Round to nearest: every element within half a step (plus float slack).
  assert np.all(np.abs(np.asarray(w) - w_hat) <= scale_IxO / 2 * (1 + 1e-5) + 1e-12)
  # Codes are the nearest grid points: brute force over all 2q+1 codes.
  grid = np.arange(-q, q + 1)[None, None, :] * scale_IxO[..., None]
  nearest = np.min(np.abs(np.asarray(w)[..., None] - grid), axis=-1)
  np.testing.assert_allclose(np.abs(np.asarray(w) - w_hat), nearest,
                             atol=1e-6 * float(jnp.max(jnp.abs(w))))
  # The absmax element of each block maps to +-qmax and is reconstructed to float32 precision.
  a = np.abs(np.asarray(w))
  if granularity == "per_tensor":
    absmax_IxO = np.full(a.shape, a.max())
  elif granularity == "per_channel":
    absmax_IxO = np.broadcast_to(a.max(axis=0)[None, :], a.shape)
  else:
    g = group_size
    absmax_IxO = np.repeat(a.reshape(-1, g, a.shape[1]).max(axis=1), g, axis=0)
  is_max = a == absmax_IxO
  assert is_max.sum() >= np.size(scales)
  np.testing.assert_array_equal(np.asarray(codes)[is_max], q * np.sign(np.asarray(w)[is_max]))
  np.testing.assert_allclose(w_hat[is_max], np.asarray(w)[is_max], rtol=2e-7)


def test_per_channel_beats_per_tensor_on_uneven_columns():
  for seed in range(3):
    w = uneven_matrix(seed)
    for bits in (8, 4):
      err_t = jnp.linalg.norm(w - cp.quantize_dequantize(w, bits, "per_tensor"))
      err_c = jnp.linalg.norm(w - cp.quantize_dequantize(w, bits, "per_channel"))
      err_g = jnp.linalg.norm(w - cp.quantize_dequantize(w, bits, "group", 8))
      assert err_c <= err_t and err_g <= err_c
      # Per column the per-channel step is never larger than the per-tensor step.
      _, s_t = cp.quantize(w, bits, "per_tensor")
      _, s_c = cp.quantize(w, bits, "per_channel")
      assert np.all(np.asarray(s_c) <= float(s_t) * (1 + 1e-6))


def test_group_of_full_height_equals_per_channel():
  w = uneven_matrix(4)
  c1, s1 = cp.quantize(w, 4, "per_channel")
  c2, s2 = cp.quantize(w, 4, "group", w.shape[0])
  np.testing.assert_array_equal(c1, c2)
  np.testing.assert_array_equal(s1, s2[0])


def test_fp16_scales_keep_the_half_step_bound():
  w = uneven_matrix(5)
  codes, scales = cp.quantize(w, 4, "group", 16, scale_dtype=jnp.float16)
  assert scales.dtype == jnp.float16
  scale_IxO = np.asarray(cp.broadcast_scales(scales.astype(jnp.float32), w.shape))
  err = np.abs(np.asarray(w) - np.asarray(cp.dequantize(codes, scales)))
  assert np.all(err <= scale_IxO / 2 * (1 + 1e-5) + 1e-12)


def test_zero_block_and_bad_arguments():
  w = jnp.zeros((8, 3)).at[:, 1].set(jnp.arange(8.0) - 4)
  codes, scales = cp.quantize(w, 8, "per_channel")
  assert float(scales[0]) == 0.0 and int(jnp.abs(codes[:, 0]).max()) == 0
  np.testing.assert_allclose(cp.dequantize(codes, scales), w, atol=float(scales[1]) / 2)
  with pytest.raises(ValueError, match="group_size"):
    cp.quantize(w, 4, "group", 3)
  with pytest.raises(ValueError, match="granularity"):
    cp.quantize(w, 4, "per_row")
  with pytest.raises(ValueError, match="w_IxO"):
    cp.quantize(jnp.zeros((2, 3, 4)))


def test_bits_per_param_and_bytes():
  size = cp.quantized_size(4096, 4096, 4, n_scales=4096 * 4096 // 128, scale_dtype=jnp.float16)
  assert size["bits_per_param"] == 4.125
  assert size["bytes"] == 4096 * 4096 // 2 + 2 * 4096 * 4096 // 128
  assert cp.quantized_size(100, 10, 8, 10)["bits_per_param"] == 8 + 32 * 10 / 1000


def test_quantize_tree_selected_leaves_and_report():
  params = transformer_params(seed=8)
  new, report = cp.quantize_tree(params, bits=4, granularity="group", group_size=8,
                                 scale_dtype=jnp.float16, pattern=r"block_\d/(attn|mlp)/.*kernel$")
  recs = report["matrices"]
  assert len(recs) == 12
  rec = recs["block_1/attn/out/kernel"]
  assert rec["matrix_shape"] == (H * DH, D) and rec["n_scales"] == (H * DH // 8) * D
  assert rec["bits_per_param"] == 4 + 16 / 8
  assert rec["bytes"] == H * DH * D // 2 + 2 * rec["n_scales"]
  assert report["total"]["bits_per_param"] == pytest.approx(6.0)
  assert report["total"]["bytes_dense"] == 4 * report["total"]["n_params"]
  flat, new_flat = cp.flatten_tree(params), cp.flatten_tree(new)
  for path, leaf in flat.items():
    if path in recs:
      n_in = 2 if "attn/out" in path else 1
      expected = cp.quantize_dequantize(cp.kernel_to_matrix(leaf, n_in), 4, "group", 8, jnp.float16)
      np.testing.assert_array_equal(cp.kernel_to_matrix(new_flat[path], n_in), expected)
      assert new_flat[path].dtype == leaf.dtype
      assert 0 < rec["relative_error"] < 0.2
    else:
      assert new_flat[path] is leaf


def test_int8_per_channel_tree_is_close():
  params = transformer_params(seed=9)
  _, report = cp.quantize_tree(params, bits=8)
  assert max(r["relative_error"] for r in report["matrices"].values()) < 0.01
  assert report["total"]["bits_per_param"] > 8


# ------------------------------------------------------------------------------------------------
# Training part of a tree; abstract shapes.


def test_unflatten_inverts_flatten_and_abstract_shapes():
  params = transformer_params()
  flat = cp.flatten_tree(params)
  assert cp.flatten_tree(cp.unflatten_tree(flat)) == flat
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  shapes = cp.matrix_shapes(abstract, r"block_0/attn/.*/kernel$")
  assert shapes == {"block_0/attn/query/kernel": (D, H * DH), "block_0/attn/key/kernel": (D, H * DH),
                    "block_0/attn/value/kernel": (D, H * DH), "block_0/attn/out/kernel": (H * DH, D)}


def test_train_only_freezes_every_other_subtree():
  tree = {"a": {"w": jnp.arange(6.0).reshape(2, 3)},
          "b": {"w": nn.Partitioned(jnp.ones((4, 4)), ("embed", "mlp")), "v": jnp.ones(3)}}
  grads = {"a": {"w": jnp.full((2, 3), 0.5)}, "b": {"w": jnp.ones((4, 4)), "v": jnp.ones(3)}}
  inner = optax.adamw(0.1, weight_decay=0.5)  # Weight decay would move a frozen leaf.
  tx = cp.train_only(inner, "a")
  state = tx.init(tree)
  updates, _ = tx.update(grads, state, tree)
  alone, _ = inner.update(grads["a"], inner.init(tree["a"]), tree["a"])
  np.testing.assert_array_equal(updates["a"]["w"], alone["w"])
  assert not any(np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates["b"]))
  # No optimizer state for the frozen subtree (Adam's moments of "a" and the step count only), and
  # its boxes are masked whole: the state's logical partition specs have the unboxed state's
  # structure, which is what laying the state out over a mesh needs.
  assert sum(np.size(x) for x in jax.tree_util.tree_leaves(nn.meta.unbox(state))) == 2 * 6 + 1
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  assert (jax.tree_util.tree_structure(nn.meta.unbox(state))
          == jax.tree_util.tree_structure(nn.get_partition_spec(state), is_leaf=is_spec))


# ------------------------------------------------------------------------------------------------
# Sweeps.


def test_parse_scheme_and_nll_record():
  assert cp.parse_scheme(" int4-group32") == {
      "name": "int4-group32", "bits": 4, "granularity": "group", "group_size": 32}
  assert cp.parse_scheme("int8-per_channel")["granularity"] == "per_channel"
  for bad in ("int16-per_tensor", "int4-group0", "fp8-per_tensor", "int4-per_row"):
    with pytest.raises(ValueError, match="scheme"):
      cp.parse_scheme(bad)
  record = cp.nll_record(math.log(3.0), math.log(2.0))
  assert record["val_ppl"] == pytest.approx(3.0)
  assert record["bits_per_token"] == pytest.approx(math.log2(3.0))
  assert record["ppl_change_pct"] == pytest.approx(50.0)
  assert "ppl_change_pct" not in cp.nll_record(1.0)


def _energy_score(params):
  """A stand-in for an evaluator: the tree's sum of squares over the original tree's (so 1.0 for
  the original). For truncated matrices it is what Eckart-Young predicts from the spectra."""
  total = lambda p: sum(float(np.sum(np.asarray(x, np.float64)**2))
                        for x in cp.flatten_tree(p).values())
  return lambda p: total(p) / total(params)


def test_svd_sweep_records_follow_the_spectra():
  params = transformer_params(seed=11)
  pattern = r"block_\d/.*kernel$"
  score = _energy_score(params)
  sweep = cp.svd_sweep(params, score, 1.0, rank_fractions=(0.25, 1.0), energies=(0.6, 0.9),
                       pattern=pattern)
  flat = cp.flatten_tree(params)
  matrices = {p: np.asarray(cp.kernel_to_matrix(flat[p], n), np.float64)
              for p, n in cp.select_matrices(params, pattern).items()}
  numpy_s = {p: np.linalg.svd(m, compute_uv=False) for p, m in matrices.items()}
  assert list(sweep["spectra"]) == list(numpy_s)
  for p, s in numpy_s.items():
    np.testing.assert_allclose(sweep["spectra"][p], s, rtol=1e-4)
    assert sweep["matrix_shapes"][p] == list(matrices[p].shape)
  recs = sweep["records"]
  assert [(r["method"], r["setting"]) for r in recs] == [
      ("uniform", 0.25), ("uniform", 1.0), ("global energy", 0.6), ("global energy", 0.9)]
  total_s2 = sum(np.sum(s**2) for s in numpy_s.values())
  other = sum(float(np.sum(np.asarray(x, np.float64)**2)) for p, x in flat.items()
              if p not in numpy_s)
  for r in recs:
    if r["method"] == "uniform":
      assert r["ranks"] == {p: max(1, round(r["setting"] * s.size)) for p, s in numpy_s.items()}
    kept = sum(np.sum(numpy_s[p][:k]**2) for p, k in r["ranks"].items())
    assert r["singular_values_kept"] == pytest.approx(
        sum(r["ranks"].values()) / sum(s.size for s in numpy_s.values()))
    assert r["energy_kept"] == pytest.approx(kept / total_s2, rel=1e-5)
    assert r["relative_error"] == pytest.approx(math.sqrt(1 - kept / total_s2), rel=1e-3, abs=1e-4)
    # The score ran on the truncated tree: ||W_r||_F^2 = sum of the kept s_i^2.
    assert r["val_nll"] == pytest.approx((other + kept) / (other + total_s2), rel=1e-5)
    assert r["ppl_change_pct"] == pytest.approx(100 * (math.exp(r["val_nll"] - 1.0) - 1))
  assert recs[1]["val_nll"] == pytest.approx(1.0, rel=1e-5) and recs[1]["energy_kept"] == 1.0
  assert recs[2]["energy_kept"] >= 0.6 and recs[3]["energy_kept"] >= 0.9


def test_quant_sweep_records_match_a_numpy_quantizer():
  params = transformer_params(seed=12)
  pattern = r"mlp/.*kernel$"
  sweep = cp.quant_sweep(params, _energy_score(params), 1.0, ["int8-per_channel", "int4-group8"],
                         scale_dtype="float16", pattern=pattern)
  flat = cp.flatten_tree(params)
  mats = {p: np.asarray(flat[p], np.float64) for p in cp.select_matrices(params, pattern)}
  n = sum(m.size for m in mats.values())
  assert sweep["params_quantized"] == n and sweep["params_total"] == sum(
      np.size(x) for x in flat.values())
  first, int8, int4 = sweep["records"]
  assert first["scheme"] == "float32" and first["ppl_change_pct"] == 0.0
  assert first["model_bytes"] == 4 * sweep["params_total"]

  def rtn(w, bits, group):
    """Symmetric absmax round-to-nearest with float16 scales, in numpy."""
    q = 2 ** (bits - 1) - 1
    blocks = w.reshape(-1, group, w.shape[1])
    scale = (np.abs(blocks).max(axis=1, keepdims=True) / q).astype(np.float16).astype(np.float64)
    return (np.clip(np.round(blocks / scale), -q, q) * scale).reshape(w.shape)

  for rec, bits, group in ((int8, 8, None), (int4, 4, 8)):
    w_hat = {p: rtn(m, bits, group or m.shape[0]) for p, m in mats.items()}
    err2 = sum(np.sum((mats[p] - w_hat[p])**2) for p in mats)
    norm2 = sum(np.sum(m**2) for m in mats.values())
    assert rec["relative_error"] == pytest.approx(math.sqrt(err2 / norm2), rel=1e-3)
    n_scales = sum((m.shape[0] // (group or m.shape[0])) * m.shape[1] for m in mats.values())
    assert rec["bits_per_param"] == pytest.approx(bits + 16 * n_scales / n)
    assert rec["bytes"] == n * bits // 8 + 2 * n_scales
    assert rec["model_bytes"] == rec["bytes"] + 4 * (sweep["params_total"] - n)
    # The score ran on the dequantized tree.
    other = sum(float(np.sum(np.asarray(x, np.float64)**2)) for p, x in flat.items()
                if p not in mats)
    total = other + norm2
    assert rec["val_nll"] == pytest.approx(
        (other + sum(np.sum(w**2) for w in w_hat.values())) / total, rel=1e-5)
  with pytest.raises(ValueError, match="scale_dtype"):
    cp.quant_sweep(params, _energy_score(params), 1.0, ["int8-per_channel"], scale_dtype="int8")
