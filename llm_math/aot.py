"""Ahead-of-time compilation of the train and evaluation steps for devices that need not exist.

    config + topology ('v5e:2x2', or 'local') -> the mesh over its devices -> fit's jitted step,
    lowered on abstract shapes and compiled by XLA for that platform -> memory, FLOPs, collectives

JAX compiles for a TPU topology without its chips (`jax.experimental.topologies`; libtpu installs
from the Python package index), so a config's step can be checked on a laptop before a pod is paid
for: that it compiles, fits in each chip's HBM, and shards as intended. The step compiled is exactly
the one `train.fit` runs (`train.jit_train_step`: the same Task, shardings, donation and batch
layout); nothing is run, no data is read, and the parameters are only shapes.

The report's roofline: a step cannot take less than max(FLOPs / peak FLOP/s, bytes accessed / HBM
bandwidth) per chip, from XLA's own cost analysis of the compiled program; `mfu_bound` is the model
FLOPs utilization (6N + 12LTd per token, `llm_math.flops`) a step at that bound would reach. The
peak is the chip's bf16 peak whatever the compute dtype.

XLA's cost analysis counts a while loop's body once. A model with scanned layers, or a loss computed
a chunk at a time, is therefore compiled again with two layers per iteration and with chunks twice
as long, and its FLOPs and bytes are extrapolated from the programs to every layer and chunk
(`loops_extrapolated`; the memory figures are the first program's own). Collectives are read from
the program's text and placed in its loops (`loop_collectives`): each loop's per-iteration
collectives times its trip count, so the report says what one layer gathers and reduces. XLA:TPU
also turns sharded matmuls into loops over the shards (windowed einsums, `windowed_einsum_loops`),
whose bodies are counted once as well: there XLA's FLOPs and bytes fall short, the compute term of
the roofline uses our count and its memory term is a lower bound.

"Per chip" is per JAX device: a v4 topology lists each chip's two TensorCores as two devices, each
with half the chip's HBM, bandwidth and peak.
"""

import collections
import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_math import evaluation
from llm_math import flops as flops_lib
from llm_math import model as model_lib
from llm_math import sharding
from llm_math import train as train_lib
from llm_math import train_config
from llm_math.errors import UsageError

GiB = 2**30

# Per chip: HBM capacity and bandwidth, keyed by a substring of `jax.Device.device_kind` (Cloud TPU
# system architecture pages: v4 32 GiB at 1,200 GB/s; v5e 16 GiB at 819 GB/s; v5p 95 GiB at
# 2,765 GB/s; v6e (Trillium) 32 GiB at 1,640 GB/s). Peak bf16 FLOP/s: `flops.PEAK_BF16_FLOPS`.
HBM = {
    "TPU v4": (32 * GiB, 1200e9),
    "TPU v5 lite": (16 * GiB, 819e9),
    "TPU v5e": (16 * GiB, 819e9),
    "TPU v5p": (95 * GiB, 2765e9),
    "TPU v5": (95 * GiB, 2765e9),  # v5p reports "TPU v5"; checked after the v5 lite entries.
    "TPU v6 lite": (32 * GiB, 1640e9),
    "TPU v6e": (32 * GiB, 1640e9),
}

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
# What would move data between host and device inside a step (a sign of a layout XLA gave up on).
HOST_TRANSFERS = ("send(", "recv(", "infeed(", "outfeed(", "xla_python_cpu_callback",
                  "xla_ffi_python_cpu_callback", "MoveToHost", "MoveToDevice")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")


def topology_devices(name: str) -> list:
  """The devices of a TPU topology ('v5e:2x2', 'v4:2x2x2', ...) without its chips, or 'local' for
  this machine's own devices. One-line UsageError when libtpu is missing or the name is unknown."""
  if name == "local":
    return jax.devices()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = ("install libtpu: pip install -e '.[tpu]'" if "tpu" in text.lower()
            and ("not found" in text.lower() or "unknown backend" in text.lower()
                 or "no such" in text.lower()) else
            "expected a TPU topology such as v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2, or 'local'")
    raise UsageError(f"--topology={name}: cannot describe it ({text[:160]}); {hint}") from None


def cores_per_chip(devices) -> int:
  """JAX devices per chip: 2 where each TensorCore of a v4 chip is its own device (a topology
  description lists them so; a v4 VM's default megacore joins them), else 1."""
  chips = {tuple(d.coords) for d in devices if getattr(d, "coords", None) is not None}
  return max(1, len(devices) // len(chips)) if chips else 1


def chip_figures(device_kind: str, cores: int = 1) -> dict:
  """{'hbm_bytes', 'hbm_bytes_per_s', 'peak_flops'} of one device of a chip kind whose chips are
  split into `cores` devices (the chip's figures shared among them); None where unknown."""
  lookup = lambda table: next((v for k, v in table.items() if k in device_kind), None)
  hbm, peak = lookup(HBM), lookup(flops_lib.PEAK_BF16_FLOPS)
  return {"hbm_bytes": hbm[0] // cores if hbm else None,
          "hbm_bytes_per_s": hbm[1] / cores if hbm else None,
          "peak_flops": peak / cores if peak else None}


_COLLECTIVE_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CHANNEL = re.compile(r"channel_id=(\d+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([^\s(]+) \(")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition)=%([^\s,)}]+)")
_CALLEE_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_WHILE = re.compile(r"\swhile\(.*?condition=%([^\s,]+), body=%([^\s,]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _no_collectives() -> dict:
  return {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}


def _add_op(counts: dict, line: str, channels: set, kind: str | None = None) -> None:
  """Adds the collective on an HLO instruction line, if any, to `counts` {kind: {count, bytes}}.

  Bytes are the result's size (for asynchronous '-start' ops, the largest array of the result
  tuple, which also holds the operand and scalar contexts: the gathered or reduced value). '-done'
  halves of asynchronous pairs are not counted again, nor are the pieces of one collective that
  XLA:TPU spreads over several fusions to overlap it with compute (they share its channel_id,
  recorded in `channels`). `kind` overrides the op's own: XLA:TPU writes a reduce-scatter as an
  all-reduce inside an 'all-reduce-scatter' fusion, which runs as one reduce-scatter."""
  m = _COLLECTIVE_OP.search(line)
  if not m:
    return
  shapes = _SHAPE.findall(m.group(1))
  channel = _CHANNEL.search(line)
  if not shapes or (channel and channel.group(1) in channels):
    return
  if channel:
    channels.add(channel.group(1))
  sizes = [math.prod(int(d) for d in ds.split(",") if d) * _BYTES[t] for t, ds in shapes]
  # A '-start' op's tuple: the largest array. A plain op's tuple (a combined collective): all.
  kind = kind or m.group(2)
  counts[kind]["count"] += 1
  counts[kind]["bytes"] += max(sizes) if m.group(3) else sum(sizes)


def collective_bytes(hlo_text: str) -> dict:
  """{kind: {'count', 'bytes'}} of the collectives written in an HLO module's text, each once
  however many loop iterations run it (`loop_collectives` counts those)."""
  counts, channels = _no_collectives(), set()
  for line in hlo_text.splitlines():
    _add_op(counts, line, channels)
  return counts


def _computations(hlo_text: str) -> tuple[dict, str | None]:
  """({name: [instruction lines]}, entry name) of an HLO module's text."""
  bodies, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m and line.endswith("{"):
      current = m.group(1)
      bodies[current] = []
      entry = current if line.startswith("ENTRY") else entry
    elif line == "}":
      current = None
    elif current is not None:
      bodies[current].append(line)
  return bodies, entry


def _trip_count(condition_lines: list[str]) -> int | None:
  """The trip count of a while loop whose condition is `i < N` with the constant N (how jax's scan
  and map loops are compiled, i counting from 0); None when the condition is anything else."""
  constants = [int(m.group(1)) for line in condition_lines
               for m in [re.search(r"= s32\[\]\S* constant\((-?\d+)\)", line)] if m]
  compares = [line for line in condition_lines if " compare(" in line and "direction=LT" in line]
  return constants[0] if len(constants) == 1 and len(compares) == 1 else None


def loop_collectives(hlo_text: str) -> dict:
  """The collectives of a compiled program placed in its loops: {'outside': those run once per step,
  'loops': [{'op_name', 'trip_count', 'depth', 'carry', 'per_iteration'}], 'total'}.

  Each collective belongs to the innermost while loop whose body reaches it through calls (fusions,
  async collective fusions, conditionals); one spread over several places (an asynchronous gather
  started before a loop and advanced inside it) belongs where it starts. The total multiplies each
  loop's per-iteration collectives by its trip count and its enclosing loops', so a scanned model's
  per-layer gathers and reductions count once per layer. A loop whose trip count cannot be read from
  its condition counts once, with trip_count None.
  """
  bodies, entry = _computations(hlo_text)
  channels, loops = set(), []

  def own(name: str, seen: set, kind: str | None = None) -> tuple[dict, list]:
    """(collectives in `name` and what it calls outside nested loops, the loops it runs: [(body,
    trip count, op_name, the per-device shapes of the loop's carry)])."""
    counts, nested = _no_collectives(), []
    kind = "reduce-scatter" if name.startswith("all-reduce-scatter") else kind
    for line in bodies.get(name, []):
      _add_op(counts, line, channels, kind)
      w = _WHILE.search(line)
      if w:
        op = _OP_NAME.search(line)
        carry = _SHAPE.findall(line.split(" while(")[0])
        nested.append((w.group(2), _trip_count(bodies.get(w.group(1), [])),
                       op.group(1) if op else "", [f"{t}[{d}]" for t, d in carry]))
        continue
      callees = _CALLEES.findall(line) + [c.strip().lstrip("%") for group in
                                          _CALLEE_LISTS.findall(line) for c in group.split(",")]
      for callee in callees:
        if callee in bodies and callee not in seen:
          seen.add(callee)
          sub, sub_nested = own(callee, seen, kind)
          counts = _add(counts, sub)
          nested += sub_nested
    return counts, nested

  def walk(name: str, depth: int) -> tuple[dict, dict]:
    """(collectives of `name` outside its loops, of one run of `name` with its loops' trips)."""
    counts, nested = own(name, {name})
    total = counts
    for body, trips, op_name, carry in nested:
      record = {"op_name": op_name, "trip_count": trips, "depth": depth + 1, "carry": carry}
      loops.append(record)
      record["per_iteration"], per_iteration_total = walk(body, depth + 1)
      total = _add(total, per_iteration_total, trips or 1)
    return counts, total

  if entry is None:
    return {"outside": _no_collectives(), "loops": [], "total": _no_collectives()}
  outside, total = walk(entry, 0)
  return {"outside": outside, "loops": loops, "total": total}


def _add(a: dict, b: dict, times: int = 1) -> dict:
  return {k: {f: a[k][f] + times * b[k][f] for f in ("count", "bytes")} for k in a}


def host_transfers(hlo_text: str) -> list[str]:
  """The host-transfer instructions found in an HLO module's text (empty: none)."""
  return sorted({marker.rstrip("(") for marker in HOST_TRANSFERS if marker in hlo_text})


def _memory(compiled) -> dict:
  """Per-chip bytes of a compiled program (XLA's memory analysis)."""
  m = compiled.memory_analysis()
  arguments, outputs = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  temp, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
  return {"arguments": arguments, "outputs": outputs, "temp": temp, "aliased": alias,
          "generated_code": int(m.generated_code_size_in_bytes),
          "total": arguments + outputs + temp - alias}


def _cost(compiled) -> dict:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return {"flops": float(analysis.get("flops", math.nan)),
          "bytes_accessed": float(analysis.get("bytes accessed", math.nan))}


def _largest_buffers(hlo_text: str, n: int = 3) -> list[str]:
  """The n largest array shapes named in the program (for the message of a config that does not
  fit)."""
  sizes = collections.Counter()
  for dtype, dims in _SHAPE.findall(hlo_text):
    sizes[f"{dtype}[{dims}]"] = math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dtype]
  return [f"{shape} ({size / GiB:.2f} GiB)" for shape, size in sizes.most_common(n)]


class DoesNotFit(Exception):
  """The compiler found that the program needs more memory than a chip has."""

  def __init__(self, message: str, hlo_text: str):
    super().__init__(message)
    self.hlo_text = hlo_text


def _compile(jitted, args, mesh) -> tuple:
  """(compiled, seconds) of `jitted` lowered on `args` (ShapeDtypeStructs) under `mesh`; raises
  DoesNotFit when the compiler runs out of the chip's memory (XLA:TPU refuses such a program)."""
  start = time.perf_counter()
  with sharding.use_mesh(mesh):
    lowered = jitted.lower(*args)
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      text = str(e).strip()
      if "RESOURCE_EXHAUSTED" not in text:
        raise
      raise DoesNotFit(text.splitlines()[-1].rstrip("."), lowered.as_text(dialect="hlo")) from None
  return compiled, time.perf_counter() - start


def _loop_costs(compile_variant, config, mcfg, cost: dict) -> tuple[dict, dict]:
  """(the whole step's FLOPs and bytes accessed, which loops were extrapolated), from XLA's counts,
  which take each while loop's body once.

  A program with L scanned layers and a loss computed in n chunks counts
  A = outside + layer + chunk. Compiled again with two layers per iteration it counts
  B = outside + k * layer (k = 2, or 3 when an odd depth leaves one layer outside the loop), and with
  chunks twice as long C = outside + layer + 2 * chunk (a chunk's cost is linear in its length). The
  whole step is A + (L - 1) * layer + (n - 1) * chunk. `compile_variant(model_cfg, loss_chunk)`
  compiles a variant and returns its cost, or None when the compiler refuses it (a variant holds
  more than the program: it may not fit where the program does). `done['complete']` is whether
  every loop that needed it was extrapolated; where not, the counts fall short.
  """
  whole, done = dict(cost), {"layers": False, "loss_chunks": False, "complete": True}
  layers, chunk = mcfg.num_layers, train_config.train_config(config).loss_chunk
  if mcfg.scan_layers and layers > 1:
    twice = compile_variant(dataclasses.replace(mcfg, scan_unroll=2), chunk)
    if twice is not None:
      k = 2 + layers % 2
      for key in whole:
        whole[key] += (layers - 1) * (twice[key] - cost[key]) / (k - 1)
    done["layers"] = twice is not None
    done["complete"] &= done["layers"]
  n = config.seq_len // chunk if chunk else 1
  if n > 1:
    longer = compile_variant(mcfg, 2 * chunk) if config.seq_len % (2 * chunk) == 0 else None
    if longer is not None:
      for key in whole:
        whole[key] += (n - 1) * (longer[key] - cost[key])
    done["loss_chunks"] = longer is not None
    done["complete"] &= done["loss_chunks"]
  return whole, done


def compile_report(config, devices, vocab_size: int, topology: str = "local",
                   extrapolate: bool = True) -> dict:
  """Compiles the train step (and the evaluation step) of `config`'s Transformer LM for `devices`
  and returns the report: per-chip memory, whether it fits, FLOPs (XLA's and ours), collectives,
  host transfers, compile seconds and the roofline bound. See the module docstring. With
  extrapolate=False the loops' FLOPs and bytes are XLA's own counts (no further compiles)."""
  tc = train_config.check_config(config, devices)
  mcfg = train_config.model_config(config, vocab_size)
  model = model_lib.Transformer(mcfg)
  mesh = sharding.make_mesh(tc.mesh, devices=devices)
  rules = tc.logical_axis_rules
  dp = sharding.data_parallel_size(mesh, rules)
  accum = tc.grad_accum_steps
  # fit's own Task; no dataset: only the batch function reads one, and nothing is run.
  task = train_lib.lm_task(config, dataset=None, model=model)
  init_rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  abstract = train_lib.abstract_state(task.init, task.tx, mesh, rules, init_rng)
  batch_sh = sharding.batch_sharding(mesh, rules)
  tokens = jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32, sharding=batch_sh)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))

  def step_for(model_cfg, loss_chunk):
    variant = config.copy_and_resolve_references()
    with variant.unlocked():
      variant.loss_chunk = loss_chunk
    t = train_lib.lm_task(variant, dataset=None, model=model_lib.Transformer(model_cfg))
    return train_lib.jit_train_step(t, train_lib.shardings_of(abstract), batch_sh, accum)

  train_args = (abstract, (tokens, tokens), rng)
  step = step_for(mcfg, tc.loss_chunk)
  kind = devices[0].device_kind
  cores = cores_per_chip(devices)
  chip = chip_figures(kind, cores)
  n_params = flops_lib.count_params(abstract.params)
  head = {"topology": topology, "device_kind": kind, "platform": devices[0].platform,
          "chips": len(devices) // cores, "devices": len(devices), "devices_per_chip": cores,
          "mesh": dict(mesh.shape), "params": n_params,
          "batch_size": tc.batch_size, "seq_len": tc.seq_len, "vocab_size": vocab_size,
          "dtype": jnp.dtype(mcfg.dtype).name, "hbm_bytes_per_chip": chip["hbm_bytes"]}
  try:
    compiled, seconds = _compile(step, train_args, mesh)
  except DoesNotFit as e:
    return {**head, "fits": False, "compile_error": str(e), "per_chip_bytes": None,
            "largest_buffers": _largest_buffers(e.hlo_text)}
  hlo = compiled.as_text()

  eval_batch = max(dp, tc.eval_batch_size // dp * dp)
  score = evaluation.nll_score(model.apply, tc.loss_chunk, rules=rules)
  eval_tokens = jax.ShapeDtypeStruct((eval_batch, tc.seq_len), jnp.int32, sharding=batch_sh)
  eval_weights = jax.ShapeDtypeStruct((eval_batch, tc.seq_len), jnp.float32, sharding=batch_sh)
  eval_step = jax.jit(score, in_shardings=(train_lib.shardings_of(abstract.params),)
                      + (batch_sh,) * 3)
  eval_compiled, eval_seconds = _compile(
      eval_step, (abstract.params, eval_tokens, eval_tokens, eval_weights), mesh)

  memory, loops = _memory(compiled), loop_collectives(hlo)
  def variant_cost(model_cfg, chunk):
    try:
      return _cost(_compile(step_for(model_cfg, chunk), train_args, mesh)[0])
    except DoesNotFit:
      return None

  cost, extrapolated = _cost(compiled), {"layers": False, "loss_chunks": False, "complete": False}
  if extrapolate:
    cost, extrapolated = _loop_costs(variant_cost, config, mcfg, cost)
  model_flops = (flops_lib.flops_per_token(mcfg, n_params, config.seq_len)
                 * config.batch_size * config.seq_len / len(devices))
  # XLA:TPU decomposes sharded matmuls into loops over the shards (windowed einsums that overlap the
  # all-gather with the matmul); their bodies too are counted once, so XLA's counts fall short and
  # the compute term takes our count where it is larger.
  windowed = "windowed_dot_general" in hlo
  short = windowed or not extrapolated["complete"]  # XLA's counts miss loop iterations.
  roofline = None
  if chip["peak_flops"] and chip["hbm_bytes_per_s"]:
    roofline = max((max(cost["flops"], model_flops) if short else cost["flops"])
                   / chip["peak_flops"], cost["bytes_accessed"] / chip["hbm_bytes_per_s"])
  fits = None if chip["hbm_bytes"] is None else memory["total"] <= chip["hbm_bytes"]
  return {
      **head, "per_chip_bytes": memory, "fits": fits,
      "largest_buffers": [] if fits is not False else _largest_buffers(hlo),
      "flops_per_step": cost["flops"], "model_flops_per_step": model_flops,
      "flops_ratio_xla_to_model": cost["flops"] / model_flops if model_flops else None,
      "loops_extrapolated": extrapolated,
      "windowed_einsum_loops": windowed,
      "bytes_accessed_per_step": cost["bytes_accessed"],
      "collectives": loops["total"], "collectives_outside_loops": loops["outside"],
      "loops": loops["loops"], "host_transfers": host_transfers(hlo),
      "compile_seconds": seconds,
      "peak_flops_per_chip": chip["peak_flops"], "hbm_bytes_per_s": chip["hbm_bytes_per_s"],
      "roofline_step_seconds": roofline,
      "mfu_bound": (model_flops / chip["peak_flops"] / roofline) if roofline else None,
      "eval": {"batch_size": eval_batch, "per_chip_bytes": _memory(eval_compiled),
               "compile_seconds": eval_seconds,
               "collectives": loop_collectives(eval_compiled.as_text())["total"]},
      "sources": ("HBM: Cloud TPU system architecture pages (v4, v5e, v5p, v6e); peak bf16 FLOP/s: "
                  "llm_math.flops.PEAK_BF16_FLOPS; FLOPs and bytes accessed: XLA's cost analysis "
                  "of the compiled step; memory: XLA's memory analysis (per chip)"),
  }


def summary_line(report: dict) -> str:
  """One line: model, topology, mesh, per-chip GiB against HBM, FLOPs, roofline, MFU bound."""
  hbm = report["hbm_bytes_per_chip"]
  mesh = ",".join(f"{k}:{v}" for k, v in report["mesh"].items() if v > 1) or "1 device"
  head = (f"{report['params'] / 1e6:.1f}M params on {report['topology']} "
          f"({report['chips']} x {report['device_kind']}"
          + (f", {report['devices']} devices" if report.get("devices_per_chip", 1) > 1 else "")
          + f"), mesh {mesh}")
  if report.get("compile_error"):
    return f"{head}; DOES NOT FIT: {report['compile_error']}"
  mem = report["per_chip_bytes"]["total"] / GiB
  fit = ("fits" if report["fits"] else "DOES NOT FIT") if report["fits"] is not None else "HBM unknown"
  unit = "chip" if report.get("devices_per_chip", 1) == 1 else "device"
  parts = [head,
           f"{mem:.2f} GiB per {unit}" + (f" of {hbm / GiB:.0f} GiB: {fit}" if hbm else f": {fit}"),
           f"{report['model_flops_per_step']:.3g} model FLOPs/step/{unit}"]
  if report["roofline_step_seconds"]:
    parts.append(f"roofline {report['roofline_step_seconds'] * 1e3:.1f} ms/step, "
                 f"MFU bound {report['mfu_bound']:.0%}")
  parts.append(f"compiled in {report['compile_seconds']:.1f} s")
  return "; ".join(parts)
