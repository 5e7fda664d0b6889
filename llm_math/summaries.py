"""TensorBoard scalars, written without TensorFlow.

TensorBoard's own event-file writer (`tensorboard.summary.writer`, the one PyTorch's SummaryWriter
uses) needs only the `tensorboard` package; its file layer reaches local disk and, through fsspec,
gs:// and other URLs, so event files land next to metrics.jsonl wherever the workdir is.
`read_scalars` reads them back with TensorBoard's EventAccumulator (what the dashboard uses).
"""

import time

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import event_file_writer


class ScalarWriter:
  """Appends scalar summaries to a new event file in `logdir`."""

  def __init__(self, logdir: str):
    self._writer = event_file_writer.EventFileWriter(str(logdir), flush_secs=30)

  def write(self, step: int, scalars: dict[str, float]):
    values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
              for tag, value in scalars.items()]
    self._writer.add_event(event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from the event files in `logdir`, as TensorBoard shows them."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
