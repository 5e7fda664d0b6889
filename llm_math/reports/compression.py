"""results.md of the compression study (`llm_math.studies.compression`), from its results.json:
every table and the sentences the numbers support."""

import math

from llm_math.reports import fields
from llm_math.reports import fmt
from llm_math.reports import markdown_table
from llm_math.reports import pm
from llm_math.reports import seeds_caption


def _caption(ev: dict) -> str:
  return (f"{ev['split']} split of {ev['data']}: {ev['tokens_scored']:,} tokens scored, windows of "
          f"{ev['seq_len']} moved by {ev['stride']}, context {ev['context_min']}-"
          f"{ev['context_max']} tokens (mean {ev['context_mean']:.1f})")


def _references_line(what: str, refs: dict) -> str:
  return f"{what}: " + ", ".join(f"{k} {pm(refs, k, '.4f')} nats (ppl {math.exp(v):.3f})"
                                 for k, v in fields(refs).items()) + "."


def _pct(r: dict) -> str:
  return pm(r, "ppl_change_pct", "+.2f") + "%"


def _svd_section(s: dict, base: dict) -> list[str]:
  recs = s["records"]
  rows = [[r["method"], f"{r['setting']:g}", f"{r['singular_values_kept']:.3f}",
           f"{r['energy_kept']:.4f}", f"{r['relative_error']:.4f}",
           f"{r['params_factored'] / r['params_dense']:.3f}", pm(r, "val_nll", ".4f"),
           pm(r, "val_ppl", ".3f"), _pct(r)] for r in recs]
  lines = ["", "## Perplexity vs rank (SVD truncation)", "",
           f"Matrices `{s['pattern']}` ({len(s['spectra'])} of them) replaced by their best rank-r "
           "approximation; 'uniform' keeps the same fraction of min(in, out) in every matrix, "
           "'global energy' keeps the largest singular values over all matrices until that share "
           "of sum s^2. Stored as factors they would take r (in + out) numbers.", ""]
  lines += markdown_table(
      ["method", "setting", "singular values kept", "energy kept", "rel. Frobenius error",
       "factored / dense params", "val NLL", "perplexity", "PPL change"], rows, "lrrrrrrrr")
  uniform = sorted((r for r in recs if r["method"] == "uniform"), key=lambda r: r["setting"])
  within = [r for r in recs if r["ppl_change_pct"] is not None and r["ppl_change_pct"] <= 1.0]
  if uniform:
    lo, hi = uniform[0], uniform[-1]
    lines += ["", f"Perplexity falls from {fmt(lo['val_ppl'], '.3f')} at rank fraction "
              f"{lo['setting']:g} to {fmt(hi['val_ppl'], '.3f')} at {hi['setting']:g} "
              f"(float {base['val_ppl']:.3f})."]
  if within:
    r = min(within, key=lambda r: r["params_factored"])
    lines.append(f"The fewest factored parameters within 1% of float: {r['method']} "
                 f"{r['setting']:g}, {r['singular_values_kept']:.1%} of the singular values, "
                 f"{r['params_factored']:,} vs {r['params_dense']:,} dense ({_pct(r)}).")
  return lines


def _quant_section(q: dict, base: dict) -> list[str]:
  rows = [[r["scheme"], f"{r['bits_per_param']:.3f}", f"{r['bytes']:,}", f"{r['model_bytes']:,}",
           f"{r['relative_error']:.4f}", pm(r, "val_nll", ".4f"), pm(r, "val_ppl", ".3f"),
           _pct(r)] for r in q["records"]]
  lines = ["", "## Perplexity vs quantization scheme", "",
           f"Symmetric absmax round-to-nearest of the {q['params_quantized']:,} parameters in "
           f"`{q['pattern']}` (of {q['params_total']:,}; the rest stay float32), scales stored as "
           f"{q['scale_dtype']} and counted in bits/param; dequantized on load.", ""]
  lines += markdown_table(["scheme", "bits/param", "quantized bytes", "model bytes",
                                  "rel. weight error", "val NLL", "perplexity", "PPL change"], rows)
  by = {r["scheme"]: r for r in q["records"]}
  if "int8-per_channel" in by:
    r = by["int8-per_channel"]
    within = "within" if abs(r["ppl_change_pct"]) <= 1.0 else "NOT within"
    lines += ["", f"int8 per-channel: perplexity {r['val_ppl']:.3f} vs float {base['val_ppl']:.3f} "
              f"({r['ppl_change_pct']:+.3f}%), {within} 1% of float, at "
              f"{r['bits_per_param']:.3f} bits/param ({32 / r['bits_per_param']:.1f}x smaller)."]
  int4 = [r for r in q["records"] if r["bits"] == 4]
  if int4:
    lines += ["", "int4 RTN costs " + "; ".join(
        f"{r['scheme']} {_pct(r)} perplexity ({r['val_nll'] - base['val_nll']:+.4f} nats) at "
        f"{r['bits_per_param']:.3f} bits/param" for r in int4) + "."]
  return lines


def _lora_section(lo: dict, data: str) -> list[str]:
  changes = lo.get("target_changes")
  rows = [[r["name"], f"{r['trainable_params']:,}",
           f"{100 * r['trainable_params'] / lo['params_total']:.2f}%",
           (f"{r['adapted_params'] / r['trainable_params']:.0f}x ({r['adapted_matrices']} matrices)"
            if r["kind"] == "lora" else "-"),
           fmt(r.get("share_of_full_gain"), ".0%"), pm(r, "val_nll", ".4f"),
           pm(r, "val_ppl", ".3f")] for r in lo["runs"]]
  lines = ["", "## LoRA transfer: quality vs rank", "",
           f"Pretrained on {data}, fine-tuned on {lo['target']}"
           + ("; changed: " + ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changes.items())
              if changes else "")
           + f"; {lo['num_steps']} steps, the same batches for every run. LoRA adapts "
           f"`{lo['targets']}` with W + (alpha/r) a b, alpha = {lo['alpha']:g}; full fine-tuning "
           f"trains all {lo['params_total']:,} parameters.",
           f"Measured on the {_caption(lo['evaluation'])}.",
           _references_line("Target references", lo["references"]), ""]
  lines += markdown_table(["run", "trainable params", "% of full",
                                  "adapted matrices' params / trainable",
                                  "share of full FT's gain", "val NLL", "perplexity"], rows)
  runs = {r["kind"]: r for r in lo["runs"] if r["kind"] != "lora"}
  loras = [r for r in lo["runs"] if r["kind"] == "lora"]
  full = runs["full"]
  if loras:
    best = min(loras, key=lambda r: r["val_nll"])
    lines += ["", f"The share of full fine-tuning's NLL gain is (no FT - LoRA) / (no FT - full FT), "
              f"from {runs['none']['val_nll']:.4f} to {full['val_nll']:.4f} nats. The best LoRA "
              f"(r={best['rank']}, {best['val_nll']:.4f} nats) trains "
              f"{full['trainable_params'] / best['trainable_params']:.0f}x fewer parameters than "
              f"full fine-tuning and is {best['val_nll'] - full['val_nll']:+.4f} nats from it."]
  if "scratch" in runs:
    sc = runs["scratch"]
    lines += ["", f"The same architecture trained from scratch on the target for the same "
              f"{lo['num_steps']} steps reaches {sc['val_nll']:.4f} nats vs {full['val_nll']:.4f} "
              f"for full fine-tuning ({sc['val_nll'] - full['val_nll']:+.4f} nats; one seed each, "
              "so a gap of a few hundredths of a nat is within what another seed can change)."]
  return lines


def _distill_section(d: dict) -> list[str]:
  summary, n_seeds = d["summary"], len(d["seeds"])
  scratch_name = next(k for k, m in summary.items() if m["alpha"] == 0)
  m = d["student_model"]
  rows = [[f"teacher ({d['teacher_params']:,} params)", "-", "-", f"{d['teacher']['val_nll']:.4f}",
           f"{d['teacher']['val_ppl']:.3f}", "-", "-", "-"]]
  for name, s in summary.items():
    paired = name != scratch_name
    rows.append([f"student, {name}", f"{s['alpha']:g}", f"{s['temperature']:g}" if paired else "-",
                 f"{s['val_nll_mean']:.4f} ({s['val_nll_min']:.4f}-{s['val_nll_max']:.4f})",
                 f"{s['val_ppl_mean']:.3f}",
                 ", ".join(f"{x:+.4f}" for x in s["minus_scratch_per_seed"]) if paired else "-",
                 f"{s['minus_scratch_mean']:+.4f}" if paired else "-",
                 f"{s['seeds_better_than_scratch']}/{n_seeds}" if paired else "-"])
  lines = ["", "## Distillation vs training from scratch", "",
           f"Student {d['student_params']:,} parameters ({m['num_layers']} layer(s), d_model "
           f"{m['d_model']}, {m['num_heads']} heads, d_ff {m['d_ff']}), teacher = the base model. "
           f"For each of {n_seeds} seeds (student initialization and batch order) every student "
           f"starts from the same initialization and sees the same {d['num_steps']} batches with "
           f"the same optimizer; distilled students minimize alpha T^2 KL(teacher_T || student_T) "
           f"+ (1 - alpha) CE with alpha = {d['alpha']:g}, the scratch student CE alone. "
           "Differences are paired by seed.", ""]
  lines += markdown_table(
      ["model", "alpha", "T", "val NLL, mean over seeds (min-max)", "perplexity at mean NLL",
       "NLL - scratch, per seed", "mean NLL - scratch", "seeds better than scratch"], rows)
  distilled = {k: s for k, s in summary.items() if k != scratch_name}
  name, best = min(distilled.items(), key=lambda kv: kv[1]["val_nll_mean"])
  better = best["seeds_better_than_scratch"]
  verdict = "better than" if better == n_seeds else "worse than" if better == 0 else "mixed against"
  reach = next((step for step, v in zip(best["steps"], best["curve_mean"])
                if v <= summary[scratch_name]["val_nll_mean"]), None)
  lines += ["", f"After {d['num_steps']} steps the best distilled student ({name}) is at "
            f"{best['val_nll_mean']:.4f} nats (mean of {n_seeds} seeds) vs "
            f"{summary[scratch_name]['val_nll_mean']:.4f} from scratch: "
            f"{best['minus_scratch_mean']:+.4f} nats, {verdict} scratch ({better}/{n_seeds} seeds "
            f"lower; teacher {d['teacher']['val_nll']:.4f})"
            + (f"; its mean curve reached scratch's final loss by step {reach}." if reach is not None
               else ".")]
  return lines


def report(results: dict) -> str:
  """results.md: every table and the sentences the numbers support."""
  ev, base = results["evaluation"], results["base"]
  lines = [f"# Compression of a Transformer LM: {ev['data']}", "",
           f"Base model: {base['params']:,} parameters, {base['origin']}, step {base['step']}; "
           f"float32 validation NLL {pm(base, 'val_nll', '.4f')} nats, perplexity "
           f"{pm(base, 'val_ppl', '.3f')}.",
           f"Measured on the {_caption(ev)}.",
           *([seeds_caption(results)] if seeds_caption(results) else []),
           _references_line("References on the same tokens", results["references"])]
  if "svd" in results:
    lines += _svd_section(results["svd"], base)
  if "quant" in results:
    lines += _quant_section(results["quant"], base)
  if "lora" in results:
    lines += _lora_section(results["lora"], ev["data"])
  if "distill" in results:
    lines += _distill_section(results["distill"])
  lines += ["", f"Wall time: {results['wall_time_s']:.0f} s (" + ", ".join(
      f"{k} {v:.0f} s" for k, v in fields(results["timings_s"]).items()) + ")."]
  return "\n".join(lines) + "\n"
