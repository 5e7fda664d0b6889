"""Figures of the embeddings study (`llm_math.studies.embeddings`) from its results.json.

Draws embedding_spectrum.png (singular values of the centred embedding and the cumulative variance,
trained vs initialization), embedding_pca.png (tokens on the top two principal axes, by class) and
embedding_cosine.png (cosine similarity of the trained embeddings, tokens grouped by class).
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from llm_math.figures import draw_each  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import save_figure  # pylint: disable=g-import-not-at-top,wrong-import-position

_CLASS_COLORS = {
    "lowercase vowel": "tab:red", "lowercase consonant": "tab:blue",
    "uppercase vowel": "tab:orange", "uppercase consonant": "tab:cyan", "digit": "tab:purple",
    "punctuation": "tab:green", "whitespace": "black", "other": "tab:gray",
}
_MAX_LABELS = 150  # label at most this many points of the PCA scatter


def _title(results: dict) -> str:
  v, d = results["shape"]
  tied = ", tied with the output layer" if results["tied"] else ""
  return f"token embedding E ({v} x {d}{tied}) of {results['workdir']}, step {results['step']}"


def plot_spectrum(results: dict, path: str):
  """Singular values of the centred E (log scale) and the cumulative variance share, trained vs
  initialization."""
  fig, (ax_s, ax_c) = plt.subplots(1, 2, figsize=(12, 4.6))
  styles = (("trained", "tab:blue", "-"), ("initialization", "tab:gray", "--"))
  for name, color, style in styles:
    spec = results[name]["spectrum"]
    s = np.asarray(spec["singular_values"], np.float64)
    keep = s > 1e-6 * s[0]  # centring leaves one exact zero when V <= D
    i = np.arange(1, len(s) + 1)
    rank = spec["variance_effective_rank"]
    rank = np.nan if rank is None else rank  # null in results.json: NaN
    label = f"{name} (variance effective rank {rank:.1f})"
    ax_s.plot(i[keep], s[keep], style, color=color, marker="o", ms=2.5, lw=1.3, label=label)
    share = np.cumsum(s ** 2) / np.sum(s ** 2)
    ax_c.plot(i, share, style, color=color, lw=1.5, label=label)
    ax_c.axvline(rank, color=color, ls=":", lw=1)
  n = len(results["trained"]["spectrum"]["singular_values"])
  ax_c.plot([0, n], [0, 1], color="black", ls=":", lw=1, label="equal variances (isotropic)")
  ax_c.axhline(0.9, color="tab:red", ls=":", lw=1, label="90% of the variance")
  ax_s.set(xlabel="index i (descending)", ylabel="singular value s_i of E - mean(E) (log scale)",
           yscale="log", title="Singular values of the centred embedding")
  ax_c.set(xlabel="number of principal axes i",
           ylabel="share of the variance sum_{j<=i} s_j^2 / sum s^2", ylim=(0, 1.02), xlim=(0, n),
           title="Cumulative variance (dotted verticals: variance effective ranks)")
  for ax in (ax_s, ax_c):
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.suptitle(_title(results), fontsize=10)
  save_figure(fig, path)


def _case_pairs(results: dict) -> list[tuple[int, int]]:
  """(lowercase id, uppercase id) of the letters the study found in both cases."""
  index = {t: i for i, t in enumerate(results["texts"])}
  case = results["trained"]["case"]
  return [(index[c], index[c.upper()]) for c in (case["letters"] if case else "")]


def plot_pca(results: dict, path: str):
  """Tokens on the top two principal axes, labelled and coloured by class; case pairs joined."""
  fig, axes = plt.subplots(1, 2, figsize=(14, 6.4))
  labels, classes = results["labels"], results["classes"]
  for ax, name in zip(axes, ("trained", "initialization")):
    spec = results[name]["spectrum"]
    xy = np.asarray(spec["pca_coords"], np.float64)
    for lo, up in _case_pairs(results):
      ax.plot(xy[[lo, up], 0], xy[[lo, up], 1], color="0.75", lw=0.7, zorder=1)
    for cls in dict.fromkeys(classes):
      members = [i for i, c in enumerate(classes) if c == cls]
      ax.scatter(xy[members, 0], xy[members, 1], s=14, color=_CLASS_COLORS[cls], label=cls,
                 zorder=2)
    if len(labels) <= _MAX_LABELS:
      for i, text in enumerate(labels):
        ax.annotate(text, xy[i], xytext=(3, 2), textcoords="offset points", fontsize=8,
                    color=_CLASS_COLORS[classes[i]], zorder=3)
    ratio = np.asarray(spec["pca_variance_ratio"], np.float64)
    ax.set(xlabel=f"principal axis 1 ({100 * ratio[0]:.1f}% of the variance; embedding units)",
           ylabel=f"principal axis 2 ({100 * ratio[1]:.1f}% of the variance; embedding units)",
           title=f"{name}: 2-D PCA" + (" (grey lines join a letter's two cases)"
                                       if _case_pairs(results) else ""))
    ax.axhline(0, color="0.85", lw=0.8, zorder=0)
    ax.axvline(0, color="0.85", lw=0.8, zorder=0)
    ax.grid(alpha=0.2)
  axes[0].legend(fontsize=8, loc="best")
  fig.suptitle(_title(results), fontsize=10)
  save_figure(fig, path)


def plot_cosine(results: dict, path: str):
  """Cosine similarity between tokens ordered by class (trained), class blocks outlined."""
  view = results["cosine_view"]
  order, cos = view["order"], np.asarray(view["cosine"], np.float64)
  labels = [results["labels"][i] for i in order]
  classes = [results["classes"][i] for i in order]
  n = len(order)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * n + 2.5), max(5.2, 0.16 * n + 1.5)))
  masked = np.where(np.eye(n, dtype=bool), np.nan, cos)  # self-similarity 1 carries no information
  lim = float(np.nanmax(np.abs(masked))) if n > 1 else 1.0
  image = ax.imshow(masked, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="cosine similarity (diagonal omitted)")
  ax.set_xticks(range(n), labels, fontsize=6, rotation=90)
  ax.set_yticks(range(n), labels, fontsize=6)
  bounds = [i for i in range(1, n) if classes[i] != classes[i - 1]]
  for b in bounds:
    ax.axhline(b - 0.5, color="black", lw=0.6)
    ax.axvline(b - 0.5, color="black", lw=0.6)
  ax.set(xlabel="token (grouped by class)", ylabel="token (grouped by class)",
         title="Cosine similarity of trained embeddings\n" + " | ".join(dict.fromkeys(classes)))
  ax.title.set_fontsize(9)
  save_figure(fig, path)


FIGURES = {"embedding_spectrum.png": plot_spectrum, "embedding_pca.png": plot_pca,
           "embedding_cosine.png": plot_cosine}


def draw(results: dict, workdir) -> list[str]:
  """Draws every figure into `workdir`; returns their file names."""
  return draw_each(FIGURES, results, workdir)
