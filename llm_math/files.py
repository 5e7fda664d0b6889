"""Run files anywhere `etils.epath` reaches: local disk, gs:// buckets, and other fsspec filesystems.

Every read and write of a workdir goes through here (orbax, which takes the same paths, writes the
checkpoints), so `--workdir=gs://bucket/run` works for metrics, results, figures, tokenizers and
configs alike. We use etils.epath because orbax already depends on it: one path type for checkpoints
and for our own files, with TensorFlow's gfile or fsspec (gcsfs) behind gs:// as installed.

JSON written here is strict: non-finite floats (a NaN throughput, an infinite perplexity) become null,
so every file stays readable by any JSON parser.
"""

import io
import json
import math
import os
import secrets
import socket

from etils import epath
import numpy as np

PathLike = str | os.PathLike | epath.Path


def path(p: PathLike) -> epath.Path:
  """An epath.Path; local paths are made absolute (orbax needs that), URLs are kept as they are."""
  text = os.fspath(p)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def is_local(p: PathLike) -> bool:
  return "://" not in os.fspath(p)


def finite_or_none(value):
  """`value` with every non-finite float inside it (nested dicts, lists) replaced by None."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_or_none(v) for v in value]
  return value


def dumps(value, **kwargs) -> str:
  """Strict JSON text (no NaN or Infinity tokens)."""
  return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def write_json(p: PathLike, value, indent: int | None = 1):
  write_text(p, dumps(value, indent=indent))


def read_json(p: PathLike):
  return json.loads(path(p).read_text())


def temp_path(target: epath.Path) -> epath.Path:
  """A fresh name beside `target` to write it under before renaming it into place: host name,
  process id and a random token, since processes on several hosts (containers on a pod often share
  process ids) may write the same file of a shared disk at once."""
  return target.with_name(f".{target.name}.tmp.{socket.gethostname()}.{os.getpid()}."
                          f"{secrets.token_hex(4)}")


def check_writable(directory: PathLike):
  """Creates and removes a file in `directory` (raises OSError where that fails): what a job checks
  before work that must write there later. os.access cannot see object stores or read-only mounts
  as root."""
  probe = temp_path(path(directory) / ".write_test")
  probe.write_text("")
  probe.unlink()


def _write(p: PathLike, data: str | bytes):
  """Writes `data` to `p`, atomically where the filesystem can rename (local disk, mounts): readers
  see the old file or the whole new one, never a part."""
  target = path(p)
  if not is_local(target):
    _write_file(target, data)  # Object stores publish an object whole when it is closed.
    return
  tmp = temp_path(target)
  try:
    _write_file(tmp, data)
    tmp.replace(target)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _write_file(target: epath.Path, data: str | bytes):
  if isinstance(data, str):
    target.write_text(data)
  else:
    target.write_bytes(data)


def copy_tree(source: PathLike, target: PathLike):
  """Copies the directory `source` to `target` (which must not exist) file by file, through epath
  (local disk or an object store). Not atomic: copy to a `temp_path` and rename it into place."""
  src, dst = path(source), path(target)
  dst.mkdir(parents=True)
  for item in src.iterdir():
    if item.is_dir():
      copy_tree(item, dst / item.name)
    else:
      item.copy(dst / item.name)


def write_text(p: PathLike, text: str):
  """Writes `text` to `p`, atomically where the filesystem can rename (local disk)."""
  _write(p, text)


def read_jsonl(p: PathLike) -> list[dict]:
  """The records of a JSON-lines file ([] if it does not exist)."""
  target = path(p)
  if not target.exists():
    return []
  return [json.loads(line) for line in target.read_text().splitlines() if line.strip()]


def write_jsonl(p: PathLike, records: list[dict]):
  """Writes a whole JSON-lines file."""
  write_text(p, "".join(dumps(r) + "\n" for r in records))


def append_jsonl(p: PathLike, records: list[dict]):
  """Appends records to a local JSON-lines file (object stores cannot append: use write_jsonl)."""
  with path(p).open("a") as f:
    f.write("".join(dumps(r) + "\n" for r in records))


def write_bytes(p: PathLike, data: bytes):
  """Writes `data` to `p`, atomically where the filesystem can rename (local disk)."""
  _write(p, data)


def write_npz(p: PathLike, **arrays):
  """np.savez_compressed into any epath location (numpy writes to a buffer, the buffer to `p`)."""
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  write_bytes(p, buf.getvalue())


def read_npz(p: PathLike) -> dict:
  """Every array of an .npz file, as {name: np.ndarray}."""
  with np.load(io.BytesIO(path(p).read_bytes())) as npz:
    return {name: npz[name] for name in npz.files}


def save_figure_to(fig, p: PathLike, **kwargs):
  """fig.savefig into any epath location (matplotlib writes to a buffer, the buffer to `p`)."""
  buf = io.BytesIO()
  fig.savefig(buf, format=os.fspath(p).rsplit(".", 1)[-1], **kwargs)
  write_bytes(p, buf.getvalue())
