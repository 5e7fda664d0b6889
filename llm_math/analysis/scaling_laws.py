"""Scaling-law fits: L(N) = a * N^(-alpha) + c, numpy only.

The fit minimizes the squared error in log space,
  S(a, alpha, c) = sum_i (ln(a N_i^-alpha + c) - ln L_i)^2,   a > 0, c >= 0,
which weighs every point by its relative error (losses near the irreducible c and far above it count
alike). It starts from a grid over c in [0, min L): for fixed c, ln(L - c) = ln a - alpha ln N is linear
least squares; the grid point with the smallest S seeds a Levenberg-Marquardt refinement of
(ln a, alpha, c) with c kept >= 0.
"""
from typing import NamedTuple

import numpy as np


def power_law(n, a: float, alpha: float, c: float) -> np.ndarray:
  """L(N) = a * N^(-alpha) + c, elementwise over n."""
  return a * np.asarray(n, np.float64) ** (-alpha) + c


class PowerLawFit(NamedTuple):
  """Fitted L(N) = a N^-alpha + c; rms_log_residual = sqrt(mean (ln L_fit - ln L)^2)."""
  a: float
  alpha: float
  c: float
  rms_log_residual: float

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
  """Best (b, alpha, c) over a grid of c, with pred = exp(b - alpha x) + c and x centered ln N."""
  lmin = loss.min()
  c_G = lmin * (1.0 - np.geomspace(1.0, 1e-6, grid_size))  # dense near min L, includes c = 0
  z_GxP = np.log(loss[None, :] - c_G[:, None])
  x_c = x - x.mean()
  slope_G = (z_GxP * x_c[None, :]).sum(axis=1) / (x_c * x_c).sum()
  b_G = z_GxP.mean(axis=1) - slope_G * x.mean()
  pred_GxP = np.exp(b_G[:, None] + slope_G[:, None] * x[None, :]) + c_G[:, None]
  sse_G = ((np.log(pred_GxP) - y[None, :]) ** 2).sum(axis=1)
  best = int(np.argmin(sse_G))
  return b_G[best], -slope_G[best], c_G[best]


def fit_power_law(n, loss, grid_size: int = 400, max_iter: int = 500) -> PowerLawFit:
  """Fits L(N) = a N^-alpha + c to points (n_i, loss_i) by least squares in ln L.

  Args:
    n: [P] positive sizes (parameters, tokens, FLOPs...), P >= 3 with >= 3 distinct values.
    loss: [P] positive losses.
    grid_size: number of c values tried for the starting point.
    max_iter: Levenberg-Marquardt iterations at most.

  Returns:
    PowerLawFit(a, alpha, c, rms_log_residual), with .predict(n).
  """
  n, loss = _check_points(n, loss)
  if grid_size < 2:
    raise ValueError(f"grid_size must be >= 2, got {grid_size}")
  x_ref = np.log(n).mean()
  x = np.log(n) - x_ref  # centered: pred = exp(b - alpha x) + c, a = exp(b + alpha x_ref)
  y = np.log(loss)

  def residuals(theta):
    power = np.exp(theta[0] - theta[1] * x)
    pred = power + theta[2]
    jac_Px3 = np.stack([power, -x * power, np.ones_like(x)], axis=1) / pred[:, None]
    return np.log(pred) - y, jac_Px3

  theta = np.array(_grid_start(x, y, loss, grid_size))
  r, jac = residuals(theta)
  sse = float(r @ r)
  damping = 1e-3
  for _ in range(max_iter):
    jtj = jac.T @ jac
    grad = jac.T @ r
    step = np.linalg.solve(jtj + damping * (np.diag(np.diag(jtj)) + 1e-12 * np.eye(3)), -grad)
    trial = theta + step
    trial[2] = max(trial[2], 0.0)
    r_new, jac_new = residuals(trial)
    sse_new = float(r_new @ r_new)
    if np.isfinite(sse_new) and sse_new <= sse:
      done = sse - sse_new <= 1e-15 * max(sse, 1e-300) and np.max(np.abs(trial - theta)) < 1e-12
      theta, r, jac, sse = trial, r_new, jac_new, sse_new
      damping = max(damping / 3.0, 1e-12)
      if done or sse == 0.0:
        break
    else:
      damping *= 4.0
      if damping > 1e12:
        break
  b, alpha, c = (float(t) for t in theta)
  return PowerLawFit(a=float(np.exp(b + alpha * x_ref)), alpha=alpha, c=c,
                     rms_log_residual=float(np.sqrt(sse / n.size)))
