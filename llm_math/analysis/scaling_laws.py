"""Scaling-law fits, numpy and scipy only.

L(N) = a * N^(-alpha) + c (`fit_power_law`). The fit minimizes the squared error in log space,
  S(a, alpha, c) = sum_i (ln(a N_i^-alpha + c) - ln L_i)^2,   a > 0, c >= 0,
which weighs every point by its relative error (losses near the irreducible c and far above it count
alike). It starts from a grid over c in [0, min L): for fixed c, ln(L - c) = ln a - alpha ln N is linear
least squares; the grid point with the smallest S seeds `scipy.optimize.least_squares` (trust-region
reflective, c >= 0) over (ln a, alpha, c). The bound c = 0 is also tried exactly (the grid's c = 0
line, a closed form), and the better of the two is kept, so a law without irreducible loss is found
at c = 0 and not just near it.

L(N, D) = E + A/N^alpha + B/D^beta (`fit_chinchilla`, Hoffmann et al. 2022, approach 3): a Huber
loss on ln L, minimized from the best points of a grid of starts; `compute_optimal` gives the
compute-optimal N*(C) and D*(C) for C = 6 N D.

Every fit takes `bootstrap` (number of resamples, 0 for none) and `seed`: the measured points are
resampled with replacement and refitted, and the percentile 95% interval of each parameter is
returned as `ci95` = {name: [lo, hi]} (`intervals.percentile_bootstrap`); refits that cannot be made
are skipped and counted. A fit that is degenerate (as many points as parameters, a parameter on its
bound, an interval spanning everything) carries a one-line `note`.
"""
import itertools
import math
from typing import NamedTuple

import numpy as np
from scipy import optimize

from llm_math.analysis import intervals


def power_law(n, a: float, alpha: float, c: float) -> np.ndarray:
  """L(N) = a * N^(-alpha) + c, elementwise over n."""
  return a * np.asarray(n, np.float64) ** (-alpha) + c


class PowerLawFit(NamedTuple):
  """Fitted L(N) = a N^-alpha + c; rms_log_residual = sqrt(mean (ln L_fit - ln L)^2).

  ci95: {'a', 'alpha', 'c': [lo, hi]} percentile-bootstrap intervals, None without a bootstrap (or
  when every refit failed); bootstrap_failures: refits skipped; note: one line on what makes the fit
  doubtful, None when nothing does; band: the fitted curve's pointwise 95% bootstrap band,
  {'x': 40 sizes log-spaced from min N / 1.5 to max N x 1.5, 'lo', 'hi': percentiles of the
  refits' L(x)}, None without intervals.
  """
  a: float
  alpha: float
  c: float
  rms_log_residual: float
  ci95: dict | None = None
  bootstrap_failures: int = 0
  note: str | None = None
  band: dict | None = None

  def predict(self, n) -> np.ndarray:
    """The fitted law at n (any shape)."""
    return power_law(n, self.a, self.alpha, self.c)


def _check_points(n, loss) -> tuple:
  """Validates the (N, L) points and returns them as float64 1-D arrays."""
  n = np.asarray(n, np.float64)
  loss = np.asarray(loss, np.float64)
  if n.ndim != 1 or loss.shape != n.shape:
    raise ValueError(f"n and loss must be 1-D arrays of the same length, got shapes {n.shape} and "
                     f"{loss.shape}")
  if n.size < 3:
    raise ValueError(f"n must hold at least 3 points to fit 3 parameters, got {n.size}")
  if not np.all(np.isfinite(n)) or np.any(n <= 0):
    raise ValueError(f"n must be finite and > 0, got min {np.min(n)}")
  if not np.all(np.isfinite(loss)) or np.any(loss <= 0):
    raise ValueError(f"loss must be finite and > 0, got min {np.min(loss)}")
  if np.unique(n).size < 3:
    raise ValueError(f"n must hold at least 3 distinct values, got {np.unique(n).size}")
  return n, loss


def _grid_start(x: np.ndarray, y: np.ndarray, loss: np.ndarray, grid_size: int) -> tuple:
  """(best, c = 0) of (b, alpha, c) over a grid of c; pred = exp(b - alpha x) + c, x centered ln N.

  The first grid value is c = 0, whose line is the exact least-squares fit on the bound c = 0.
  """
  lmin = loss.min()
  c_G = lmin * (1.0 - np.geomspace(1.0, 1e-6, grid_size))  # dense near min L, includes c = 0
  z_GxP = np.log(loss[None, :] - c_G[:, None])
  x_c = x - x.mean()
  slope_G = (z_GxP * x_c[None, :]).sum(axis=1) / (x_c * x_c).sum()
  b_G = z_GxP.mean(axis=1) - slope_G * x.mean()
  pred_GxP = np.exp(b_G[:, None] + slope_G[:, None] * x[None, :]) + c_G[:, None]
  sse_G = ((np.log(pred_GxP) - y[None, :]) ** 2).sum(axis=1)
  best = int(np.argmin(sse_G))
  return (b_G[best], -slope_G[best], c_G[best]), (b_G[0], -slope_G[0], 0.0)


def _fit_power_law_point(n: np.ndarray, loss: np.ndarray, grid_size: int, max_iter: int) -> tuple:
  """(a, alpha, c, sse) of the log-space least-squares fit to checked points."""
  x_ref = np.log(n).mean()
  x = np.log(n) - x_ref  # centered: pred = exp(b - alpha x) + c, a = exp(b + alpha x_ref)
  y = np.log(loss)

  def residuals(theta):
    return np.log(np.exp(theta[0] - theta[1] * x) + theta[2]) - y

  def jacobian(theta):
    power = np.exp(theta[0] - theta[1] * x)
    return np.stack([power, -x * power, np.ones_like(x)], axis=1) / (power + theta[2])[:, None]

  start, on_bound = _grid_start(x, y, loss, grid_size)
  sol = optimize.least_squares(residuals, np.array(start), jac=jacobian,
                               bounds=([-np.inf, -np.inf, 0.0], np.inf), method="trf",
                               x_scale="jac", ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=max_iter)
  candidates = [np.asarray(sol.x, np.float64), np.array(on_bound)]
  sses = [float(np.sum(residuals(t) ** 2)) for t in candidates]
  # c at its bound: the trust region stops a hair above 0 (c ~ 1e-24) where the exact c = 0 line fits
  # as well; the exact one is kept then, so a fit at the bound reports c = 0.
  best = 1 if sses[1] <= sses[0] * (1 + 1e-9) + 1e-30 else int(np.nanargmin(sses))
  b, alpha, c = (float(t) for t in candidates[best])
  return float(np.exp(b + alpha * x_ref)), alpha, c, sses[best]


def fit_power_law(n, loss, grid_size: int = 400, max_iter: int = 500, *, bootstrap: int = 0,
                  seed: int = 0) -> PowerLawFit:
  """Fits L(N) = a N^-alpha + c to points (n_i, loss_i) by least squares in ln L.

  Args:
    n: [P] positive sizes (parameters, tokens, FLOPs...), P >= 3 with >= 3 distinct values.
    loss: [P] positive losses.
    grid_size: number of c values tried for the starting point.
    max_iter: evaluations of the residuals at most in the least-squares refinement.
    bootstrap: number of bootstrap resamples of the points (0: no intervals).
    seed: seed of the resampling.

  Returns:
    PowerLawFit(a, alpha, c, rms_log_residual, ci95, bootstrap_failures, note), with .predict(n).

  Raises:
    ValueError: on points that admit no fit at all (fewer than 3 distinct sizes, non-positive
      values); `power_law_record` gives a note instead.
  """
  n, loss = _check_points(n, loss)
  if grid_size < 2:
    raise ValueError(f"grid_size must be >= 2, got {grid_size}")
  if bootstrap < 0:
    raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
  a, alpha, c, sse = _fit_power_law_point(n, loss, grid_size, max_iter)
  notes = []
  if np.unique(n).size == 3:
    notes.append("3 distinct sizes for 3 parameters: " + (
        "the law passes through the points, with no residual left to check it" if n.size == 3 else
        "nothing tests the shape of the law, only the scatter at each size"))
  if c <= 1e-9 * loss.min():
    notes.append("c at its bound 0")
  if alpha <= 0.0:
    notes.append(f"alpha = {alpha:.3g} <= 0: the loss does not fall with N")
  ci95, failures, band = None, 0, None
  if bootstrap:
    def refit(idx):
      if np.unique(n[idx]).size < 3:
        return None
      a_i, alpha_i, c_i, _ = _fit_power_law_point(n[idx], loss[idx], grid_size, max_iter)
      return {"a": a_i, "alpha": alpha_i, "c": c_i}

    boot = intervals.percentile_bootstrap(refit, n.size, bootstrap, seed)
    ci95, failures = boot["ci95"], boot["failures"]
    notes.append(intervals.bootstrap_note(failures, bootstrap))
    if ci95 is not None:
      x = np.geomspace(n.min() / 1.5, n.max() * 1.5, 40)
      samples = boot["samples"]
      curves_SxX = power_law(x[None, :], np.array(samples["a"])[:, None],
                             np.array(samples["alpha"])[:, None], np.array(samples["c"])[:, None])
      lo, hi = np.percentile(curves_SxX, [2.5, 97.5], axis=0)
      band = {"x": x.tolist(), "lo": lo.tolist(), "hi": hi.tolist()}
      lmin = float(loss.min())
      if ci95["c"][0] <= 0.1 * lmin and ci95["c"][1] >= 0.9 * lmin:
        notes.append(f"c undetermined: its 95% interval [{ci95['c'][0]:.3g}, {ci95['c'][1]:.3g}] "
                     f"spans nearly all of [0, min L = {lmin:.3g}]")
      if ci95["alpha"][0] <= 0.0 < alpha:
        notes.append(f"alpha's 95% interval [{ci95['alpha'][0]:.3g}, {ci95['alpha'][1]:.3g}] "
                     "reaches 0")
  return PowerLawFit(a=a, alpha=alpha, c=c, rms_log_residual=float(np.sqrt(sse / n.size)),
                     ci95=ci95, bootstrap_failures=failures, note=intervals.join_notes(*notes),
                     band=band)


def power_law_record(n, loss, *, bootstrap: int = 0, seed: int = 0) -> dict:
  """`fit_power_law` as JSON values: a, alpha, c, rms_log_residual, ci95 (None without a bootstrap),
  bootstrap_failures, note and band. Points that admit no fit give None values and the reason as the note,
  not an exception."""
  try:
    fit = fit_power_law(n, loss, bootstrap=bootstrap, seed=seed)
  except ValueError as e:
    return {"a": None, "alpha": None, "c": None, "rms_log_residual": None, "ci95": None,
            "bootstrap_failures": 0, "note": f"no fit: {e}", "band": None}
  return fit._asdict()


# ----------------------------------------------------------------------------------------------
# L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3).
# ----------------------------------------------------------------------------------------------

CHINCHILLA_PARAMS = ("E", "A", "alpha", "B", "beta")
# The starting grid of the paper, over theta = (e, a, alpha, b, beta), E = exp(e), A = exp(a),
# B = exp(b): 5 * 6 * 5 * 6 * 5 = 4500 points.
CHINCHILLA_GRID = {"e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                   "alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                   "beta": (0.0, 0.5, 1.0, 1.5, 2.0)}
# The box of the refinement, over the centered (e, a + alpha mean ln N, alpha, b + beta mean ln D,
# beta) (see `_ChinchillaData`): wide enough for any sensible law; a fit ending on it gets a note.
_CHINCHILLA_LOWER = np.array([-20.0, -100.0, 0.0, -100.0, 0.0])
_CHINCHILLA_UPPER = np.array([10.0, 100.0, 5.0, 100.0, 5.0])
_CHINCHILLA_BOUND_NAMES = ("ln E", "ln(A / N^alpha) at the geometric-mean N", "alpha",
                           "ln(B / D^beta) at the geometric-mean D", "beta")


def chinchilla_law(n_params, n_tokens, e_irr: float, a: float, alpha: float, b: float,
                   beta: float) -> np.ndarray:
  """L(N, D) = E + A / N^alpha + B / D^beta, elementwise (broadcasting) over N and D."""
  return (e_irr + a * np.asarray(n_params, np.float64) ** (-alpha)
          + b * np.asarray(n_tokens, np.float64) ** (-beta))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
  """Huber loss of r, elementwise: r^2 / 2 for |r| <= delta, delta (|r| - delta / 2) beyond."""
  return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))


class _ChinchillaData(NamedTuple):
  """ln N, ln D (centered on their means mean_n, mean_d) and ln L of the points.

  The fits run in the centered parameters (e, a_c, alpha, b_c, beta), a_c = a - alpha mean_n and
  b_c = b - beta mean_d, so that ln L = logsumexp(e, a_c - alpha x_n, b_c - beta x_d) is the same
  function with intercepts that do not move with the exponents (far better conditioned).
  """
  x_n: np.ndarray
  x_d: np.ndarray
  log_l: np.ndarray
  mean_n: float
  mean_d: float

  def center(self, theta_Gx5: np.ndarray) -> np.ndarray:
    """(e, a, alpha, b, beta) rows to the centered parameters."""
    t = np.array(theta_Gx5, np.float64)
    t[..., 1] -= t[..., 2] * self.mean_n
    t[..., 3] -= t[..., 4] * self.mean_d
    return t

  def uncenter(self, theta_c: np.ndarray) -> np.ndarray:
    """The centered parameters back to (e, a, alpha, b, beta)."""
    t = np.array(theta_c, np.float64)
    t[..., 1] += t[..., 2] * self.mean_n
    t[..., 3] += t[..., 4] * self.mean_d
    return t

  def take(self, idx: np.ndarray) -> "_ChinchillaData":
    """The points idx (repeats allowed), with the same centering."""
    return self._replace(x_n=self.x_n[idx], x_d=self.x_d[idx], log_l=self.log_l[idx])

  def log_pred(self, theta_c_Gx5: np.ndarray) -> np.ndarray:
    """[G, P]: ln L_pred = logsumexp(e, a_c - alpha x_n, b_c - beta x_d) of each parameter row at
    each point."""
    return _logsumexp3(*self._terms(theta_c_Gx5))[0]

  def _terms(self, theta_c_Gx5: np.ndarray) -> tuple:
    e, a, alpha, b, beta = (theta_c_Gx5[:, i:i + 1] for i in range(5))
    return e, a - alpha * self.x_n[None, :], b - beta * self.x_d[None, :]

  def residuals(self, theta_c: np.ndarray) -> np.ndarray:
    """[P]: ln L_pred - ln L at one parameter vector."""
    return self.log_pred(theta_c[None, :])[0] - self.log_l

  def jacobian(self, theta_c: np.ndarray) -> np.ndarray:
    """[P, 5]: the derivatives of the residuals; d ln L / d term is the softmax weight of term."""
    _, w0, w1, w2 = (w[0] for w in _logsumexp3(*self._terms(theta_c[None, :])))
    return np.stack([w0, w1, -w1 * self.x_n, w2, -w2 * self.x_d], axis=1)


def _logsumexp3(t0, t1, t2) -> tuple:
  """ln(e^t0 + e^t1 + e^t2) and the softmax weights of t0, t1, t2 (broadcast), computed stably."""
  m = np.maximum(np.maximum(t0, t1), t2)
  e0, e1, e2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(t2 - m)
  total = e0 + e1 + e2
  return m + np.log(total), e0 / total, e1 / total, e2 / total


def _refine_chinchilla(start_c: np.ndarray, data: _ChinchillaData, delta: float,
                       optimizer: str) -> np.ndarray:
  """Centered parameters minimizing sum_i Huber_delta(residual_i), from one start in the box."""
  start_c = np.clip(start_c, _CHINCHILLA_LOWER, _CHINCHILLA_UPPER)
  if optimizer == "least_squares":
    # cost = 1/2 sum f_scale^2 rho(r^2 / f_scale^2) with the 'huber' rho is exactly sum Huber(r).
    sol = optimize.least_squares(data.residuals, start_c, jac=data.jacobian,
                                 bounds=(_CHINCHILLA_LOWER, _CHINCHILLA_UPPER), method="trf",
                                 loss="huber", f_scale=delta, x_scale="jac", ftol=1e-12,
                                 xtol=1e-12, gtol=1e-12, max_nfev=2000)
    return np.asarray(sol.x, np.float64)

  def objective(theta_c):  # Divided by delta^2, so that L-BFGS-B's tolerances meet values ~1.
    r = data.residuals(theta_c)
    dloss = np.clip(r, -delta, delta)
    return float(np.sum(_huber(r, delta))) / delta**2, data.jacobian(theta_c).T @ dloss / delta**2

  sol = optimize.minimize(objective, start_c, jac=True, method="L-BFGS-B",
                          bounds=list(zip(_CHINCHILLA_LOWER, _CHINCHILLA_UPPER)),
                          options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
  return np.asarray(sol.x, np.float64)


def _minimize_chinchilla(starts_c, data: _ChinchillaData, delta: float, optimizer: str) -> tuple:
  """The best (centered theta, sum Huber) of the refinements from each start; (None, inf) if none
  ends finite."""
  best_theta, best_f = None, np.inf
  for start in starts_c:
    theta = _refine_chinchilla(np.asarray(start, np.float64), data, delta, optimizer)
    f = float(np.sum(_huber(data.residuals(theta), delta)))
    if np.isfinite(f) and f < best_f:
      best_theta, best_f = theta, f
  return best_theta, best_f


def _theta_params(theta) -> dict:
  e, a, alpha, b, beta = (float(t) for t in theta)
  return {"E": math.exp(e), "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta}


def fit_chinchilla(n_params, n_tokens, loss, *, bootstrap: int = 0, seed: int = 0,
                   grid: dict | None = None, num_starts: int | None = 16,
                   huber_delta: float = 1e-3, optimizer: str = "least_squares") -> dict:
  """Fits L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3).

  With E = exp(e), A = exp(a), B = exp(b), the prediction is ln L = logsumexp(e, a - alpha ln N,
  b - beta ln D), and the fit minimizes sum_i Huber_delta(ln L_pred(N_i, D_i) - ln L_i). The
  objective is evaluated on a grid of starting points over (e, a, alpha, b, beta) (by default the
  paper's 4500, `CHINCHILLA_GRID`), and the `num_starts` best grid points are refined (None: every
  one, as in the paper); the lowest minimum wins. The refinement runs in a box (alpha, beta in
  [0, 5]; `_CHINCHILLA_LOWER`, `_CHINCHILLA_UPPER`) with `optimizer`:
    'least_squares': `scipy.optimize.least_squares` (trust-region reflective) with loss='huber' and
      f_scale=delta, whose cost is exactly sum_i Huber_delta(r_i) (the default: few iterations);
    'L-BFGS-B': `scipy.optimize.minimize` on the same objective, the paper's optimizer. (With
      scipy's L-BFGS-B, a multi-threaded OpenBLAS on a busy machine costs ~10 ms per iteration.)
  Bootstrap refits start from the point estimate; a resample with fewer than 3 distinct N or D
  counts as a failed refit.

  Args:
    n_params: [P] parameter counts N > 0.
    n_tokens: [P] training tokens D > 0.
    loss: [P] final losses L > 0.
    bootstrap: number of bootstrap resamples of the points (0: no intervals).
    seed: seed of the resampling.
    grid: {'e', 'a', 'alpha', 'b', 'beta': values} for the starting grid (their product).
    num_starts: grid points refined, the best by objective; None for all.
    huber_delta: delta of the Huber loss on ln L.
    optimizer: 'least_squares' or 'L-BFGS-B'.

  Returns:
    {'E', 'A', 'alpha', 'B', 'beta', 'huber_loss' (sum_i Huber_delta at the fit),
     'rms_log_residual', 'num_points', 'ci95' ({name: [lo, hi]}, None without a bootstrap),
     'bootstrap_failures', 'bootstrap_samples' ({name: [value per successful refit]}, None without a
     bootstrap; `compute_optimal` uses them), 'note' (one line on what makes the fit doubtful, None
     when nothing does)}. Points that admit no fit give None values and the reason as the note.

  Raises:
    ValueError: when the three inputs are not 1-D arrays of one length, or on bad options.
  """
  n = np.asarray(n_params, np.float64)
  d = np.asarray(n_tokens, np.float64)
  l = np.asarray(loss, np.float64)
  if n.ndim != 1 or d.shape != n.shape or l.shape != n.shape:
    raise ValueError("n_params, n_tokens, loss: expected 1-D arrays of one length, got shapes "
                     f"{n.shape}, {d.shape}, {l.shape}")
  if (bootstrap < 0 or huber_delta <= 0 or (num_starts is not None and num_starts < 1)
      or optimizer not in ("least_squares", "L-BFGS-B")):
    raise ValueError("expected bootstrap >= 0, huber_delta > 0, num_starts >= 1 or None and "
                     "optimizer 'least_squares' or 'L-BFGS-B', got "
                     f"{bootstrap}, {huber_delta}, {num_starts}, {optimizer!r}")
  g = CHINCHILLA_GRID if grid is None else grid
  grid_Gx5 = np.array(list(itertools.product(g["e"], g["a"], g["alpha"], g["b"], g["beta"])),
                      np.float64)
  if grid_Gx5.size == 0:
    raise ValueError("grid: expected at least one value for each of e, a, alpha, b, beta")
  out = {**dict.fromkeys(CHINCHILLA_PARAMS), "huber_loss": None, "rms_log_residual": None,
         "num_points": int(n.size), "ci95": None, "bootstrap_failures": 0,
         "bootstrap_samples": None, "note": None}
  if n.size == 0:
    return {**out, "note": "no fit: no points"}
  if not all(np.all(np.isfinite(v)) and np.all(v > 0) for v in (n, d, l)):
    return {**out, "note": "no fit: N, D and L must be finite and > 0"}
  log_n, log_d = np.log(n), np.log(d)
  data = _ChinchillaData(log_n - log_n.mean(), log_d - log_d.mean(), np.log(l), float(log_n.mean()),
                         float(log_d.mean()))
  grid_c = data.center(grid_Gx5)
  grid_f = np.sum(_huber(data.log_pred(grid_c) - data.log_l[None, :], huber_delta), axis=1)
  order = np.argsort(grid_f, kind="stable")[:num_starts]
  theta_c, f = _minimize_chinchilla(grid_c[order], data, huber_delta, optimizer)
  if theta_c is None:
    return {**out, "note": "no fit: every refinement ended non-finite"}
  out.update(_theta_params(data.uncenter(theta_c)), huber_loss=f,
             rms_log_residual=float(np.sqrt(np.mean(data.residuals(theta_c) ** 2))))

  notes = []
  if n.size <= 5:
    notes.append(f"{n.size} points for 5 parameters: "
                 + ("as many points as parameters, nothing left to check the fit" if n.size == 5
                    else "underdetermined, this is one fit of many"))
  for name, values, exponent in (("N", n, "alpha"), ("D", d, "beta")):
    if np.unique(values).size < 3:
      notes.append(f"{np.unique(values).size} distinct {name}: {exponent} is not determined "
                   "(needs 3)")
  for name, value, lo, hi in zip(_CHINCHILLA_BOUND_NAMES, theta_c, _CHINCHILLA_LOWER,
                                 _CHINCHILLA_UPPER):
    for bound in (lo, hi):
      if abs(value - bound) <= 1e-6 * max(1.0, abs(bound)):
        notes.append(f"{name} at its bound {bound:g}")
  if bootstrap:
    def refit(idx):
      if np.unique(n[idx]).size < 3 or np.unique(d[idx]).size < 3:
        return None
      th, _ = _minimize_chinchilla([theta_c], data.take(idx), huber_delta, optimizer)
      return None if th is None else _theta_params(data.uncenter(th))

    boot = intervals.percentile_bootstrap(refit, n.size, bootstrap, seed)
    out.update(ci95=boot["ci95"], bootstrap_failures=boot["failures"],
               bootstrap_samples=boot["samples"] or None)
    notes.append(intervals.bootstrap_note(boot["failures"], bootstrap))
    for name, (lo, hi) in (boot["ci95"] or {}).items():
      if name in ("alpha", "beta"):
        if lo <= 1e-6 or hi >= _CHINCHILLA_UPPER[2] - 1e-6:
          notes.append(f"{name}'s 95% interval [{lo:.3g}, {hi:.3g}] reaches its bound")
      elif not lo > 0 or hi / lo > 1e3:
        notes.append(f"{name} undetermined: its 95% interval [{lo:.3g}, {hi:.3g}] spans more than "
                     "a factor 1000")
  out["note"] = intervals.join_notes(*notes)
  return out


def _optimal_allocation(flops: np.ndarray, a_coef: float, alpha: float, b_coef: float,
                        beta: float) -> tuple:
  """(N*, D*, a, b, G) of the law's compute-optimal allocation at C = 6 N D."""
  g = (alpha * a_coef / (beta * b_coef)) ** (1.0 / (alpha + beta))
  exp_a, exp_b = beta / (alpha + beta), alpha / (alpha + beta)
  return g * (flops / 6.0) ** exp_a, (flops / 6.0) ** exp_b / g, exp_a, exp_b, g


def compute_optimal(fit: dict, flops) -> dict:
  """Compute-optimal N*(C), D*(C) of a `fit_chinchilla` fit for C = 6 N D FLOPs.

  Minimizing E + A / N^alpha + B / D^beta along 6 N D = C gives N* = G (C/6)^a and
  D* = G^-1 (C/6)^b with a = beta / (alpha + beta), b = alpha / (alpha + beta) and
  G = (alpha A / (beta B))^(1 / (alpha + beta)).

  Args:
    fit: a `fit_chinchilla` result (or any mapping with E, A, alpha, B, beta; with
      'bootstrap_samples' for intervals).
    flops: C, a number or an array.

  Returns:
    {'flops', 'n_opt', 'd_opt' (floats for a number C, lists for an array), 'a', 'b', 'G',
     'ci95' (percentile intervals over the bootstrap fits: {'a', 'b', 'G': [lo, hi], 'n_opt',
     'd_opt': [lo, hi] per C}; None without bootstrap samples), 'note'}. A fit with no values, or
     with alpha or beta = 0 (no optimum), gives None values and the reason as the note.
  """
  c = np.asarray(flops, np.float64)
  out = {"flops": c.tolist(), "n_opt": None, "d_opt": None, "a": None, "b": None, "G": None,
         "ci95": None, "note": fit.get("note")}
  if np.any(~np.isfinite(c)) or np.any(c <= 0):
    raise ValueError(f"flops: expected finite values > 0, got {flops}")
  if any(fit.get(k) is None for k in CHINCHILLA_PARAMS):
    return {**out, "note": intervals.join_notes("no fit", fit.get("note"))}
  if not (fit["alpha"] > 0 and fit["beta"] > 0):
    return {**out, "note": intervals.join_notes(
        f"no compute optimum: alpha = {fit['alpha']:.3g}, beta = {fit['beta']:.3g} (both must be "
        "> 0)", fit.get("note"))}
  n_opt, d_opt, exp_a, exp_b, g = _optimal_allocation(c, fit["A"], fit["alpha"], fit["B"],
                                                      fit["beta"])
  out.update(n_opt=n_opt.tolist(), d_opt=d_opt.tolist(), a=exp_a, b=exp_b, G=float(g))
  samples = fit.get("bootstrap_samples")
  if samples:
    draws = [_optimal_allocation(c, a_i, al_i, b_i, be_i) for a_i, al_i, b_i, be_i in
             zip(samples["A"], samples["alpha"], samples["B"], samples["beta"])
             if al_i > 0 and be_i > 0]
    if draws:
      n_SxC, d_SxC, a_S, b_S, g_S = (np.array(v) for v in zip(*draws))
      per_c = lambda v: np.moveaxis(np.percentile(v, [2.5, 97.5], axis=0), 0, -1).tolist()
      out["ci95"] = {"a": intervals.percentile_ci95(a_S), "b": intervals.percentile_ci95(b_S),
                     "G": intervals.percentile_ci95(g_S), "n_opt": per_c(n_SxC),
                     "d_opt": per_c(d_SxC)}
    if len(draws) < len(samples["A"]):
      out["note"] = intervals.join_notes(
          out["note"], f"{len(samples['A']) - len(draws)} bootstrap fits with alpha or beta = 0 "
          "left out of the intervals")
  return out
