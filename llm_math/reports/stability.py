"""results.md of the stability study (`llm_math.studies.stability`), from its results.json."""

from llm_math.reports import fmt
from llm_math.reports import interval
from llm_math.reports import markdown_table
from llm_math.reports import measurement_caption


def logit_growth_runs(results: dict) -> dict:
  """The runs logit_growth.png draws: the largest size, seed of the first run, at the highest
  learning rate whose baseline finished (the highest of all when none did): {variant: run}."""
  largest = max(results["summary"], key=lambda s: s["params"])["size"]
  seed = results["runs"][0]["seed"]
  mine = [r for r in results["runs"] if r["size"] == largest and r["seed"] == seed]
  finished = [r["learning_rate"] for r in mine if r["variant"] == "baseline" and not r["diverged"]]
  lr = max(finished) if finished else max(r["learning_rate"] for r in mine)
  return {r["variant"]: r for r in mine if r["learning_rate"] == lr}


def report(results: dict) -> str:
  summary = results["summary"]
  lrs = summary[0]["learning_rates"]
  lines = ["# Training stability: learning-rate sweeps with and without qk-layernorm and z-loss", "",
           f"Data: {results['data']}. Final validation NLL (nats/token) after "
           f"{results['config']['num_steps']} steps, mean over seeds; "
           f"{measurement_caption(results['evaluation'])}. L0 = ln|V| = "
           f"{results['initial_loss']:.3f}"
           + (f"; floor (true model) {results['references']['floor']:.3f}"
              if results["references"].get("floor") is not None else "") + ".", ""]
  rows = []
  for s in summary:
    cells = [fmt(v, ".3f") + (f" ({d} div.)" if d else "")
             for v, d in zip(s["final_val_nll"], s["diverged"])]
    rows.append([s["size"], f"{s['params']:,}", s["variant"], *cells,
                 fmt(s["best_learning_rate"], "g"), interval(s["lr_sensitivity"])])
  lines += markdown_table(["size", "params", "variant", *[f"lr {lr:g}" for lr in lrs], "best lr",
                           "LR sensitivity (95% CI)"], rows, "lrl" + "r" * (len(lrs) + 2))
  runs = logit_growth_runs(results)
  lines += ["", "At the highest learning rate the largest baseline finished "
            f"(lr {next(iter(runs.values()))['learning_rate']:g}): the last logged statistics.", ""]
  rows = [[v, fmt(r["final_val_nll"], ".3f"), fmt(r["curves"]["attn_logit_max"][-1], ".2f")
           if r["curves"]["step"] else "-",
           fmt(r["curves"]["attn_entropy"][-1], ".3f") if r["curves"]["step"] else "-",
           fmt(r["curves"]["log_z_mean"][-1], ".3f") if r["curves"]["step"] else "-"]
          for v, r in runs.items()]
  lines += markdown_table(["variant", "final val NLL", "max attention logit",
                           "attention entropy (nats)", "output log Z"], rows)
  lines += ["", f"{len(results['runs'])} runs; this command took {results['wall_time_s'] / 60:.1f} "
            "min (runs an earlier command made are reused, not retrained)."]
  return "\n".join(lines) + "\n"
