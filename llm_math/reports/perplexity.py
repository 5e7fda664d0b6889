"""results.md of the perplexity study (`llm_math.studies.perplexity`), from its results.json."""

from llm_math.reports import fmt
from llm_math.reports import markdown_table
from llm_math.reports import measurement_caption


def ngram_caption(evaluation: dict) -> str:
  """Which training tokens the n-grams were counted on (evaluation's train_tokens and
  ngram_train_tokens), for the table's caption."""
  used, total = evaluation["ngram_train_tokens"], evaluation["train_tokens"]
  if used == total:
    return f"n-grams counted on all {total:,} training tokens"
  return (f"n-grams counted on the first {used:,} of {total:,} training tokens "
          f"(ngram.max_train_tokens)")


def report(results: dict) -> str:
  """A table per tokenizer (every record: NLL, perplexity, bits/token, bits/char, and the excess
  over the floor on the synthetic source), the best neural against the best count-based model, and
  the fitted power laws."""
  lines = [f"# Perplexity: {results['data']}", ""]
  for tokenizer, ev in results["evaluations"].items():
    recs = [r for r in results["records"] if r["tokenizer"] == tokenizer]
    floor = next((r["val_nll_nats"] for r in recs if r["name"].startswith("floor")), None)
    grams = (f"; {ngram_caption(ev)}" if "ngram_train_tokens" in ev
             and any(r["kind"] == "ngram" for r in recs) else "")
    lines += [f"## Tokenizer: {tokenizer} (|V| = {ev['vocab_size']})", "",
              f"Measured on the {measurement_caption(ev)}; "
              f"{ev['chars_scored']:,} characters{grams}.", ""]
    header = ["model", "params", "train FLOPs", "val NLL (nats/token)", "perplexity", "bits/token",
              "bits/char"] + (["NLL - floor"] if floor is not None else [])
    lines += markdown_table(header, [
        [r["name"], f"{r['params']:,}", fmt(r.get("train_flops"), ".3g"),
         f"{r['val_nll_nats']:.4f}", f"{r['val_ppl']:.3f}", f"{r['bits_per_token']:.4f}",
         f"{r['bits_per_char']:.4f}"]
        + ([f"{r['val_nll_nats'] - floor:+.4f}"] if floor is not None else []) for r in recs])
    lines.append("")
    for r in recs:
      if r["kind"] == "model":
        lines.append(f"- {r['name']}: {r['train_steps']} steps, {r['train_tokens']:,} training "
                     f"tokens, {r['flops_per_token']:.3g} FLOPs/token (6N + 12LTd), "
                     f"{r['tokens_per_s']:,.0f} tokens/s, {r['wall_time_s']:.0f} s wall.")
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
    lines += [f"Best neural model ({m['name']}, {m['bits_per_char']:.4f} bits/char) {verdict} the best "
              f"count-based model ({n['name']}, {n['bits_per_char']:.4f} bits/char).", ""]
  for tokenizer, fit in results.get("power_law", {}).items():
    p, c = fit["params"], fit["compute"]
    lines += [f"Power law ({tokenizer}): L(N) = {p['a']:.3g} N^-{p['alpha']:.3f} + {p['c']:.3f} "
              f"nats; L(C) = {c['a']:.3g} C^-{c['alpha']:.3f} + {c['c']:.3f} nats."]
    if p["c"] == 0.0:
      lines.append("The fitted irreducible loss c sits at its bound 0: the points show no flattening "
                   "over this range, so c is not identified and L(N) is a pure power law here.")
    lines.append("")
  return "\n".join(lines) + "\n"
