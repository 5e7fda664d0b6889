"""Geometry of a trained model's token embeddings: neighbours, analogies, spectrum and 2-D PCA.

Reads the token embedding matrix E [V, D] of a training run's latest checkpoint (with tied
embeddings it is also the output layer) and the same matrix at initialization (the run's initializer
and seed, the reference every number is compared with: it carries no learned structure). Similarity
is cosine; the mathematics is `llm_math.analysis.embeddings`.

  * nearest neighbours of every token; for each token class (CLASSES: lowercase vowels, uppercase
    consonants, punctuation, ...) the share of a token's k nearest neighbours in its own class,
    against chance (n_class - 1) / (V - 1);
  * case analogies (3CosAdd): 'A' - 'a' + 'b' -> 'B'? over all ordered pairs of letters that occur
    in both cases, top-1 and top-k accuracy, against the "only c" baseline (the nearest neighbour of
    'b' itself) and the initialization; and how parallel the case offsets E['A'] - E['a'] are;
  * the singular values of the centred matrix, its variance effective rank exp(H(p)) with
    p_i = s_i^2 / sum s^2, and the projection on the top two principal axes.

Unlike the studies that train, this one reads a finished run: `load_run(workdir)`, `check(trained,
num_neighbors)`, then `run(trained, workdir, num_neighbors, log) -> results`; its results go to a
directory of their own (`prepare_output_dir`), so the run's own results stay untouched.
"""

import numpy as np

from llm_math import checkpoint
from llm_math import files
from llm_math import studies
from llm_math import train as train_lib
from llm_math.analysis import embeddings as emb_lib
from llm_math.errors import UsageError

CLASSES = ("lowercase vowel", "lowercase consonant", "uppercase vowel", "uppercase consonant",
           "digit", "punctuation", "whitespace", "other")


def token_class(text: str) -> str:
  """The class (one of CLASSES) of a token by the text it decodes to (single characters only; else
  'other')."""
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


def case_pairs(texts: list[str]) -> list[tuple[int, int, str]]:
  """(lowercase id, uppercase id, letter) for every ASCII letter present in both cases."""
  index = {t: i for i, t in enumerate(texts)}
  return [(index[c], index[c.upper()], c) for c in "abcdefghijklmnopqrstuvwxyz"
          if c in index and c.upper() in index]


def load_run(workdir: str | None) -> checkpoint.TrainedModel:
  """The training run in `workdir` (--workdir), latest checkpoint; a one-line error without one."""
  if not workdir:
    raise UsageError("--workdir is required: the directory of a training run")
  if not files.path(workdir).is_dir():
    raise UsageError(f"--workdir={workdir}: no such directory")
  return checkpoint.load_trained(workdir)


def token_embedding(trained: checkpoint.TrainedModel) -> np.ndarray:
  """The trained token embedding E `[V, D]`, float32."""
  return np.asarray(trained.params["token_embed"]["embedding"], np.float32)


def initial_embedding(trained: checkpoint.TrainedModel) -> np.ndarray:
  """The token embedding `[V, D]` the run started from: its model, initializer and seed, the params
  `train.fit` initializes at step 0 (`train.initial_params`)."""
  init = train_lib.lm_init(trained.model, trained.config.seq_len)
  return np.asarray(train_lib.initial_params(init, trained.config.seed)["token_embed"]["embedding"])


def check(trained: checkpoint.TrainedModel, num_neighbors: int) -> None:
  """A one-line UsageError unless --num_neighbors leaves room for the analogies (k <= V - 4: a, b, c
  excluded) and E has at least 2 rows and 2 columns (a 2-D PCA)."""
  v, d = trained.params["token_embed"]["embedding"].shape
  if not 1 <= num_neighbors <= v - 4:
    raise UsageError(f"--num_neighbors={num_neighbors}: must be in [1, {v - 4}] for a vocabulary "
                     f"of {v}")
  if min(v, d) < 2:
    raise UsageError(f"the embedding is {v} x {d}: needs at least 2 tokens and 2 dimensions")


def prepare_output_dir(output_dir: str) -> str:
  """Creates --output_dir on process 0 and checks that it is writable (a one-line error if not)."""
  if studies.is_primary():  # Only process 0 writes.
    try:
      files.path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise UsageError(f"--output_dir={output_dir}: cannot create ({e.strerror or e})") from None
    try:
      files.check_writable(output_dir)
    except OSError:
      raise UsageError(f"--output_dir={output_dir}: not writable") from None
  return output_dir


def analyze(emb_VxD: np.ndarray, texts: list[str], k: int) -> dict:
  """Every statistic of one embedding matrix `[V, D]` whose rows decode to `texts` `[V]`."""
  classes = [token_class(t) for t in texts]
  idx, sims = emb_lib.all_nearest_neighbors(emb_VxD, k)
  pairs = case_pairs(texts)
  case = None
  if pairs:
    case = {"letters": "".join(c for _, _, c in pairs),
            **emb_lib.case_analysis(emb_VxD, [(lo, up) for lo, up, _ in pairs], k)}
  return {
      "norm_mean": float(np.linalg.norm(emb_VxD, axis=1).mean()),
      "neighbors": {"index": idx.tolist(), "cosine": sims.tolist()},
      "class_purity": emb_lib.class_purity(idx, classes, CLASSES),
      "case": case,
      "spectrum": emb_lib.spectrum(emb_VxD),
  }


def cosine_view(emb_VxD: np.ndarray, texts: list[str], max_tokens: int = 96) -> dict:
  """The cosine matrix `[n, n]` of (at most max_tokens) tokens ordered by class, for the heatmap:
  {order: their ids [n], cosine: rounded to 4 decimals}."""
  classes = [token_class(t) for t in texts]
  order = sorted(range(len(texts)),
                 key=lambda i: (CLASSES.index(classes[i]), texts[i].lower(), texts[i]))
  order = order[:max_tokens]
  cos = np.asarray(emb_lib.cosine_similarity_matrix(emb_VxD))[np.ix_(order, order)]
  return {"order": order, "cosine": np.round(cos, 4).tolist()}


def analogy_examples(emb_VxD: np.ndarray, texts: list[str], k: int) -> list[dict]:
  """A few case analogies with their top-k answers [[text, cosine]], for the table."""
  index = {t: i for i, t in enumerate(texts)}
  out = []
  for x, y in (("a", "b"), ("a", "e"), ("t", "h"), ("e", "o"), ("s", "m"), ("r", "w")):
    if all(c in index for c in (x, x.upper(), y, y.upper())):
      idx, sims = emb_lib.analogy(emb_VxD, index[x.upper()], index[x], index[y], k=k)
      out.append({"query": f"{x.upper()} - {x} + {y}", "want": y.upper(),
                  "answers": [[texts[int(i)], float(s)] for i, s in zip(idx, sims)]})
  return out


def run(trained: checkpoint.TrainedModel, workdir: str, num_neighbors: int, log=print) -> dict:
  """The statistics of the trained and the initial token embedding of the run `trained` (loaded from
  `workdir` by `load_run`, checked by `check`); the results (see the module docstring)."""
  k = num_neighbors
  emb_VxD = token_embedding(trained)
  v, d = emb_VxD.shape
  log(f"token embedding E: {v} x {d} of {workdir} at step {trained.step}")
  texts = [trained.tokenizer.decode(np.asarray([i])) for i in range(v)]
  return {
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
          "analogy": "3CosAdd on unit rows (llm_math.analysis.embeddings.analogy), a, b, c "
                     "excluded; all ordered pairs of distinct letters present in both cases",
          "only_c_baseline": "the nearest token to c alone (a, b, c excluded)",
          "variance_effective_rank": "exp of the entropy of s_i^2 / sum s^2, s = singular values "
                                     "of the mean-centred matrix",
          "initialization": "the token embedding re-initialized with the run's model, "
                            "initializer and seed",
      },
      "config": trained.config.to_dict(),
  }
