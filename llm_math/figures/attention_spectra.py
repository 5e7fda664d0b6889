"""Figures of the attention-spectra study (`llm_math.studies.attention_spectra`), from its
results.json and the spectra.npz it writes next to it (numpy and matplotlib, no JAX):

  eigenvalues.png      eigenvalues in the complex plane per layer (bidirectional) with the unit
                       circle; causal eigenvalues = the diagonal A_tt against position t
  singular_values.png  singular value decay per layer, initialization and end of training
  stationary.png       stationary distributions of the bidirectional layers against 1/T
  entropy_gap.png      normalized entropy and spectral gap against layer and against step
  rank_collapse.png    relative residual against depth, four architectures (log y)
  sink_mass.png        attention on position 0 per layer and head (heatmaps)
  attention_maps.png   the most concentrated head of every layer, each run
  entropy_lr.png       entropy over training at the normal and the high learning rate, with the
                       Zhai et al. bound, sigma = ||W_Q W_K^T|| / sqrt(d_k) and the loss
  dynamics.png         normalized entropy, effective rank, spectral gap and sink mass per layer
                       against the step, from the log-spaced checkpoints of the causal runs
                       (normal and high learning rate); not drawn for runs without them
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import colors  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top,wrong-import-position

from llm_math import files  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.analysis import spectra  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import draw_each  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import save_figure  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.reports.attention_spectra import uniform_causal_entropy  # pylint: disable=g-import-not-at-top,wrong-import-position

RUN_LABELS = {"causal": "causal", "causal_high_lr": "causal, high lr",
              "bidirectional": "bidirectional (masked LM)"}
ARCH_STYLES = {"pure attention": ("tab:red", "o", "-"), "attention + skip": ("tab:blue", "s", "-"),
               "attention + MLP": ("tab:orange", "^", "--"), "full block": ("tab:green", "D", "--")}
FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def _layer_colors(n: int):
  cmap = plt.get_cmap("viridis")
  return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def _step_axis(ax, last_step: int):
  ax.set_xscale("symlog", linthresh=10)
  ax.set_xlim(0, last_step * 1.15)
  ax.set_xlabel("training step (symlog scale: linear below 10)")


def _style_legend(ax, num_layers: int, styles: dict, extra=(), **kwargs):
  """A legend of colors = layers and line styles = runs, plus `extra` (handle, label) pairs."""
  handles = [Line2D([], [], color=c, marker="o", ms=3, label=f"layer {l + 1}")
             for l, c in enumerate(_layer_colors(num_layers))]
  handles += [Line2D([], [], color="black", ls=ls, label=label) for label, ls in styles.items()]
  handles += [h for h in extra]
  ax.legend(handles=handles, fontsize=7, **kwargs)


def _save(fig, path: str):
  save_figure(fig, path, dpi=120, tight=False)


def _spectra_arrays(path: str) -> dict:
  """spectra.npz of the study, next to the figure `path`: the window-0 arrays of every run. A study
  over several seeds (--seeds) keeps one per seed: the arrays drawn are the first seed's."""
  here = files.path(os.path.dirname(path))
  if not (here / "spectra.npz").exists() and (here / "seeds").is_dir():
    first = min((p for p in (here / "seeds").iterdir() if (p / "spectra.npz").exists()),
                key=lambda p: int(p.name.rsplit("_", 1)[-1]))
    return files.read_npz(first / "spectra.npz")
  return files.read_npz(here / "spectra.npz")


def _uniform_causal_sink_mass(t: int) -> float:
  """Mean attention on position 0 over rows 1..T-1 of uniform causal attention: mean 1 / (t + 1)."""
  return float(np.mean(1.0 / np.arange(2, t + 1)))


def _suptitle(fig, results: dict, text: str):
  fig.suptitle(f"{text}\n{results['data']}; {results['protocol']['analysis_windows']} validation "
               f"windows of {results['config']['seq_len']} tokens", fontsize=10)


# ----------------------------------------------------------------------------------------------


def plot_eigenvalues(results: dict, path: str):
  """Row 1: bidirectional eigenvalues in the complex plane; row 2: causal diagonal A_tt vs t."""
  arrays = _spectra_arrays(path)
  lam_bidi = arrays["bidirectional.eigenvalues"][-1]  # [L, H, T]
  lam_causal = arrays["causal.eigenvalues"][-1].real
  num_layers, num_heads, t = lam_bidi.shape
  step_b = int(arrays["bidirectional.steps"][-1])
  step_c = int(arrays["causal.steps"][-1])
  fig, axes = plt.subplots(2, num_layers, figsize=(3.3 * num_layers, 6.8), squeeze=False)
  theta = np.linspace(0, 2 * np.pi, 400)
  head_colors = plt.get_cmap("tab10").colors
  lam_init = arrays["bidirectional.eigenvalues"][0]
  for l in range(num_layers):
    ax = axes[0, l]
    ax.plot(np.cos(theta), np.sin(theta), color="black", lw=0.8, label="unit circle")
    ax.scatter(lam_init[l].real.ravel(), lam_init[l].imag.ravel(), s=10, color="lightgray",
               label="all heads, init", zorder=1)
    for h in range(num_heads):
      ax.scatter(lam_bidi[l, h].real, lam_bidi[l, h].imag, s=9, alpha=0.75,
                 color=head_colors[h % 10], label=f"head {h + 1}", zorder=2)
    ax.axhline(0, color="gray", lw=0.4)
    ax.axvline(0, color="gray", lw=0.4)
    ax.set(xlim=(-1.1, 1.1), ylim=(-1.1, 1.1), aspect="equal", xlabel="Re lambda",
           title=f"bidirectional, layer {l + 1}")
    if l == 0:
      ax.set_ylabel("Im lambda")
    ax = axes[1, l]
    for h in range(num_heads):
      ax.plot(np.arange(t), lam_causal[l, h], ".", ms=3.5, color=head_colors[h % 10],
              label=f"head {h + 1}")
    ax.plot(np.arange(t), 1.0 / np.arange(1, t + 1), "k:", lw=1,
            label="uniform attention: 1/(t+1)")
    ax.set(ylim=(-0.03, 1.03), xlabel="position t", title=f"causal, layer {l + 1}")
    if l == 0:
      ax.set_ylabel("eigenvalue = diagonal A_tt")
  axes[0, 0].legend(fontsize=6, loc="lower left")
  axes[1, 0].legend(fontsize=6, loc="upper right")
  for ax in axes.ravel():
    ax.grid(alpha=0.3)
  _suptitle(fig, results, f"Eigenvalues of attention, validation window 0. Top: bidirectional "
            f"(masked LM) at step {step_b}, gray: initialization; |lambda| <= 1, the spectral "
            f"radius.\nBottom: causal at step {step_c}: lower-triangular, so the eigenvalues are "
            "exactly the diagonal A_tt (real, in [0, 1], A_00 = 1)")
  fig.tight_layout()
  _save(fig, path)


def plot_singular_values(results: dict, path: str):
  arrays = _spectra_arrays(path)
  runs = [r for r in ("causal", "bidirectional", "causal_high_lr") if f"{r}.singular_values" in arrays]
  fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4.4), squeeze=False)
  for ax, run in zip(axes[0], runs):
    sv = arrays[f"{run}.singular_values"]  # [S, L, H, T]
    steps = arrays[f"{run}.steps"]
    num_layers, t = sv.shape[1], sv.shape[-1]
    i = np.arange(1, t + 1)
    for l, color in enumerate(_layer_colors(num_layers)):
      ax.plot(i, sv[0, l].mean(axis=0), ":", color=color, lw=1.2)
      ax.plot(i, sv[-1, l].mean(axis=0), "-", color=color, lw=1.6,
              label=f"layer {l + 1}, step {int(steps[-1])}")
    ax.plot([], [], "k:", label=f"dotted: step {int(steps[0])} (init)")
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="1 (an identity / permutation)")
    resolution = FLOAT32_UNIT_ROUNDOFF * np.sqrt(t)
    ax.axhspan(1e-12, resolution, color="gray", alpha=0.15,
               label="below float32 rounding of A (2^-24 sqrt(T))")
    ax.set(yscale="log", ylim=(1e-12, 3 * sv.max()), xlabel="index i (decreasing order)",
           ylabel="singular value sigma_i (mean over heads)", title=RUN_LABELS[run])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  _suptitle(fig, results, "Singular value decay of attention matrices (window 0; log scale, "
            "clipped at 1e-12): sigma_1 >= 1 for a stochastic matrix; uniform attention is "
            "close to rank one")
  fig.tight_layout()
  _save(fig, path)


def plot_stationary(results: dict, path: str):
  arrays = _spectra_arrays(path)
  pi = arrays["bidirectional.stationary_distribution"][-1]  # [L, H, T]
  num_layers, num_heads, t = pi.shape
  fig, axes = plt.subplots(1, num_layers, figsize=(3.4 * num_layers, 3.6), squeeze=False,
                           sharey=True)
  head_colors = plt.get_cmap("tab10").colors
  for l, ax in enumerate(axes[0]):
    for h in range(num_heads):
      ax.plot(np.arange(t), pi[l, h], lw=1.2, color=head_colors[h % 10], label=f"head {h + 1}")
    ax.axhline(1.0 / t, color="black", ls=":", lw=1, label=f"uniform 1/T = {1 / t:.3g}")
    ax.set(yscale="log", xlabel="position t", title=f"layer {l + 1}")
    ax.grid(alpha=0.3, which="both")
  axes[0, 0].set_ylabel("stationary probability pi_t (log)")
  axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  _suptitle(fig, results, f"Stationary distributions pi A = pi of bidirectional attention, step "
            f"{int(arrays['bidirectional.steps'][-1])} (causal attention: pi = e_0 exactly)")
  fig.tight_layout()
  _save(fig, path)


def plot_entropy_gap(results: dict, path: str):
  runs = results["runs"]
  t = results["config"]["seq_len"]
  fig, axes = plt.subplots(2, 2, figsize=(13, 9))
  run_colors = {"causal": "tab:blue", "causal_high_lr": "tab:red", "bidirectional": "tab:purple"}
  for key, ax in (("mean_normalized_row_entropy", axes[0, 0]), ("spectral_gap", axes[0, 1])):
    for name, run in runs.items():
      snap = run["snapshots"][-1]
      values = np.asarray(snap[key])  # [L, H]
      layers = np.arange(1, len(values) + 1)
      mean = values.mean(axis=1)
      ax.errorbar(layers, mean, yerr=[mean - values.min(1), values.max(1) - mean],
                  color=run_colors[name], marker="s", ms=4, capsize=3,
                  label=f"{RUN_LABELS[name]}, step {snap['step']}")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
  axes[0, 0].axhline(1.0, color="black", ls="--", lw=0.8,
                     label="uniform attention (every run at step 0)")
  axes[0, 1].axhline(0.5, color="black", ls="--", lw=0.8,
                     label="uniform causal attention: 1 - 1/2 (causal runs at step 0)")
  axes[0, 1].axhline(1.0, color="gray", ls="-.", lw=0.8,
                     label="uniform bidirectional attention: 1 (bidirectional at step 0)")
  axes[0, 0].set(ylabel="normalized row entropy H_t / log n_t", ylim=(-0.02, 1.35),
                 title="Entropy against depth (mean over heads; bars: min-max)")
  axes[0, 1].set(ylabel="spectral gap 1 - |lambda_2|", ylim=(-0.02, 1.35),
                 title="Spectral gap against depth (causal: 1 - max_{t>=1} A_tt)")
  styles = {"causal": "-", "bidirectional": "--"}
  for key, ax in (("mean_normalized_row_entropy", axes[1, 0]), ("spectral_gap", axes[1, 1])):
    for name, ls in styles.items():
      run = runs[name]
      steps = [s["step"] for s in run["snapshots"]]
      values = np.asarray([s[key] for s in run["snapshots"]]).mean(axis=2)  # [S, L]
      for l, color in enumerate(_layer_colors(values.shape[1])):
        ax.plot(steps, values[:, l], ls=ls, marker="o", ms=3, color=color)
    _step_axis(ax, steps[-1])
    _style_legend(ax, values.shape[1], {RUN_LABELS[n]: ls for n, ls in styles.items()},
                  loc="lower left")
  axes[1, 0].set(ylabel="normalized row entropy (mean over heads)",
                 title="Entropy over training")
  axes[1, 1].set(ylabel="spectral gap (mean over heads)", title="Spectral gap over training")
  for ax in axes[0]:
    ax.legend(fontsize=7, loc="upper center", ncol=2)
  for ax in axes.ravel():
    ax.grid(alpha=0.3)
  _suptitle(fig, results, f"Attention entropy (n_t = positions row t may attend to: t + 1 "
            f"causal, {t} bidirectional) and spectral gap")
  fig.tight_layout()
  _save(fig, path)


def plot_rank_collapse(results: dict, path: str):
  rc = results["rank_collapse"]
  arch = rc["architectures"]
  depth = rc["num_layers"]
  layers = np.arange(depth + 1)
  trained = any(r["trained"] for r in arch.values())
  panels = [("init", "causal, initialization")]
  if trained:
    panels.append(("trained", f"causal, after {rc['num_steps']} training steps"))
  panels.append(("init_bidirectional", "same initial weights, no causal mask"))
  fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.8), sharey=True,
                           squeeze=False)
  values = [v for r in arch.values() for key, _ in panels if r[key] for v in r[key]["fro_min"]
            if v]
  floor = min(min(values) if values else 1e-8, FLOAT32_UNIT_ROUNDOFF) / 10
  exact_zero = False
  for ax, (key, title) in zip(axes[0], panels):
    annotated = 0
    for name, r in arch.items():
      profile = r[key]
      if not profile:
        continue
      color, marker, ls = ARCH_STYLES[name]
      mean = np.array([np.nan if v is None else v for v in profile["fro"]])
      lo = np.array([np.nan if v is None else v for v in profile["fro_min"]])
      hi = np.array([np.nan if v is None else v for v in profile["fro_max"]])
      zero = mean == 0
      exact_zero |= bool(zero.any())
      shown = np.where(zero, floor, mean)
      ax.plot(layers, shown, color=color, marker=marker, ms=4, ls=ls, label=name)
      if zero.any():
        ax.annotate(f"{name}: exactly 0 from layer {int(np.argmax(zero))}",
                    (depth, floor), xytext=(0, 5 + 9 * annotated),
                    textcoords="offset points", ha="right", fontsize=7, color=color)
        annotated += 1
      ax.fill_between(layers, np.where(lo > 0, lo, floor), np.where(hi > 0, hi, floor),
                      color=color, alpha=0.12)
    if key == "init":
      ax.plot(layers, np.asarray(rc["uniform_causal_reference"], float), "k--", lw=1,
              label="uniform causal attention U^l X (theory, ~2^-l)")
    ax.axhline(FLOAT32_UNIT_ROUNDOFF, color="gray", ls=":", lw=1,
               label="float32 unit roundoff 2^-24")
    ax.set(yscale="log", xlabel="layer l (0 = embeddings)", title=title, ylim=(floor / 2, 2))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower left")
  axes[0, 0].set_ylabel("relative residual ||X - 1 x^T||_F / ||X||_F (log)")
  note = (f"; points at {floor:.0e}: exactly 0 (all rows identical in float32)" if exact_zero
          else "")
  if exact_zero:
    for ax in axes[0]:
      ax.axhspan(floor / 2, floor * 1.5, color="gray", alpha=0.1)
  fig.suptitle(f"Rank collapse with depth: {depth}-layer models, {rc['inputs']}; mean over "
               f"sequences, band: min-max{note}\n{results['data']}", fontsize=10)
  fig.tight_layout()
  _save(fig, path)


def plot_sink_mass(results: dict, path: str):
  runs = results["runs"]
  t = results["config"]["seq_len"]
  fig, axes = plt.subplots(1, len(runs), figsize=(4.4 * len(runs), 3.9), squeeze=False)
  for ax, (name, run) in zip(axes[0], runs.items()):
    snap = run["snapshots"][-1]
    mass = np.asarray(snap["sink_mass"])  # [L, H]
    uniform = _uniform_causal_sink_mass(t) if run["causal"] else 1.0 / t
    im = ax.imshow(mass, cmap="magma", vmin=0, vmax=1, aspect="auto")
    for (l, h), v in np.ndenumerate(mass):
      ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=8,
              color="white" if v < 0.6 else "black")
    ax.set(xticks=range(mass.shape[1]), xticklabels=range(1, mass.shape[1] + 1),
           yticks=range(mass.shape[0]), yticklabels=range(1, mass.shape[0] + 1),
           xlabel="head", ylabel="layer",
           title=f"{RUN_LABELS[name]}, step {snap['step']}\n(uniform attention: {uniform:.3f})")
    fig.colorbar(im, ax=ax, label="mean attention on position 0")
  _suptitle(fig, results, "Attention sink: mean weight on position 0 per head (causal: rows "
            "1..T-1)")
  fig.tight_layout()
  _save(fig, path)


def plot_attention_maps(results: dict, path: str):
  arrays = _spectra_arrays(path)
  runs = [r for r in ("causal", "causal_high_lr", "bidirectional")
          if f"{r}.attention_final" in arrays]
  num_layers = arrays[f"{runs[0]}.attention_final"].shape[0]
  fig, axes = plt.subplots(len(runs), num_layers, figsize=(2.9 * num_layers + 1, 3.0 * len(runs)),
                           squeeze=False, layout="constrained")
  norm = colors.PowerNorm(gamma=0.4, vmin=0, vmax=1)
  for row, run in enumerate(runs):
    a = arrays[f"{run}.attention_final"]  # [L, H, T, T]
    entropy = np.asarray(results["runs"][run]["snapshots"][-1]["mean_row_entropy"])  # [L, H]
    for l in range(num_layers):
      h = int(np.argmin(entropy[l]))
      ax = axes[row, l]
      im = ax.imshow(a[l, h], cmap="viridis", norm=norm, interpolation="nearest")
      ax.set_title(f"{RUN_LABELS[run]}\nlayer {l + 1}, head {h + 1} "
                   f"(H = {entropy[l, h]:.2f} nats)", fontsize=8)
      ax.set_xlabel("key position s", fontsize=8)
      if l == 0:
        ax.set_ylabel("query position t", fontsize=8)
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6,
               label="attention weight A_ts (color ~ A_ts^0.4)")
  fig.suptitle("Lowest-entropy head of every layer, end of training, validation window 0\n"
               + results["data"], fontsize=10)
  _save(fig, path)


def plot_entropy_lr(results: dict, path: str):
  """Normal against high learning rate over training: entropy (with the Zhai et al. bound),
  sigma = ||W_Q W_K^T||_2 / sqrt(d_k), and the loss; colors = layers, solid / dashed = runs."""
  runs = results["runs"]
  normal, high = runs["causal"], runs["causal_high_lr"]
  t = results["config"]["seq_len"]
  fig, axes = plt.subplots(1, 3, figsize=(17, 5.6))
  num_layers = len(normal["snapshots"][0]["mean_row_entropy"])
  labels, last_step = {}, max(normal["num_steps"], high["num_steps"])
  extra = []
  for key, run, ls in (("normal", normal, "-"), ("high", high, "--")):
    labels[key] = (f"lr {run['learning_rate']:g}, warmup {run['warmup_steps']}"
                   + (f", diverged at step {run['diverged_at']}" if run["diverged_at"] else ""))
    steps = [s["step"] for s in run["snapshots"]]
    h = np.asarray([s["mean_row_entropy"] for s in run["snapshots"]], float).mean(axis=2)  # [S, L]
    sigma = np.asarray([s["qk_norm"] for s in run["snapshots"]], float).max(axis=2)  # [S, L]
    for l, color in enumerate(_layer_colors(num_layers)):
      axes[0].plot(steps, h[:, l], ls=ls, marker="o", ms=3, color=color)
      axes[1].plot(steps, sigma[:, l], ls=ls, marker="o", ms=3, color=color)
    if run["snapshots"][0]["zhai_bound"] is not None:
      bound = np.asarray([s["zhai_bound"] for s in run["snapshots"]], float).mean(axis=(1, 2))
      extra += axes[0].plot(steps, bound, ls=ls, color="tab:red", lw=1.2, marker="x", ms=4,
                            label=f"Zhai et al. lower bound (mean over layers, heads), "
                            f"{labels[key]}")
    curve = run["train_curve"]
    color = "tab:blue" if key == "normal" else "tab:red"
    axes[2].plot(curve["step"], curve["loss"], ls=ls, color=color, lw=0.8, alpha=0.5,
                 label=f"train loss (mean since the last log), {labels[key]}")
    axes[2].plot(steps, np.asarray([s["val_nll"] for s in run["snapshots"]], float), ls=ls,
                 marker="o", ms=3, color=color, label=f"validation NLL, {labels[key]}")
  uniform = uniform_causal_entropy(t)
  extra.append(axes[0].axhline(uniform, color="gray", ls=":", lw=1,
                               label=f"uniform causal attention: mean_t log(t+1) = "
                               f"{uniform:.2f} nats"))
  axes[0].set(ylabel="mean row entropy (nats; mean over heads)",
              title="Attention entropy per layer")
  axes[1].set(yscale="log", ylabel="sigma, largest head of the layer (log scale)",
              title="Query-key norm sigma = ||W_Q W_K^T||_2 / sqrt(d_k)")
  if results.get("entropy_rate_nats") is not None:
    axes[2].axhline(results["entropy_rate_nats"], color="black", lw=1,
                    label=f"entropy rate of the source ({results['entropy_rate_nats']:.3f})")
  axes[2].set(ylabel="NLL (nats / token)", title="Loss")
  axes[2].legend(fontsize=7, loc="lower left")
  for ax in axes:
    _step_axis(ax, last_step)
    ax.grid(alpha=0.3, which="both")
  handles = [Line2D([], [], color=c, marker="o", ms=3, label=f"layer {l + 1}")
             for l, c in enumerate(_layer_colors(num_layers))]
  handles += [Line2D([], [], color="black", ls="-", label=labels["normal"] + " (solid)"),
              Line2D([], [], color="black", ls="--", label=labels["high"] + " (dashed)")]
  fig.legend(handles=handles + extra, loc="lower center", ncol=4, fontsize=8, frameon=False)
  _suptitle(fig, results, f"Entropy collapse at a high learning rate (Zhai et al. 2023), causal "
            f"model: {labels['high']} (dashed) against {labels['normal']} (solid)")
  fig.tight_layout(rect=(0, 0.13, 1, 1))
  _save(fig, path)


# dynamics.png: (statistic of runs.<run>.dynamics, y label, panel title, value of uniform causal
# attention at sequence length T).
_DYNAMICS_PANELS = (
    ("mean_normalized_row_entropy", "H_t / log(t + 1)  (nats / nats)",
     "Normalized row entropy (1 = uniform, 0 = one-hot)", lambda t: 1.0),
    ("effective_rank", "effective rank  (positions, 1 .. T)",
     "Effective rank exp(H(sigma_i / sum_j sigma_j)) of A",
     lambda t: float(spectra.effective_rank(spectra.uniform_causal_attention(t)))),
    ("spectral_gap", "1 - |lambda_2|  (dimensionless)",
     "Spectral gap (causal: 1 - max_{t>=1} A_tt)", lambda t: 0.5),
    ("sink_mass", "mean A_t0, rows t = 1..T-1  (probability)",
     "Sink mass: attention on position 0", _uniform_causal_sink_mass),
)


def plot_dynamics(results: dict, path: str):
  """Per layer (mean over heads) the statistics of _DYNAMICS_PANELS at every log-spaced checkpoint
  of the causal run (solid) and the high learning-rate run (dashed) (drawn when the causal run has
  dynamics: see `figures_of`)."""
  runs = results["runs"]
  styles = {name: ls for name, ls in (("causal", "-"), ("causal_high_lr", "--"))
            if runs[name].get("dynamics")}
  t = results["config"]["seq_len"]
  fig, axes = plt.subplots(2, 2, figsize=(12, 8.6))
  num_layers = len(runs["causal"]["dynamics"]["mean_normalized_row_entropy"][0])
  steps_shown = sorted({s for name in styles for s in runs[name]["dynamics"]["steps"]})
  for (key, ylabel, title, uniform), ax in zip(_DYNAMICS_PANELS, axes.ravel()):
    for name, ls in styles.items():
      dyn = runs[name]["dynamics"]
      values = np.asarray(dyn[key], float)  # [S, L]
      for l, color in enumerate(_layer_colors(num_layers)):
        ax.plot(dyn["steps"], values[:, l], ls=ls, marker="o", ms=3, lw=1.4, color=color)
    ax.axhline(uniform(t), color="gray", ls=":", lw=1)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(-0.1, steps_shown[-1] * 1.25)
    ax.set_xticks(steps_shown)
    ax.set_xticklabels([str(s) for s in steps_shown], fontsize=7,
                       rotation=90 if len(steps_shown) > 8 else 0)
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set(xlabel="training step (symlog: linear in [0, 1]; ticks at the checkpoints)",
           ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
  labels = {name: (f"{RUN_LABELS[name]}: lr {runs[name]['learning_rate']:g}, warmup "
                   f"{runs[name]['warmup_steps']}"
                   + (f", diverged at step {runs[name]['diverged_at']}"
                      if runs[name]["diverged_at"] is not None else "")
                   + (" (solid)" if ls == "-" else " (dashed)"))
            for name, ls in styles.items()}
  handles = [Line2D([], [], color=c, marker="o", ms=3, label=f"layer {l + 1}")
             for l, c in enumerate(_layer_colors(num_layers))]
  handles += [Line2D([], [], color="black", ls=ls, label=labels[name])
              for name, ls in styles.items()]
  handles.append(Line2D([], [], color="gray", ls=":", lw=1,
                        label=f"uniform causal attention U_ts = 1/(t+1), T = {t}"))
  fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8,
             frameon=False)
  runs_text = " and ".join(f"{RUN_LABELS[n]} ({'solid' if ls == '-' else 'dashed'})"
                           for n, ls in styles.items())
  _suptitle(fig, results, f"Attention over training per layer (mean over heads), {runs_text} "
            f"runs, from log-spaced checkpoints (steps 0, 1, 2, 4, ...)")
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  _save(fig, path)


FIGURES = {"eigenvalues.png": plot_eigenvalues, "singular_values.png": plot_singular_values,
           "stationary.png": plot_stationary, "entropy_gap.png": plot_entropy_gap,
           "rank_collapse.png": plot_rank_collapse, "sink_mass.png": plot_sink_mass,
           "attention_maps.png": plot_attention_maps, "entropy_lr.png": plot_entropy_lr,
           "dynamics.png": plot_dynamics}


def figures_of(results: dict) -> dict:
  """The FIGURES these results draw: all of them, but dynamics.png only when the causal run has
  dynamics (it was trained with log-spaced checkpoints)."""
  has_dynamics = bool(results["runs"]["causal"].get("dynamics"))
  return {name: plot for name, plot in FIGURES.items() if name != "dynamics.png" or has_dynamics}


def draw(results: dict, workdir) -> list[str]:
  """Draws the figures of `figures_of(results)` into `workdir` (which holds spectra.npz); returns
  their file names."""
  return draw_each(figures_of(results), results, workdir)
