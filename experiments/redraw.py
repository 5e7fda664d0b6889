"""Redraws a finished study's figures and results.md from its results.json alone (no JAX, no training).

  python -m experiments.redraw --workdir=DIR

DIR is the --workdir of any study (experiments/perplexity.py, batch_size.py, attention_spectra.py,
compression.py, embeddings.py, stability.py, scaling_law.py); the study is read from results.json.
"""

import argparse
import sys

from llm_math import figures
from llm_math import files
from llm_math import reports


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="The --workdir of a finished study.")
  args = parser.parse_args(argv)
  path = files.path(args.workdir) / "results.json"
  if not path.exists():
    print(f"error: --workdir={args.workdir}: no results.json (run the study first)", file=sys.stderr)
    sys.exit(2)
  results = files.read_json(path)
  if "experiment" not in results:
    print(f"error: {path}: not a study's results (no 'experiment' field)", file=sys.stderr)
    sys.exit(2)
  results["figures"] = figures.draw(results, args.workdir)
  files.write_json(path, results)
  files.write_text(files.path(args.workdir) / "results.md", reports.report(results))
  print(f"wrote results.md, {', '.join(results['figures'])} to {args.workdir}")


if __name__ == "__main__":
  main()
