"""results.md of the embeddings study (`llm_math.studies.embeddings`), from its results.json."""

from llm_math.reports import markdown_table

# Tokens whose neighbours results.md lists (when the vocabulary has them).
SHOWN = tuple("aeiouAEIOUtsnh") + (" ", "\n", ".", ",", "!", "?", "'", ":")


def summary(results: dict) -> str:
  """The key numbers in words: spectrum, lowercase-vowel neighbours, case analogies."""
  tr, init = results["trained"], results["initialization"]
  words = [f"Training lowered the variance effective rank of the centred embedding from "
           f"{init['spectrum']['variance_effective_rank']:.1f} to "
           f"{tr['spectrum']['variance_effective_rank']:.1f} "
           f"(of {len(tr['spectrum']['singular_values'])}); the top two principal axes hold "
           f"{100 * tr['spectrum']['top2_variance_share']:.0f}% of the variance "
           f"({100 * init['spectrum']['top2_variance_share']:.0f}% at initialization)."]
  purity = tr["class_purity"]
  if "lowercase vowel" in purity:
    p = purity["lowercase vowel"]
    words.append(f"Of each lowercase vowel's {results['num_neighbors']} nearest neighbours, "
                 f"{100 * p['same_class_share']:.0f}% are lowercase vowels (chance "
                 f"{100 * p['chance']:.0f}%, initialization "
                 f"{100 * init['class_purity']['lowercase vowel']['same_class_share']:.0f}%).")
  case = tr["case"]
  if case and "lower_to_upper" in case:
    d = case["lower_to_upper"]
    words.append(f"The case analogy 'A' - 'a' + 'b' -> 'B' is solved top-1 in "
                 f"{100 * d['top1']:.0f}% of {d['analogies']} letter pairs (chance "
                 f"{100 * d['chance_top1']:.1f}%, initialization "
                 f"{100 * init['case']['lower_to_upper']['top1']:.1f}%, nearest-to-'b' baseline "
                 f"{100 * d['only_c_baseline']:.0f}%); case offsets have mean pairwise cosine "
                 f"{case['offset_mean_cosine']:.2f}.")
  return " ".join(words)


def _case_lines(results: dict, k: int) -> list[str]:
  c, ci = results["trained"]["case"], results["initialization"]["case"]
  rows = [["'A' is the nearest token to 'a'", f"{c['upper_is_nearest_to_lower']:.2f}",
           f"{ci['upper_is_nearest_to_lower']:.2f}", f"{c['chance_nearest']:.3f}"],
          [f"'A' among the {k} nearest to 'a'", f"{c['upper_in_top_k_of_lower']:.2f}",
           f"{ci['upper_in_top_k_of_lower']:.2f}", f"{k * c['chance_nearest']:.3f}"]]
  for direction, text, c_token in (("lower_to_upper", "'A' - 'a' + 'b' -> 'B'", "'b'"),
                                   ("upper_to_lower", "'a' - 'A' + 'B' -> 'b'", "'B'")):
    d, di = c[direction], ci[direction]
    rows += [[f"{text}, top-1 ({d['analogies']} analogies)", f"{d['top1']:.2f}",
              f"{di['top1']:.2f}", f"{d['chance_top1']:.3f}"],
             [f"{text}, top-{k}", f"{d['top_k']:.2f}", f"{di['top_k']:.2f}",
              f"{k * d['chance_top1']:.3f}"],
             [f"{text}, only-c baseline (nearest to {c_token})", f"{d['only_c_baseline']:.2f}",
              f"{di['only_c_baseline']:.2f}", f"{d['chance_top1']:.3f}"]]
  rows.append(["mean cosine between case offsets E['A'] - E['a']", f"{c['offset_mean_cosine']:.2f}",
               f"{ci['offset_mean_cosine']:.2f}", "0"])
  lines = ["", f"## Case ({c['pairs']} letters in both cases: {c['letters']})", ""]
  lines += markdown_table(["measure", "trained", "initialization", "chance"], rows)
  label = dict(zip(results["texts"], results["labels"]))
  examples = [[ex["query"], ex["want"],
               ", ".join(f"{label[t]} ({s:.2f})" for t, s in ex["answers"])]
              for ex in results["analogy_examples"]]
  return lines + [""] + markdown_table(["analogy", "expected", "top answers (cosine)"], examples,
                                       "lll")


def report(results: dict) -> str:
  """results.md: the tables and the key numbers in words."""
  labels = results["labels"]
  k = results["num_neighbors"]
  tr, init = results["trained"], results["initialization"]
  lines = [
      f"# Token embeddings of {results['workdir']} (step {results['step']})", "",
      f"E is {results['shape'][0]} x {results['shape'][1]} "
      f"({'tied: also the output layer' if results['tied'] else 'input embedding only'}); "
      f"compared with the same matrix at initialization (seed {results['seed']}). "
      "Similarity is cosine.", "",
      "## Spectrum", ""]
  rows = []
  for name, r in (("trained", tr), ("initialization", init)):
    s = r["spectrum"]["singular_values"]
    rows.append([name, f"{r['spectrum']['variance_effective_rank']:.1f} of {len(s)}",
                 f"{r['spectrum']['top2_variance_share']:.3f}",
                 f"{s[0] / s[min(9, len(s) - 1)]:.2f}", f"{r['norm_mean']:.3f}"])
  lines += markdown_table(["matrix", "variance effective rank exp(H(s^2/sum s^2))",
                           "top-2 PCA variance share", "s_1 / s_10", "mean row norm"], rows)
  lines += ["", f"## Classes: share of each token's {k} nearest neighbours in its own class", ""]
  lines += markdown_table(
      ["class", "tokens", "trained", "initialization", "chance"],
      [[name, r["tokens"], f"{r['same_class_share']:.2f}",
        f"{init['class_purity'][name]['same_class_share']:.2f}", f"{r['chance']:.2f}"]
       for name, r in tr["class_purity"].items()])
  if tr["case"] and "lower_to_upper" in tr["case"]:
    lines += _case_lines(results, k)
  lines += ["", f"## Nearest neighbours (trained, top {k}, cosine)", ""]
  index = {t: i for i, t in enumerate(results["texts"])}
  rows = []
  for t in SHOWN:
    if t in index:
      i = index[t]
      nb = ", ".join(f"{labels[j]} ({s:.2f})" for j, s in zip(tr["neighbors"]["index"][i],
                                                               tr["neighbors"]["cosine"][i]))
      rows.append([labels[i], results["classes"][i], nb])
  lines += markdown_table(["token", "class", "neighbours"], rows, "lll")
  lines += ["", "## In words", "", summary(results)]
  return "\n".join(lines) + "\n"
