"""Where a run's metrics go: JSON lines (`workdir/metrics.jsonl`, the record every study reads) and
TensorBoard scalars (`llm_math.summaries`, event files beside it), written by process 0."""

from llm_math import files
from llm_math import sharding
from llm_math import summaries


class MetricsWriter:
  """Writes metrics as JSON lines (`workdir/metrics.jsonl`) and TensorBoard scalars (event files in
  `workdir`), on process 0 only. `records` are the records up to `resume_step` (-1: a fresh run),
  the history the resumed run continues. The file is never truncated: when records past
  `resume_step` exist (a run resumed from an older checkpoint, or started afresh after every step
  was damaged), the whole earlier file is kept as `metrics.earlier-N.jsonl` first (`kept_as`)."""

  def __init__(self, workdir, resume_step: int):
    self.path = files.path(workdir) / "metrics.jsonl"
    self.enabled = sharding.is_primary()
    earlier = files.read_jsonl(self.path)
    self.records = [r for r in earlier if r["step"] <= resume_step]
    self.kept_as = None
    self._events = None
    if self.enabled:
      if len(self.records) < len(earlier):
        self.kept_as = _unused_name(self.path, "metrics.earlier-{}.jsonl")
        self.path.rename(self.kept_as)
      files.write_jsonl(self.path, self.records)
      self._events = summaries.ScalarWriter(files.path(workdir))

  def write(self, record: dict):
    self.records.append(record)
    if self.enabled:
      if files.is_local(self.path):
        files.append_jsonl(self.path, [record])
      else:  # An object store rewrites the object: from the records in memory, no read-back.
        files.write_jsonl(self.path, self.records)
      self._events.write(record["step"], {k: v for k, v in record.items()
                                          if k != "step" and isinstance(v, (int, float))})

  def close(self):
    if self._events:
      self._events.close()


def _unused_name(path, pattern: str):
  """path's sibling named `pattern` with the first free number 1, 2, ..."""
  n = 1
  while (path.parent / pattern.format(n)).exists():
    n += 1
  return path.parent / pattern.format(n)
