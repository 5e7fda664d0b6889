r"""Geometry of a trained model's token embeddings: neighbours, analogies, spectrum and 2-D PCA.

  python -m experiments.embeddings --workdir=/tmp/shakespeare_cpu --output_dir=/tmp/shakespeare_emb

Reads the token embedding matrix E [V, D] of a training run's latest checkpoint (with tied
embeddings it is also the output layer) and the same matrix at initialization (the run's initializer
and seed, the reference every number is compared with: it carries no learned structure). Similarity
is cosine.

  * nearest neighbours of every token; for each token class (lowercase vowels, uppercase consonants,
    punctuation, ...) the share of a token's k nearest neighbours in its own class, against chance
    (n_class - 1) / (V - 1);
  * case analogies (3CosAdd): 'A' - 'a' + 'b' -> 'B'? over all ordered pairs of letters that occur
    in both cases, top-1 and top-k accuracy, against the "only c" baseline (the nearest neighbour of
    'b' itself) and the initialization; and how parallel the case offsets E['A'] - E['a'] are;
  * the singular values of the centred matrix, its effective rank exp(H(p)) with
    p_i = s_i^2 / sum s^2, and the projection on the top two principal axes.

Writes to --output_dir (default <workdir>/embeddings, so the run's own results stay untouched):
results.json, results.md, embedding_spectrum.png, embedding_pca.png, embedding_cosine.png
(figures drawn by experiments/plot_embeddings.py).

Everything comes from the run in --workdir, so the shared flags --data, --tokenizer, --vocab_size,
--seed, --tfds_data_dir and --mesh are refused with an error rather than silently ignored (the
initialization compared with is always the run's own seed).
"""

import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging

from experiments import common
from experiments import plot_embeddings
from llm_math.analysis import embeddings as emb_lib
from llm_math import checkpoint
from llm_math import files
from llm_math import train as train_lib
from llm_math.errors import UsageError

OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                 "Where results and figures go (default: <workdir>/embeddings).")
NUM_NEIGHBORS = flags.DEFINE_integer("num_neighbors", 5, "k of the nearest-neighbour statistics.")

# Shared flags (experiments/common.py) that analysing a finished run has no use for, and why.
UNUSED_FLAGS = (
    (common.DATA, "the data comes from the run in --workdir"),
    (common.TOKENIZER, "the tokenizer is the one saved in --workdir"),
    (common.VOCAB_SIZE, "the vocabulary is the one saved in --workdir"),
    (common.SEED, "the initialization compared with uses the run's own seed (its config.json)"),
    (common.TFDS_DATA_DIR, "no dataset is read, only the run in --workdir"),
    (common.MESH, "the analysis runs on one device"),
)

CLASSES = ("lowercase vowel", "lowercase consonant", "uppercase vowel", "uppercase consonant",
           "digit", "punctuation", "whitespace", "other")
# Tokens whose neighbours results.md lists (when the vocabulary has them).
SHOWN = tuple("aeiouAEIOUtsnh") + (" ", "\n", ".", ",", "!", "?", "'", ":")


def token_class(text: str) -> str:
  """The class of a token by the text it decodes to (single characters only; else 'other')."""
  if len(text) != 1:
    return "other"
  if text.isspace():
    return "whitespace"
  if text.isdigit():
    return "digit"
  if text.isalpha() and text.isascii():
    vowel = text.lower() in "aeiou"
    case = "lowercase" if text.islower() else "uppercase"
    return f"{case} {'vowel' if vowel else 'consonant'}"
  return "punctuation" if not text.isalnum() else "other"


def display_label(text: str) -> str:
  """A printable label: newline as \\n, space as the open-box sign."""
  return {"\n": "\\n", " ": "\u2423", "\t": "\\t", "": "<empty>"}.get(text, text)


def initial_embedding(trained) -> np.ndarray:
  """The token embedding the run started from: its model, initializer and seed (llm_math.train)."""
  init_rng, _ = jax.random.split(jax.random.PRNGKey(trained.config.seed))
  variables = trained.model.init(init_rng, jnp.zeros((1, trained.config.seq_len), jnp.int32))
  params = jax.tree_util.tree_map(
      lambda x: x.unbox() if hasattr(x, "unbox") else x, variables["params"],
      is_leaf=lambda x: hasattr(x, "unbox"))
  return np.asarray(params["token_embed"]["embedding"])


def neighbors(emb_VxD, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices [V, k], cosines [V, k]) of every token's k nearest other tokens."""
  idx, sims = zip(*(emb_lib.nearest_neighbors(emb_VxD, i, k) for i in range(emb_VxD.shape[0])))
  return np.asarray(idx), np.asarray(sims)


def class_purity(neighbor_idx_VxK: np.ndarray, classes: list[str]) -> dict:
  """Per class with >= 2 tokens: mean share of a member's k neighbours in its class, and chance."""
  v = len(classes)
  out = {}
  for name in CLASSES:
    members = [i for i, c in enumerate(classes) if c == name]
    if len(members) < 2:
      continue
    same = [np.mean([classes[j] == name for j in neighbor_idx_VxK[i]]) for i in members]
    out[name] = {"tokens": len(members), "same_class_share": float(np.mean(same)),
                 "chance": (len(members) - 1) / (v - 1)}
  return out


def case_pairs(texts: list[str]) -> list[tuple[int, int, str]]:
  """(lowercase id, uppercase id, letter) for every ASCII letter present in both cases."""
  index = {t: i for i, t in enumerate(texts)}
  return [(index[c], index[c.upper()], c) for c in "abcdefghijklmnopqrstuvwxyz"
          if c in index and c.upper() in index]


def case_analysis(emb_VxD, pairs, k: int) -> dict:
  """Case structure: is 'A' near 'a'; do analogies 'A' - 'a' + 'b' -> 'B' (and back) work?"""
  v = emb_VxD.shape[0]
  cos_VxV = np.array(emb_lib.cosine_similarity_matrix(emb_VxD))
  np.fill_diagonal(cos_VxV, -np.inf)
  ranks = [int(np.sum(cos_VxV[lo] > cos_VxV[lo, up])) for lo, up, _ in pairs]
  result = {"letters": "".join(c for _, _, c in pairs), "pairs": len(pairs),
            "upper_is_nearest_to_lower": float(np.mean([r == 0 for r in ranks])),
            "upper_in_top_k_of_lower": float(np.mean([r < k for r in ranks])),
            "chance_nearest": 1 / (v - 1)}
  if len(pairs) < 2:
    return result
  for direction in ("lower_to_upper", "upper_to_lower"):
    top1, topk, only_c = [], [], []
    for (x_lo, x_up, _), (y_lo, y_up, _) in itertools.permutations(pairs, 2):
      # "b is to a as c is to ?": a - b + c with a = X, b = x, c = y -> Y (or the reverse).
      a, b, c, want = ((x_up, x_lo, y_lo, y_up) if direction == "lower_to_upper"
                       else (x_lo, x_up, y_up, y_lo))
      idx, _ = emb_lib.analogy(emb_VxD, a, b, c, k=k)
      idx = np.asarray(idx)
      top1.append(idx[0] == want)
      topk.append(want in idx)
      row = cos_VxV[c].copy()
      row[[a, b, c]] = -np.inf
      only_c.append(int(np.argmax(row)) == want)
    result[direction] = {"analogies": len(top1), "top1": float(np.mean(top1)),
                         "top_k": float(np.mean(topk)), "only_c_baseline": float(np.mean(only_c)),
                         "chance_top1": 1 / (v - 3)}
  unit_VxD = np.asarray(emb_lib.normalize_rows(emb_VxD))
  offsets_PxD = np.stack([unit_VxD[up] - unit_VxD[lo] for lo, up, _ in pairs])
  offset_cos = np.asarray(emb_lib.cosine_similarity_matrix(offsets_PxD))
  result["offset_mean_cosine"] = float(offset_cos[~np.eye(len(pairs), dtype=bool)].mean())
  return result


def spectrum(emb_VxD) -> dict:
  """Singular values of the centred matrix, effective rank exp(H(s^2 / sum s^2)), 2-D PCA."""
  s = np.asarray(emb_lib.singular_values(emb_VxD, center=True), np.float64)
  p = s ** 2 / np.sum(s ** 2)
  p = p[p > 0]
  coords, ratio = emb_lib.pca_2d(emb_VxD)
  return {"singular_values": s.tolist(), "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
          "top2_variance_share": float(np.sum(np.asarray(ratio))),
          "pca_coords": np.asarray(coords).tolist(),
          "pca_variance_ratio": np.asarray(ratio).tolist()}


def analyze(emb_VxD: np.ndarray, texts: list[str], k: int) -> dict:
  """Every statistic of one embedding matrix."""
  classes = [token_class(t) for t in texts]
  idx, sims = neighbors(emb_VxD, k)
  pairs = case_pairs(texts)
  return {
      "norm_mean": float(np.linalg.norm(emb_VxD, axis=1).mean()),
      "neighbors": {"index": idx.tolist(), "cosine": sims.tolist()},
      "class_purity": class_purity(idx, classes),
      "case": case_analysis(emb_VxD, pairs, k) if pairs else None,
      "spectrum": spectrum(emb_VxD),
  }


def cosine_view(emb_VxD: np.ndarray, texts: list[str], max_tokens: int = 96) -> dict:
  """The cosine matrix of (at most max_tokens) tokens ordered by class, for the heatmap."""
  classes = [token_class(t) for t in texts]
  order = sorted(range(len(texts)),
                 key=lambda i: (CLASSES.index(classes[i]), texts[i].lower(), texts[i]))
  order = order[:max_tokens]
  cos = np.asarray(emb_lib.cosine_similarity_matrix(emb_VxD))[np.ix_(order, order)]
  return {"order": order, "cosine": np.round(cos, 4).tolist()}


def analogy_examples(emb_VxD, texts: list[str], k: int) -> list[dict]:
  """A few case analogies with their top-k answers, for the table."""
  index = {t: i for i, t in enumerate(texts)}
  out = []
  for x, y in (("a", "b"), ("a", "e"), ("t", "h"), ("e", "o"), ("s", "m"), ("r", "w")):
    if all(c in index for c in (x, x.upper(), y, y.upper())):
      idx, sims = emb_lib.analogy(emb_VxD, index[x.upper()], index[x], index[y], k=k)
      out.append({"query": f"{x.upper()} - {x} + {y}", "want": y.upper(),
                  "answers": [[texts[int(i)], float(s)] for i, s in zip(idx, sims)]})
  return out


def markdown(results: dict) -> str:
  """results.md: the tables and the key numbers in words."""
  labels = results["labels"]
  k = results["num_neighbors"]
  tr, init = results["trained"], results["initialization"]
  lines = [
      f"# Token embeddings of {results['workdir']} (step {results['step']})", "",
      f"E is {results['shape'][0]} x {results['shape'][1]} "
      f"({'tied: also the output layer' if results['tied'] else 'input embedding only'}); "
      f"compared with the same matrix at initialization (seed {results['seed']}). "
      "Similarity is cosine.", "",
      "## Spectrum", "",
      "| matrix | effective rank exp(H(s^2/sum s^2)) | top-2 PCA variance share | s_1 / s_10 "
      "| mean row norm |",
      "|---|---:|---:|---:|---:|",
  ]
  for name, r in (("trained", tr), ("initialization", init)):
    s = r["spectrum"]["singular_values"]
    ratio = s[0] / s[min(9, len(s) - 1)]
    lines.append(f"| {name} | {r['spectrum']['effective_rank']:.1f} of {len(s)} | "
                 f"{r['spectrum']['top2_variance_share']:.3f} | {ratio:.2f} | "
                 f"{r['norm_mean']:.3f} |")
  lines += ["", f"## Classes: share of each token's {k} nearest neighbours in its own class", "",
            "| class | tokens | trained | initialization | chance |", "|---|---:|---:|---:|---:|"]
  for name, r in tr["class_purity"].items():
    lines.append(f"| {name} | {r['tokens']} | {r['same_class_share']:.2f} | "
                 f"{init['class_purity'][name]['same_class_share']:.2f} | {r['chance']:.2f} |")
  if tr["case"] and "lower_to_upper" in tr["case"]:
    c, ci = tr["case"], init["case"]
    lines += ["", f"## Case ({c['pairs']} letters in both cases: {c['letters']})", "",
              "| measure | trained | initialization | chance |", "|---|---:|---:|---:|",
              f"| 'A' is the nearest token to 'a' | {c['upper_is_nearest_to_lower']:.2f} | "
              f"{ci['upper_is_nearest_to_lower']:.2f} | {c['chance_nearest']:.3f} |",
              f"| 'A' among the {k} nearest to 'a' | {c['upper_in_top_k_of_lower']:.2f} | "
              f"{ci['upper_in_top_k_of_lower']:.2f} | {k * c['chance_nearest']:.3f} |"]
    for direction, text, c_token in (("lower_to_upper", "'A' - 'a' + 'b' -> 'B'", "'b'"),
                                     ("upper_to_lower", "'a' - 'A' + 'B' -> 'b'", "'B'")):
      d, di = c[direction], ci[direction]
      lines += [f"| {text}, top-1 ({d['analogies']} analogies) | {d['top1']:.2f} | "
                f"{di['top1']:.2f} | {d['chance_top1']:.3f} |",
                f"| {text}, top-{k} | {d['top_k']:.2f} | {di['top_k']:.2f} | "
                f"{k * d['chance_top1']:.3f} |",
                f"| {text}, only-c baseline (nearest to {c_token}) | {d['only_c_baseline']:.2f} | "
                f"{di['only_c_baseline']:.2f} | {d['chance_top1']:.3f} |"]
    lines.append(f"| mean cosine between case offsets E['A'] - E['a'] | "
                 f"{c['offset_mean_cosine']:.2f} | {ci['offset_mean_cosine']:.2f} | 0 |")
    lines += ["", "| analogy | expected | top answers (cosine) |", "|---|---|---|"]
    for ex in results["analogy_examples"]:
      answers = ", ".join(f"{display_label(t)} ({s:.2f})" for t, s in ex["answers"])
      lines.append(f"| {ex['query']} | {ex['want']} | {answers} |")
  lines += ["", f"## Nearest neighbours (trained, top {k}, cosine)", "",
            "| token | class | neighbours |", "|---|---|---|"]
  index = {t: i for i, t in enumerate(results["texts"])}
  for t in SHOWN:
    if t in index:
      i = index[t]
      nb = ", ".join(f"{labels[j]} ({s:.2f})" for j, s in zip(tr["neighbors"]["index"][i],
                                                               tr["neighbors"]["cosine"][i]))
      lines.append(f"| {labels[i]} | {token_class(t)} | {nb} |")
  lines += ["", "## In words", "", results["summary"]]
  return "\n".join(lines) + "\n"


def summary(results: dict) -> str:
  tr, init = results["trained"], results["initialization"]
  words = [f"Training lowered the effective rank of the centred embedding from "
           f"{init['spectrum']['effective_rank']:.1f} to {tr['spectrum']['effective_rank']:.1f} "
           f"(of {len(tr['spectrum']['singular_values'])}); the top two principal axes hold "
           f"{100 * tr['spectrum']['top2_variance_share']:.0f}% of the variance "
           f"({100 * init['spectrum']['top2_variance_share']:.0f}% at initialization)."]
  purity = tr["class_purity"]
  if "lowercase vowel" in purity:
    p = purity["lowercase vowel"]
    words.append(f"Of each lowercase vowel's {results['num_neighbors']} nearest neighbours, "
                 f"{100 * p['same_class_share']:.0f}% are lowercase vowels (chance "
                 f"{100 * p['chance']:.0f}%, initialization "
                 f"{100 * init['class_purity']['lowercase vowel']['same_class_share']:.0f}%).")
  case = tr["case"]
  if case and "lower_to_upper" in case:
    d = case["lower_to_upper"]
    words.append(f"The case analogy 'A' - 'a' + 'b' -> 'B' is solved top-1 in "
                 f"{100 * d['top1']:.0f}% of {d['analogies']} letter pairs (chance "
                 f"{100 * d['chance_top1']:.1f}%, initialization "
                 f"{100 * init['case']['lower_to_upper']['top1']:.1f}%, nearest-to-'b' baseline "
                 f"{100 * d['only_c_baseline']:.0f}%); case offsets have mean pairwise cosine "
                 f"{case['offset_mean_cosine']:.2f}.")
  return " ".join(words)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Quiet the checkpoint library's INFO lines.
  start = time.time()
  common.reject_unused_flags(UNUSED_FLAGS, "embeddings.py")
  workdir = common.WORKDIR.value
  if not workdir:
    raise UsageError("--workdir is required: the directory of a training run")
  if not files.path(workdir).is_dir():
    raise UsageError(f"--workdir={workdir}: no such directory")
  k = NUM_NEIGHBORS.value
  trained = checkpoint.load_trained(workdir)
  emb_VxD = np.asarray(trained.params["token_embed"]["embedding"], np.float32)
  v, d = emb_VxD.shape
  if not 1 <= k <= v - 4:
    raise UsageError(f"--num_neighbors={k}: must be in [1, {v - 4}] for a vocabulary of {v}")
  if min(v, d) < 2:
    raise UsageError(f"the embedding is {v} x {d}: needs at least 2 tokens and 2 dimensions")
  out_dir = OUTPUT_DIR.value or os.path.join(workdir, "embeddings")
  if common.is_primary():  # Only process 0 writes.
    try:
      files.path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise UsageError(f"--output_dir={out_dir}: cannot create ({e.strerror or e})") from None
    try:
      files.check_writable(out_dir)
    except OSError:
      raise UsageError(f"--output_dir={out_dir}: not writable") from None

  texts = [trained.tokenizer.decode(np.asarray([i])) for i in range(v)]
  results = {
      "experiment": "embeddings", "workdir": workdir, "step": trained.step, "shape": [v, d],
      "tied": bool(trained.model_config.tie_embeddings), "seed": int(trained.config.seed),
      "num_neighbors": k, "texts": texts, "labels": [display_label(t) for t in texts],
      "classes": [token_class(t) for t in texts],
      "trained": analyze(emb_VxD, texts, k),
      "initialization": analyze(initial_embedding(trained), texts, k),
      "cosine_view": cosine_view(emb_VxD, texts),
      "analogy_examples": analogy_examples(emb_VxD, texts, k),
      "how_measured": {
          "similarity": "cosine of embedding rows",
          "class_purity": "mean over a class's tokens of the share of their k nearest tokens (by "
                          "cosine, self excluded) in the same class; chance (n-1)/(V-1)",
          "analogy": "3CosAdd on unit rows (llm_math.analysis.embeddings.analogy), a, b, c excluded; all "
                     "ordered pairs of distinct letters present in both cases",
          "only_c_baseline": "the nearest token to c alone (a, b, c excluded)",
          "effective_rank": "exp of the entropy of s_i^2 / sum s^2, s = singular values of the "
                            "mean-centred matrix",
          "initialization": "the token embedding re-initialized with the run's model, "
                            "initializer and seed",
      },
      "config": trained.config.to_dict(),
  }
  results["summary"] = summary(results)
  if common.is_primary():
    common.write_results(out_dir, results, markdown(results))
    figures = plot_embeddings.plot_all(results, out_dir)
    print(markdown(results))
    print(f"wrote {os.path.join(out_dir, 'results.json')}, results.md, {', '.join(figures)} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
  common.run(main)
