r"""Tokenizes a corpus once into memory-mappable token files (`llm_math.token_store`).

  python -m experiments.prepare_data --data=text:../shared/data/tinyshakespeare.txt --tokenizer=char \
      --out=/tmp/tokens/shakespeare_char
  python -m experiments.prepare_data --data=text:a.txt,b.txt --tokenizer=sentencepiece \
      --vocab_size=4000 --split=blocks:10:100000 --max_chars=100000000 --out=/tmp/tokens/ab_sp4000
  python -m experiments.prepare_data --data=tfds:tiny_shakespeare --tokenizer=byte \
      --tfds_data_dir=../shared/data/tfds --out=/tmp/tokens/shakespeare_tfds_byte
  python -m experiments.perplexity --workdir=/tmp/run --data=tokens:/tmp/tokens/shakespeare_char

--data is 'text:PATH[,PATH...]' (split by --split, 'tail' unless given) or 'tfds:NAME[/CONFIG]' (a
dataset prepared under --tfds_data_dir, split by its own 'train' and 'validation' (else 'test')
splits; --split does not apply). --max_chars reads at most that many characters: of the joined text
files before they are split, of each tfds split.

Writes train.bin, val.bin, their unigram counts (train.counts.npy, val.counts.npy), the tokenizer
and manifest.json (last) in --out. Running it again with the same source and settings returns at
once; a half-written --out (no manifest.json) is redone.
"""

import time

from absl import flags

from experiments import common
from llm_math import token_store
from llm_math.errors import UsageError

OUT = flags.DEFINE_string("out", None, "Directory for the token files (local disk).")
SPLIT = flags.DEFINE_string(
    "split", None, "For text: sources: 'tail' (the default: last 10% of characters is validation) "
    "or 'blocks:K:N' (every K-th block of N characters is validation). tfds: sources use their "
    "own splits.")
MAX_CHARS = flags.DEFINE_integer(
    "max_chars", None, "Read at most this many characters (text: of the joined files, before they "
    "are split; tfds: of each split). Unset or 0: all.")
SAMPLE_CHARS = flags.DEFINE_integer(
    "sample_chars", token_store.DEFAULT_SAMPLE_CHARS,
    "SentencePiece trains on at most about this many characters of the training split.")
WORKERS = flags.DEFINE_integer("workers", None,
                               "Tokenizing processes (default: cores - 1, at least 1).")


def summary(manifest: dict, wall_s: float) -> str:
  """The manifest in a few lines."""
  lines = [f"{manifest['source']} -> {manifest['tokenizer']['kind']} tokens "
           f"(vocab {manifest['tokenizer']['vocab_size']:,}, {manifest['dtype']}), split "
           f"{manifest['split']}"]
  for split in token_store.SPLITS:
    c = manifest["splits"][split]
    lines.append(f"  {split:5s} {c['tokens']:>15,} tokens {c['chars']:>15,} chars "
                 f"({c['chars'] / max(c['tokens'], 1):.3f} chars/token)")
  mb = manifest["source_bytes"] / 1e6
  if manifest["reused"]:
    lines.append(f"  already prepared (hash {manifest['hash'][:12]}); checked in {wall_s:.1f} s")
  else:
    lines.append(f"  {mb:,.1f} MB in {wall_s:.1f} s ({mb / max(wall_s, 1e-9):,.1f} MB/s, "
                 f"{manifest['workers']} workers), hash {manifest['hash'][:12]}")
  return "\n".join(lines)


def main(argv):
  del argv
  if not common.DATA.value:
    raise UsageError("--data=text:PATH[,PATH...] or --data=tfds:NAME[/CONFIG] is required")
  if not OUT.value:
    raise UsageError("--out is required: the directory for the token files")
  start = time.perf_counter()
  manifest = token_store.prepare(
      common.DATA.value, OUT.value, common.TOKENIZER.value or "char", common.VOCAB_SIZE.value,
      SPLIT.value, sample_chars=SAMPLE_CHARS.value, workers=WORKERS.value,
      max_chars=MAX_CHARS.value or None, tfds_data_dir=common.TFDS_DATA_DIR.value, log=print)
  print(summary(manifest, time.perf_counter() - start))
  print(f"train with --data=tokens:{OUT.value}")


if __name__ == "__main__":
  common.run(main)
