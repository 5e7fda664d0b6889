"""results.md of the perplexity study (`llm_math.studies.perplexity`), from its results.json."""

from llm_math.reports import fmt
from llm_math.reports import markdown_table
from llm_math.reports import measurement_caption
from llm_math.reports import pm
from llm_math.reports import seeds_caption


def ngram_caption(evaluation: dict) -> str:
  """Which training tokens the n-grams were counted on (evaluation's train_tokens and
  ngram_train_tokens), for the table's caption."""
  used, total = evaluation["ngram_train_tokens"], evaluation["train_tokens"]
  if used == total:
    return f"n-grams counted on all {total:,} training tokens"
  return (f"n-grams counted on the first {used:,} of {total:,} training tokens "
          f"(ngram.max_train_tokens)")


def _paired(results: dict) -> list[str]:
  """The paired comparisons over seeds (results["paired"], `studies.perplexity.paired_comparisons`)."""
  rows = [[p["tokenizer"], p["a"], p["b"], pm({"d": p["mean"], "d_ci95": p["ci95"]}, "d", "+.4f"),
           f"{p['below']}/{p['n']}"] for p in results.get("paired") or []]
  if not rows:
    return []
  return (["**Paired comparisons over seeds** (validation NLL of A - B, nats/token, on the same "
           "seeds: seed-to-seed variation both share drops out of the interval):", ""]
          + markdown_table(["tokenizer", "A", "B", "A - B", "seeds A < B"], rows, "lllrr") + [""])


def _power_laws(results: dict) -> list[str]:
  """The fitted L(N) and L(C) with their intervals and notes."""
  lines = []
  for tokenizer, fit in results.get("power_law", {}).items():
    p, c = fit["params"], fit["compute"]
    if p["alpha"] is None:
      lines += [f"Power law ({tokenizer}): {p['note']}.", ""]
      continue
    lines += [f"Power law ({tokenizer}), L = a X^-alpha + c with 95% intervals:", "",
              *markdown_table(["X", "a", "alpha", "c (nats)", "rms log residual"], [
                  [axis, pm(f, "a", ".3g"), pm(f, "alpha", ".3f"), pm(f, "c", ".3f"),
                   pm(f, "rms_log_residual", ".4f")]
                  for axis, f in (("N (params)", p), ("C (train FLOPs)", c))]), ""]
    if p.get("points"):
      lines.append(f"- Fitted on {p['points']}; intervals from resampling those points.")
    for axis, f in (("L(N)", p), ("L(C)", c)):
      if f.get("note"):
        lines.append(f"- {axis}: {f['note']}.")
    if p["c"] == 0.0:
      lines.append("- The fitted irreducible loss c sits at its bound 0: the points show no "
                   "flattening over this range, so c is not identified and L(N) is a pure power law "
                   "here.")
    lines.append("")
  return lines


def report(results: dict) -> str:
  """A table per tokenizer (every record: NLL, perplexity, bits/token, bits/char, bits/byte, and the
  excess over the floor on the synthetic source; with intervals over seeds for an aggregate), the
  best neural against the best count-based model, the paired comparisons over seeds, and the fitted
  power laws with their intervals."""
  lines = [f"# Perplexity: {results['data']}", ""]
  if seeds_caption(results):
    lines += [seeds_caption(results), ""]
  for tokenizer, ev in results["evaluations"].items():
    recs = [r for r in results["records"] if r["tokenizer"] == tokenizer]
    floor = next((r["val_nll_nats"] for r in recs if r["name"].startswith("floor")), None)
    grams = (f"; {ngram_caption(ev)}" if "ngram_train_tokens" in ev
             and any(r["kind"] == "ngram" for r in recs) else "")
    size = f"{ev['chars_scored']:,} characters" + (
        f", {ev['bytes_scored']:,} UTF-8 bytes" if "bytes_scored" in ev else "")
    lines += [f"## Tokenizer: {tokenizer} (|V| = {ev['vocab_size']})", "",
              f"Measured on the {measurement_caption(ev)}; {size}{grams}.", ""]
    header = ["model", "params", "train FLOPs", "val NLL (nats/token)", "perplexity", "bits/token",
              "bits/char", "bits/byte"] + (["NLL - floor"] if floor is not None else [])
    lines += markdown_table(header, [
        [r["name"], f"{r['params']:,.0f}", fmt(r.get("train_flops"), ".3g"),
         pm(r, "val_nll_nats", ".4f"), pm(r, "val_ppl", ".3f"), pm(r, "bits_per_token", ".4f"),
         pm(r, "bits_per_char", ".4f"), pm(r, "bits_per_byte", ".4f")]
        + ([f"{r['val_nll_nats'] - floor:+.4f}"] if floor is not None else []) for r in recs])
    lines.append("")
    for r in recs:
      if r["kind"] == "model":
        lines.append(f"- {r['name']}: {r['train_steps']} steps, {r['train_tokens']:,} training "
                     f"tokens, {r['flops_per_token']:.3g} FLOPs/token (6N + 12LTd), "
                     f"{r['tokens_per_s']:,.0f} tokens/s, {r['wall_time_s']:.0f} s wall"
                     + (" (means over seeds)." if results.get("n_seeds") else "."))
    lines.append("")
  best = {}
  for r in results["records"]:
    if r["kind"] in ("ngram", "model", "baseline"):
      key = "model" if r["kind"] == "model" else "ngram"
      if key not in best or r["bits_per_char"] < best[key]["bits_per_char"]:
        best[key] = r
  if "model" in best and "ngram" in best:
    m, n = best["model"], best["ngram"]
    verdict = "beats" if m["bits_per_char"] < n["bits_per_char"] else "does not beat"
    lines += [f"Best neural model ({m['name']}, {pm(m, 'bits_per_char', '.4f')} bits/char) {verdict} "
              f"the best count-based model ({n['name']}, {pm(n, 'bits_per_char', '.4f')} "
              "bits/char).", ""]
  lines += _paired(results) + _power_laws(results)
  return "\n".join(lines) + "\n"
