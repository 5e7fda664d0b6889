"""Figures of the scaling-law study (`llm_math.studies.scaling_law`) from its results.json.

scaling_law_isoflop.png  loss vs N at fixed compute C (isoFLOP curves of the fitted law) for 5 values
                         of C spanning the grid, each curve's minimum marked, the measured runs
                         colored by their C
scaling_law_optimal.png  compute-optimal N*(C) and D*(C), log-log, with the 95% bootstrap band, the
                         fitted exponent and a dashed Chinchilla slope (0.5) through the same point
scaling_law_fit.png      measured loss vs D, one color per N, with the fitted law's curves (and the
                         same against N, one color per D)

Each still draws when the fit failed (values None): the measured points, and the reason in the title.
"""

import textwrap

import matplotlib

matplotlib.use("Agg")
from matplotlib import colors as mcolors  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from llm_math.figures import draw_each  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import error_bars  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import save_figure  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import seeds_note  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.reports import measurement_caption  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.reports.scaling_law import count  # pylint: disable=g-import-not-at-top,wrong-import-position

ISOFLOP_CURVES = 5
PARAMS = ("E", "A", "alpha", "B", "beta")


def law(fit: dict):
  """The fitted L(N, D) as a function of numpy arrays, or None when the fit has no values."""
  if any(fit.get(k) is None for k in PARAMS):
    return None
  e, a, alpha, b, beta = (fit[k] for k in PARAMS)
  return lambda n, d: e + a * np.asarray(n, np.float64) ** -alpha + b * np.asarray(
      d, np.float64) ** -beta


def _points(results: dict) -> tuple:
  """(N, D, C, L) of the records as float arrays."""
  records = results["records"]
  return tuple(np.array([r[k] for r in records], np.float64)
               for k in ("params", "tokens", "flops", "val_nll_nats"))


def _title(fig, results: dict, head: str, width: int = 150):
  """Suptitle: what the figure shows, the data, how measured, and why a fit is missing; lines
  wrapped to `width` characters."""
  fit = results["fit"]
  lines = [head, f"{results['data']}; {measurement_caption(results['evaluation'])}"]
  if not law(fit):
    lines.append(f"no fitted law: {fit.get('note') or 'the fit has no values'}")
  fig.suptitle("\n".join(textwrap.fill(line, width) for line in lines), fontsize=9)


def _count_ticks(axis, values: np.ndarray):
  """Major ticks at the measured `values`, labelled as counts (512k, 1.02M); no minor labels."""
  axis.set_major_locator(ticker.FixedLocator(np.unique(values)))
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: count(v)))
  axis.set_minor_formatter(ticker.NullFormatter())


def _legend_below(ax, ncol: int = 2):
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol, frameon=False)


def _span(values: np.ndarray, factor: float) -> np.ndarray:
  """200 log-spaced values from min / factor to max * factor."""
  return np.geomspace(values.min() / factor, values.max() * factor, 200)


def _loss_limits(ax, loss: np.ndarray, also=()):
  """y limits around the measured losses and the values `also` must show (curves may leave them)."""
  low, high = min([loss.min(), *also]), loss.max()
  pad = 0.08 * (high - low or 0.1)
  ax.set_ylim(low - pad, high + pad)


def plot_isoflop(results: dict, path: str):
  """Loss vs N along C = 6ND for ISOFLOP_CURVES values of C log-spaced over the runs' C, from the
  fitted law; each curve's minimum (N*(C)) marked; the measured runs colored by their C."""
  n, _, c, loss = _points(results)
  fit = results["fit"]
  predict = law(fit)
  norm = mcolors.LogNorm(c.min(), c.max() if c.max() > c.min() else c.min() * 10)
  cmap = plt.cm.viridis
  fig, ax = plt.subplots(figsize=(9, 6.5))
  minima = []
  if predict is not None:
    flops_K = np.geomspace(c.min(), c.max(), ISOFLOP_CURVES)
    # N from a quarter of the smallest to 4x the largest size, widened to show every curve's
    # minimum, within a factor 100 of the grid.
    probe = np.geomspace(n.min() / 100, n.max() * 100, 2000)
    n_opt_K = [probe[np.argmin(predict(probe, f / (6.0 * probe)))] for f in flops_K]
    n_axis = np.geomspace(min(n.min() / 4, min(n_opt_K) / 2), max(n.max() * 4, max(n_opt_K) * 2),
                          300)
    for flops in flops_K:
      curve = predict(n_axis, flops / (6.0 * n_axis))
      color = cmap(norm(flops))
      ax.plot(n_axis, curve, color=color, lw=1.6, label=f"C = {flops:.2g} FLOPs (fitted law)")
      best = int(np.argmin(curve))
      if 0 < best < len(n_axis) - 1:  # A minimum inside the plotted range.
        ax.plot(n_axis[best], curve[best], marker="*", ms=14, color=color, mec="black", mew=0.6,
                ls="none")
        minima.append(curve[best])
    if minima:
      ax.plot([], [], marker="*", ms=11, color="white", mec="black", ls="none",
              label="minimum of each curve: N*(C)")
  points = ax.scatter(n, loss, c=c, cmap=cmap, norm=norm, s=45, edgecolors="black",
                      linewidths=0.6, zorder=3, label="measured runs (color: their C)")
  fig.colorbar(points, ax=ax, label="training compute C = 6ND (FLOPs)")
  ax.set(xscale="log", xlabel="parameters N (log scale)",
         ylabel="final validation NLL (nats/token)")
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: count(v)))
  _loss_limits(ax, loss, minima)
  ax.grid(alpha=0.3, which="major")
  ax.grid(alpha=0.1, which="minor")
  _legend_below(ax, ncol=3)
  _title(fig, results, "IsoFLOP curves: loss vs model size at fixed compute C, from the fitted "
         "L = E + A/N^alpha + B/D^beta along D = C/(6N)", width=120)
  save_figure(fig, path)


def _exponent_label(symbol: str, name: str, value, ci) -> str:
  if value is None:
    return f"{symbol}: no fit"
  interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else " (no interval)"
  return f"{symbol} ∝ C^{name}, {name} = {value:.2f}{interval} (95% bootstrap)"


def plot_optimal(results: dict, path: str):
  """N*(C) and D*(C) of compute_optimal, log-log, each with its 95% bootstrap band, and a dashed line
  of slope 0.5 (Chinchilla) through the fitted value at the middle C; the runs' (C, N) and (C, D)."""
  opt, ref = results["compute_optimal"], results["chinchilla_reference"]
  n, d, c, _ = _points(results)
  ci = opt.get("ci95") or {}
  flops = np.asarray(opt.get("flops") or [], np.float64)
  fig, axes = plt.subplots(1, 2, figsize=(13, 6))
  panels = ((axes[0], "n_opt", "a", "N*", n, "compute-optimal parameters N*", "tab:blue"),
            (axes[1], "d_opt", "b", "D*", d, "compute-optimal training tokens D*", "tab:red"))
  for ax, key, exponent, symbol, measured, ylabel, color in panels:
    ax.scatter(c, measured, marker="o", s=22, color="tab:gray", alpha=0.7, zorder=2,
               label=f"the grid's runs (their {symbol[0]} and C)")
    if opt.get(key) is not None and flops.size:
      values = np.asarray(opt[key], np.float64)
      ax.plot(flops, values, color=color, lw=2,
              label=_exponent_label(symbol, exponent, opt.get(exponent), ci.get(exponent)))
      if ci.get(key):
        band = np.asarray(ci[key], np.float64)
        ax.fill_between(flops, band[:, 0], band[:, 1], color=color, alpha=0.2,
                        label="95% bootstrap band")
      mid = len(flops) // 2
      slope = ref[exponent]
      ax.plot(flops, values[mid] * (flops / flops[mid]) ** slope, color="black", ls="--", lw=1.2,
              label=f"Chinchilla slope {exponent} = {slope:.2f} (Hoffmann et al., approaches 1-2)")
    ax.set(xscale="log", yscale="log", xlabel="training compute C = 6ND (FLOPs)", ylabel=ylabel)
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.1, which="minor")
    _legend_below(ax)
  _title(fig, results, "Compute-optimal allocation from the fitted L(N, D) (C = 6ND)")
  save_figure(fig, path)


def plot_fit(results: dict, path: str):
  """Measured loss vs D, one color per N, with the fitted law's curve for each N; and the same
  against N, one color per D."""
  n, d, _, loss = _points(results)
  fit = results["fit"]
  predict = law(fit)
  fig, axes = plt.subplots(1, 2, figsize=(13, 6))
  for ax, x, other, x_name, other_name, fmt_label in (
      (axes[0], d, n, "training tokens D", "N", lambda v: f"N = {v:,.0f}"),
      (axes[1], n, d, "parameters N", "D", lambda v: f"D = {count(v)} tokens")):
    groups = np.unique(other)
    for i, value in enumerate(groups):
      color = plt.cm.viridis(0.9 * i / max(len(groups) - 1, 1))
      sel = other == value
      yerr = error_bars([r for r, keep in zip(results["records"], sel) if keep], "val_nll_nats")
      ax.errorbar(x[sel], loss[sel], yerr=yerr, marker="o", ls="none", ms=7, color=color,
                  mec="black", mew=0.5, capsize=3,
                  label=f"{fmt_label(value)} (measured{seeds_note(results)})")
      if predict is not None:
        grid = _span(x, 1.5)
        curve = predict(grid, value) if x_name.startswith("parameters") else predict(value, grid)
        ax.plot(grid, curve, color=color, lw=1.3)
    ax.set(xscale="log", xlabel=f"{x_name} (log scale; ticks at the grid's values)",
           ylabel="final validation NLL (nats/token)")
    _count_ticks(ax.xaxis, x)
    _loss_limits(ax, loss)
    if predict is not None:
      ax.plot([], [], color="gray", lw=1.3, label="fitted law at that " + other_name)
      if fit["E"] >= ax.get_ylim()[0]:
        ax.axhline(fit["E"], color="black", ls=":", lw=1,
                   label=f"fitted irreducible loss E = {fit['E']:.3f}")
      else:
        ax.plot([], [], ls="none", label=f"fitted irreducible loss E = {fit['E']:.3g} (below the "
                "axis)")
    ax.grid(alpha=0.3, which="major")
    _legend_below(ax)
  _title(fig, results, _fit_head(fit))
  save_figure(fig, path)


def _fit_head(fit: dict) -> str:
  """The figure's head line: the fitted law with its numbers, or what the figure shows without it."""
  if law(fit) is None:
    return "Measured loss over the (N, D) grid"
  residual = fit.get("rms_log_residual")
  return (f"Fitted L(N, D) = {fit['E']:.3g} + {fit['A']:.3g} / N^{fit['alpha']:.3f} + "
          f"{fit['B']:.3g} / D^{fit['beta']:.3f} (Hoffmann et al. approach 3)"
          + (f"; rms residual of ln L {residual:.4f}" if residual is not None else ""))


FIGURES = {"scaling_law_isoflop.png": plot_isoflop, "scaling_law_optimal.png": plot_optimal,
           "scaling_law_fit.png": plot_fit}


def draw(results: dict, workdir) -> list[str]:
  """Draws the three figures into `workdir`; returns their file names."""
  return draw_each(FIGURES, results, workdir)

