"""results.md of the attention-spectra study (`llm_math.studies.attention_spectra`), from its
results.json: the key numbers in words (rank collapse, the learning rate and attention entropy, the
dynamics over training), then the per-layer spectra as a table."""

import numpy as np

from llm_math import reports


def uniform_causal_entropy(t: int) -> float:
  """Mean row entropy (nats) of uniform causal attention over T = t positions: mean_t log(t + 1)."""
  return float(np.mean(np.log(np.arange(1, t + 1))))


def _g(value) -> str:
  return reports.fmt(value, ".3g", "n/a")


def _layer_means(snapshot: dict, key: str) -> list[float]:
  """Per layer, the mean over heads of an `[L][H]` statistic."""
  return [float(np.mean(row)) for row in snapshot[key]]


def _per_layer_factor(profile: dict) -> str:
  """Geometric-mean factor by which the relative residual shrinks per layer, as 'x0.52'."""
  first, last = profile["fro"][0], profile["fro"][-1]
  return f"x{(last / first) ** (1.0 / (len(profile['fro']) - 1)):.3g}" if first and last else "n/a"


def _rank_collapse_report(rc: dict) -> list[str]:
  arch, depth = rc["architectures"], rc["num_layers"]
  pure, skip = arch["pure attention"], arch["attention + skip"]
  last = lambda profile: _g(profile["fro"][-1]) if profile else "n/a"
  text = (f"Relative residual ||X - 1 x^T||_F / ||X||_F of the residual stream of {depth}-layer "
          f"causal models fed {rc['inputs']} (mean over sequences; layer 0 = embeddings; weights "
          f"N(0, {rc['init_std']:g}^2), one draw for all four). At initialization pure attention "
          f"falls from {_g(pure['init']['fro'][0])} (embeddings) to {last(pure['init'])} at layer "
          f"{depth} ({_per_layer_factor(pure['init'])} per layer: collapse towards rank one), "
          f"while attention + skip keeps {last(skip['init'])} "
          f"({_per_layer_factor(skip['init'])} per layer)")
  if pure["trained"] and skip["trained"]:
    text += (f"; after {rc['num_steps']} training steps pure attention is at "
             f"{last(pure['trained'])}, attention + skip at {last(skip['trained'])}")
  text += (f". Uniform causal attention U (U_ts = 1/(t+1), eigenvalues 1, 1/2, 1/3, ...) applied "
           f"{depth} times to the same embeddings leaves {_g(rc['uniform_causal_reference'][-1])}. "
           f"Without the causal mask the same weights give pure attention "
           f"{last(pure['init_bidirectional'])} and attention + skip "
           f"{last(skip['init_bidirectional'])} at layer {depth}.")
  yes = lambda b: "yes" if b else "no"
  rows = [[name, yes(r["switches"]["residual"]), yes(r["switches"]["mlp"]),
           yes(r["switches"]["layernorm"]), f"{r['params']:,}", _g(r["init"]["fro"][1]),
           _g(r["init"]["fro"][depth // 2]), last(r["init"]), _g(r["init"]["composite"][-1]),
           last(r["init_bidirectional"]), last(r["trained"]),
           reports.fmt(r["init"]["val_nll"], ".3f"),
           reports.fmt(r["trained"] and r["trained"]["val_nll"], ".3f")] for name, r in arch.items()]
  table = reports.markdown_table(
      ["architecture", "residual", "MLP", "LayerNorm", "params", "layer 1", f"layer {depth // 2}",
       f"layer {depth}", f"layer {depth} composite", f"layer {depth} no mask",
       f"layer {depth} trained", "val NLL init", "val NLL trained"], rows, "lccc" + "r" * 9)
  notes = (f"Columns without 'trained' are at initialization. Trained: causal next-token "
           f"prediction, {rc['num_steps']} steps of batch {rc['batch_size']}, lr "
           f"{rc['learning_rate']:g}. RMS entry of the stream at layer {depth} at init: "
           + ", ".join(f"{n} {r['init']['rms'][-1]:.2g}" for n, r in arch.items())
           + " (without skip connections or LayerNorm every layer rescales the stream, so "
           "scale-free relative residuals are reported).")
  return ["## Rank collapse with depth (Dong et al. 2021)", "", text, "", *table, "", notes]


def _learning_rate_report(results: dict) -> list[str]:
  runs = results["runs"]
  normal, high = runs["causal"], runs["causal_high_lr"]
  rows = []
  for name, run in (("normal", normal), ("high", high)):
    s0, s1 = run["snapshots"][0], run["snapshots"][-1]
    rows.append([name, f"{run['learning_rate']:g}", run["warmup_steps"],
                 reports.fmt(run["diverged_at"], "d"), s1["step"],
                 f"{_layer_means(s0, 'mean_row_entropy')[0]:.3f} -> "
                 f"{_layer_means(s1, 'mean_row_entropy')[0]:.3f}",
                 f"{np.mean(s1['mean_row_entropy']):.3f}",
                 f"{np.max(s0['qk_norm']):.3g} -> {np.max(s1['qk_norm']):.3g}",
                 _g(s1["zhai_bound"] and float(np.mean(s1["zhai_bound"]))),
                 reports.fmt(s1["val_nll"], ".4f")])
  h_normal, h_high = (_layer_means(r["snapshots"][-1], "mean_row_entropy")[0]
                      for r in (normal, high))
  t = results["config"]["seq_len"]
  lines = ["## Learning rate and attention entropy (Zhai et al. 2023)", "",
           f"At step {high['snapshots'][-1]['step']} the high learning rate has brought the first "
           f"layer's attention entropy (mean over heads) to {h_high:.3f} nats against "
           f"{h_normal:.3f} at the normal rate (uniform causal attention: "
           f"{uniform_causal_entropy(t):.3f}); its largest sigma is "
           f"{np.max(high['snapshots'][-1]['qk_norm']):.3g} against "
           f"{np.max(normal['snapshots'][-1]['qk_norm']):.3g}, and its val NLL "
           f"{reports.fmt(high['snapshots'][-1]['val_nll'], '.4f')} against "
           f"{reports.fmt(normal['snapshots'][-1]['val_nll'], '.4f')} nats (entropy_lr.png).", "",
           *reports.markdown_table(["lr", "peak", "warmup", "diverged at", "step",
                                   "entropy layer 1 (init -> end)", "entropy, all layers (end)",
                                   "largest sigma (init -> end)", "Zhai bound (end)", "val NLL"],
                                  rows)]
  slacks = [s["zhai_slack_min"] for r in runs.values() for s in r["snapshots"]
            if s["zhai_slack_min"] is not None]
  if slacks:
    first = normal["snapshots"][0]
    lines += ["", f"The Zhai et al. bound is evaluated on the exact logits and holds on every row "
              f"(smallest measured entropy - bound over all runs, snapshots and rows, causal row 0 "
              f"excluded: {min(slacks) + 0.0:.3g} nats"
              + ("; 0 on rows collapsed onto one position, where entropy and bound are both 0"
                 if min(slacks) < 1e-6 else "")
              + f"). It is loose: at initialization (causal) it is "
              f"{np.mean(first['zhai_bound']):.3f} nats against a measured "
              f"{np.mean(first['mean_row_entropy']):.3f}, and once sigma ||X||_2^2 grows "
              "(||X||_2^2 of LayerNorm-ed inputs is of order T d) it falls to ~0 and no longer "
              "constrains the entropy: the collapse it warns of is seen in sigma, not in the "
              "bound."]
  return lines


def _dynamics_report(results: dict) -> list[str]:
  """The causal run's dynamics per layer at its first and last log-spaced checkpoint, in words."""
  dyn = results["runs"]["causal"].get("dynamics")
  lines = ["## Over training, from the log-spaced checkpoints", ""]
  if not dyn:
    return lines + ["The causal run kept no log-spaced checkpoints (checkpoint_schedule='rolling' "
                    "when it was trained): no dynamics."]
  steps = dyn["steps"]
  pair = lambda key, l, spec: f"{dyn[key][0][l]:{spec}} -> {dyn[key][-1][l]:{spec}}"
  layers = [f"layer {l + 1}: normalized entropy {pair('mean_normalized_row_entropy', l, '.3f')}, "
            f"effective rank {pair('effective_rank', l, '.2f')}, spectral gap "
            f"{pair('spectral_gap', l, '.3f')}, sink mass {pair('sink_mass', l, '.3f')}"
            for l in range(len(dyn["effective_rank"][0]))]
  return lines + [
      f"Causal run, analysed after training at each of its {len(steps)} log-spaced checkpoints "
      f"(steps {', '.join(map(str, steps))}; dynamics.png), means over heads, step {steps[0]} -> "
      f"step {steps[-1]}: " + "; ".join(layers) + "."]


_PER_LAYER = (("entropy (nats)", "mean_row_entropy", ".3f"),
              ("normalized entropy", "mean_normalized_row_entropy", ".3f"),
              ("spectral gap", "spectral_gap", ".3f"),
              ("abs lambda_2", "second_eigenvalue_modulus", ".3f"),
              ("effective rank", "effective_rank", ".1f"), ("sink mass", "sink_mass", ".3f"),
              ("stationary pi_0", "stationary_sink_mass", ".3f"))


def _spectra_report(results: dict) -> list[str]:
  runs = results["runs"]
  lines = ["## Spectra of the trained models", "",
           "Causal attention is lower-triangular, so its eigenvalues are exactly its diagonal A_tt "
           "(real, in [0, 1], A_00 = 1) and its stationary distribution is e_0: the chain drains "
           "into position 0. Its spectral gap is 1 - max_{t>=1} A_tt. Bidirectional (masked-LM) "
           "attention is a general stochastic matrix with complex eigenvalues.", ""]
  if results.get("entropy_rate_nats") is not None:
    lines += [f"The source's entropy rate is {results['entropy_rate_nats']:.4f} nats/token "
              "(next-token val NLL scores contexts 1..T, so it stays above it).", ""]
  lines += ["Per layer (means over heads and analysed windows), initialization -> end:", ""]
  rows = []
  if results.get("per_layer_seeds"):
    lines[-2] = (f"Per layer (means over heads and analysed windows), initialization -> end; mean "
                 f"over {results['n_seeds']} seeds ± the half-width of its Student-t 95% interval:")
    for name, ends in results["per_layer_seeds"].items():
      for l, (s0, s1) in enumerate(zip(ends["first"]["layers"], ends["last"]["layers"])):
        pair = lambda key, spec: (f"{reports.pm(s0, key, spec)} -> {reports.pm(s1, key, spec)}"
                                  if key in s1 else "n/a")
        rows.append([name, l + 1, *(pair(key, spec) for _, key, spec in _PER_LAYER),
                     pair("qk_norm", ".3g"), pair("zhai_bound", ".3f")])
    runs = {}
  for name, run in runs.items():
    s0, s1 = run["snapshots"][0], run["snapshots"][-1]
    pair = lambda key, spec, l: f"{np.mean(s0[key][l]):{spec}} -> {np.mean(s1[key][l]):{spec}}"
    for l in range(len(s1["mean_row_entropy"])):
      rows.append([name, l + 1, *(pair(key, spec, l) for _, key, spec in _PER_LAYER),
                   f"{np.max(s0['qk_norm'][l]):.3g} -> {np.max(s1['qk_norm'][l]):.3g}",
                   pair("zhai_bound", ".3f", l) if s1["zhai_bound"] is not None else "n/a"])
  lines += reports.markdown_table(["run", "layer", *(h for h, _, _ in _PER_LAYER),
                                  "sigma (max head)", "Zhai bound"], rows)
  return lines


def report(results: dict) -> str:
  """results.md: the key numbers in words, then tables (from results.json alone)."""
  runs = results["runs"]
  lines = [f"# Attention spectra: {results['data']}", "",
           *_rank_collapse_report(results["rank_collapse"]), "", *_learning_rate_report(results),
           "", *_dynamics_report(results), "", *_spectra_report(results), "",
           "Protocol: " + "; ".join(f"{k}: {v}" for k, v in results["protocol"].items()
                                    if isinstance(v, str)) + ".", "",
           "Runs: " + "; ".join(
               f"{n}: {r['num_steps']} steps, batch {r['batch_size']}, lr "
               f"{r['learning_rate']:g} -> {r['min_learning_rate']:g}, warmup {r['warmup_steps']}, "
               f"{r['params']:,} params, {reports.fmt(r['wall_time_s'], '.0f')} s"
               for n, r in runs.items())
           + f". This command: {results['wall_time_s']:.0f} s."]
  return "\n".join(lines) + "\n"
