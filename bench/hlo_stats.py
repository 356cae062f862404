"""Per-step figures read from a compiled program's HLO text (``compiled.as_text()``).

XLA's ``cost_analysis()`` counts the body of each ``while`` loop once; a scanned model runs its
body once per layer (and XLA adds loops of its own: windowed "collective matmul" loops, the
chunked loss), so its FLOPs are a fraction of a step's. Here every computation gets a
multiplier, the number of times one step runs it: 1 for the entry, and for a while loop's body
and condition the caller's multiplier times the loop's trip count. The trip count is read from
the loop itself: its condition is ``counter < N`` (``compare(get-tuple-element(param, i),
constant(N)), direction=LT``), its body adds ``constant(s)`` to tuple element ``i``, and the
while's initial tuple holds ``constant(c)`` there: ceil((N - c) / s) trips. A loop of any other
shape counts once and is reported in ``unknown_loops``.

- ``matmul_flops``: 2 x multiply-adds of every ``dot`` and ``convolution`` (TPU programs lower
  dots to convolutions), padding excluded, times its computation's multiplier. Mosaic kernels
  (splash attention) are custom calls and are not seen: ``splash_kernels`` counts them.
- ``sync_collective_bytes`` / ``async_collective_bytes``: bytes per kind (all-reduce,
  all-gather, reduce-scatter, all-to-all, collective-permute), times the multiplier. Async
  ones are the ``-start`` halves of ``-start``/``-done`` pairs (XLA overlaps them with
  compute); a synchronous one stalls the chip. Bytes are the operand's (all-gather: the
  gathered result; all-reduce: the reduced result).
- ``host_transfer_bytes``: bytes copied between HBM and host memory (memory space S(5)): the
  copies and (async) dynamic slices / updates of offloaded activations, times the multiplier.
- ``hbm_bytes``: an estimate of HBM traffic: what each top-level instruction (a fusion, a
  convolution, a copy, a collective...) reads and writes, times the multiplier. A fusion that
  only slices a parameter (a scan body reading layer i of stacked weights) counts the slice;
  one that updates a buffer in place counts the update. Intermediates inside a fusion stay on
  chip and are not counted.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
               "s64": 8, "u64": 8, "c64": 8, "c128": 16}
# Instructions that move no data of their own (views, tuples, control flow whose bodies count).
NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
              "conditional", "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
              "add-dependency", "domain", "copy-done", "call-done", "async-done", "send-done",
              "recv-done", "dynamic-slice-done", "dynamic-update-slice-done",
              *(f"{c}-done" for c in COLLECTIVES)}

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
_HOST = "S(5)"  # the host memory space in a TPU layout (what remat offloading moves to)
_END = re.compile(r"^\}(, execution_thread=\S+)?\s*$")  # not "}}, metadata=..." (an attribute)
_INSTR = re.compile(r"^\s*(ROOT )?%(\S+) = ")
_CALLEE = re.compile(r"\b(condition|body|calls|to_apply|true_computation|false_computation)="
                     r"%([\w.\-]+)")


@dataclasses.dataclass
class Instr:
  name: str
  shape: str  # the result shape as printed, e.g. "bf16[8,128]{1,0}" or a tuple "(...)"
  opcode: str
  operands: list[str]  # names of operand instructions
  inner: str  # the text between the parentheses (a constant's literal, a parameter's number)
  attrs: str  # everything after the operand list
  root: bool


def _split_balanced(s: str, start: int) -> int:
  """Index just past the bracket group that opens at s[start] ('(' or '{')."""
  close = {"(": ")", "{": "}"}[s[start]]
  depth = 0
  for i in range(start, len(s)):
    if s[i] == s[start]:
      depth += 1
    elif s[i] == close:
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced {s[start]!r} in {s[:80]!r}")


def parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):
    end = _split_balanced(rest, 0)
    shape, rest = rest[:end], rest[end:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  op = re.match(r"([a-z][a-z0-9\-]*)\(", rest)
  if not op:
    return None
  end = _split_balanced(rest, op.end() - 1)
  inner = rest[op.end():end - 1]
  operands = re.findall(r"%([\w.\-]+)", inner)
  return Instr(m.group(2), shape, op.group(1), operands, inner, rest[end:], bool(m.group(1)))


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
  """Computations (name -> instructions) of an HLO module's text, and the entry's name."""
  comps: dict[str, list[Instr]] = {}
  entry, current, pending = None, None, ""

  def flush():
    instr = parse_instr(pending) if pending else None
    if instr is not None:
      comps[current].append(instr)

  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if _END.match(line):
      flush()
      current, pending = None, ""
    elif _INSTR.match(line):
      flush()
      pending = line
    else:  # a multi-line attribute (a Mosaic kernel's metadata) continues the instruction
      pending += "\n" + line
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def arrays(shape: str) -> list[tuple[str, list[int]]]:
  """(dtype, dims) of every array in a shape string (a tuple has several)."""
  return [(dt, [int(d) for d in dims.split(",") if d]) for dt, dims in _ARRAY.findall(
      re.sub(r"\{[^{}]*\}", "", shape)) if dt in DTYPE_BYTES]


def shape_bytes(shape: str) -> float:
  return sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in arrays(shape))


def _dims(shape: str) -> list[int]:
  (_, dims), = arrays(shape)
  return dims


class Module:
  """A parsed HLO module with each computation's per-step multiplier."""

  def __init__(self, text: str):
    self.comps, self.entry = parse_module(text)
    self.instrs = {i.name: i for instrs in self.comps.values() for i in instrs}
    self.unknown_loops = 0
    # Fusion bodies and reducers: their intermediates stay on chip (no HBM traffic of their own).
    self.on_chip: set[str] = set()
    self.multiplier: dict[str, float] = {}
    self._visit(self.entry, 1.0)

  def _visit(self, comp: str, mult: float) -> None:
    self.multiplier[comp] = self.multiplier.get(comp, 0.0) + mult
    for instr in self.comps[comp]:
      callees = _CALLEE.findall(instr.attrs)
      branches = re.search(r"branch_computations=\{([^}]*)\}", instr.attrs)
      if branches:
        callees += [("branch", n) for n in re.findall(r"%([\w.\-]+)", branches.group(1))]
      trips = self.trip_count(instr) if instr.opcode == "while" else 1
      for kind, callee in callees:
        if instr.opcode == "fusion" or kind == "to_apply":
          self.on_chip.add(callee)
        self._visit(callee, mult * (trips if kind in ("body", "condition") else 1))

  def trip_count(self, loop: Instr) -> int:
    """Trips of a while loop ``for i = c; i < N; i += s``; 1 (and counted unknown) otherwise."""
    cond = re.search(r"condition=%([\w.\-]+)", loop.attrs).group(1)
    body = re.search(r"body=%([\w.\-]+)", loop.attrs).group(1)
    try:
      root = self._unwrap(next(i for i in self.comps[cond] if i.root))
      if root.opcode != "compare" or "direction=LT" not in root.attrs:
        raise LookupError
      counter, limit = (self.instrs[n] for n in root.operands)
      index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
      n = self._constant(limit)
      body_root = next(i for i in self.comps[body] if i.root)
      update = self._unwrap(self.instrs[body_root.operands[index]])
      if update.opcode != "add" or counter.opcode != "get-tuple-element":
        raise LookupError
      # One side of the add is the counter (read from the body's parameter), the other the step.
      a, b = (self._through_copies(self.instrs[x]) for x in update.operands)
      if a.opcode == "constant":
        a, b = b, a
      if a.opcode != "get-tuple-element" or f"index={index}" not in a.attrs:
        raise LookupError(a.name)
      step = self._constant(b)
      init_tuple = self.instrs[loop.operands[0]]
      start = self._constant(self.instrs[init_tuple.operands[index]])
      if step <= 0:
        raise LookupError
      return max(0, -(-(n - start) // step))
    except (LookupError, AttributeError, ValueError, IndexError, StopIteration):
      self.unknown_loops += 1
      return 1

  def _unwrap(self, instr: Instr) -> Instr:
    """A single-op fusion (XLA:CPU wraps a loop's compare and add so) as that op on the
    fusion's own operands; any other instruction as it is."""
    if instr.opcode != "fusion":
      return instr
    body = self.comps[re.search(r"calls=%([\w.\-]+)", instr.attrs).group(1)]
    root = next(i for i in body if i.root)
    params = {i.name: int(i.inner) for i in body if i.opcode == "parameter"}
    if not root.operands or any(o not in params for o in root.operands):
      return instr
    return dataclasses.replace(root, operands=[instr.operands[params[o]] for o in root.operands])

  def _through_copies(self, instr: Instr) -> Instr:
    while instr.opcode in ("copy", "bitcast", "convert") and instr.operands:
      instr = self.instrs[instr.operands[0]]
    return instr

  def _constant(self, instr: Instr) -> int:
    """The value of an integer scalar constant (through copies); LookupError otherwise."""
    instr = self._through_copies(instr)
    if instr.opcode != "constant":
      raise LookupError(instr.name)
    return int(re.match(r"\s*(-?\d+)", instr.inner).group(1))

  def instructions(self):
    """(instruction, multiplier) over every computation one step runs."""
    for comp, mult in self.multiplier.items():
      for instr in self.comps[comp]:
        yield instr, mult, comp


def matmul_flops(module: Module, instr: Instr) -> float:
  """2 x multiply-adds of one dot or convolution (padding positions excluded)."""
  out = _dims(instr.shape)
  lhs = _dims(module.instrs[instr.operands[0]].shape)
  if instr.opcode == "dot":
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
    contract = [int(d) for d in m.group(1).split(",") if d] if m else []
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
  rhs = _dims(module.instrs[instr.operands[1]].shape)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs).groups()
  lhs_l, rhs_l, out_l = labels
  groups = re.search(r"feature_group_count=(\d+)", instr.attrs)
  in_features = lhs[lhs_l.index("f")] // (int(groups.group(1)) if groups else 1)
  window = re.search(r"window=\{([^}]*)\}", instr.attrs)
  spatial = sorted(c for c in out_l if c.isdigit())
  win = dict(re.findall(r"(\w+)=([^ ]+)", window.group(1))) if window else {}

  def per_dim(key, default):
    return [int(v) for v in win[key].split("x")] if key in win else [default] * len(spatial)

  sizes, strides = per_dim("size", 1), per_dim("stride", 1)
  lhs_dil, rhs_dil = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
  pads = ([tuple(int(p) for p in v.split("_")) for v in win["pad"].split("x")]
          if "pad" in win else [(0, 0)] * len(spatial))
  macs = math.prod(out[out_l.index(c)] for c in "bf") * in_features
  for d, c in enumerate(spatial):
    size_in = (lhs[lhs_l.index(c)] - 1) * lhs_dil[d] + 1
    valid = 0
    for o in range(out[out_l.index(c)]):
      for k in range(rhs[rhs_l.index(c)] if d < len(sizes) else 1):
        x = o * strides[d] + k * rhs_dil[d] - pads[d][0]
        valid += 0 <= x < size_in and x % lhs_dil[d] == 0
    macs *= valid
  return 2.0 * macs


def _fusion_traffic(module: Module, fusion: Instr, body: str) -> float:
  """Bytes a fusion reads and writes, counting slices of sliced params and in-place updates."""
  instrs = module.comps[body]
  params = {i.name: int(re.match(r"(\d+)", i.inner).group(1))
            for i in instrs if i.opcode == "parameter"}
  users: dict[str, list[Instr]] = {}
  for i in instrs:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  root = next(i for i in instrs if i.root)
  outs = [module.instrs[o] for o in root.operands] if root.opcode == "tuple" else [root]
  in_place = {o.operands[0] for o in outs if o.opcode == "dynamic-update-slice"}
  total = 0.0
  for name, number in params.items():
    used = users.get(name, [])
    if name in in_place:
      continue
    if used and all(u.opcode == "dynamic-slice" and u.operands[0] == name for u in used):
      total += sum(shape_bytes(u.shape) for u in used)
    else:
      total += shape_bytes(module.instrs[fusion.operands[number]].shape)
  for o in outs:
    if o.opcode == "dynamic-update-slice":
      total += shape_bytes(module.instrs[o.operands[1]].shape)
    else:
      total += shape_bytes(o.shape)
  return total


_SLICE_OPS = ("dynamic-slice", "dynamic-update-slice", "dynamic-slice-start",
              "dynamic-update-slice-start")


def _touches_host(module: Module, instr: Instr) -> bool:
  return instr.opcode in ("copy-start", "copy", *_SLICE_OPS) and (
      _HOST in instr.shape or any(_HOST in module.instrs[o].shape for o in instr.operands))


def _moved_bytes(module: Module, instr: Instr) -> float:
  """What a copy or a (possibly async) dynamic slice / update moves: the slice, not the buffer."""
  operands = sum(shape_bytes(module.instrs[o].shape) for o in instr.operands)
  if instr.opcode.startswith("dynamic-update-slice"):
    return shape_bytes(module.instrs[instr.operands[1]].shape)
  if instr.opcode == "dynamic-slice-start":  # ((operands), slice, u32 context)
    return shape_bytes(instr.shape) - operands - 4
  if instr.opcode == "dynamic-slice":
    return shape_bytes(instr.shape)
  return shape_bytes(module.instrs[instr.operands[0]].shape)


def _traffic(module: Module, instr: Instr) -> float:
  if instr.opcode in _SLICE_OPS:  # read and write the slice (one side may be host memory)
    return 2 * _moved_bytes(module, instr)
  if instr.opcode == "fusion":
    body = re.search(r"calls=%([\w.\-]+)", instr.attrs).group(1)
    return _fusion_traffic(module, instr, body)
  operands = [module.instrs[o] for o in instr.operands if o in module.instrs]
  return shape_bytes(instr.shape) + sum(shape_bytes(o.shape) for o in operands)


def collective_kind(opcode: str) -> tuple[str, bool] | None:
  """(kind, asynchronous) of a collective's opcode; None for anything else (and -done)."""
  if opcode in COLLECTIVES:
    return opcode, False
  if opcode.endswith("-start") and opcode[:-len("-start")] in COLLECTIVES:
    return opcode[:-len("-start")], True
  return None


def _collective_bytes(module: Module, instr: Instr, kind: str) -> float:
  operand_bytes = sum(shape_bytes(module.instrs[o].shape) for o in instr.operands)
  if kind == "all-reduce":  # the reduced buffer (XLA may fold a f32 -> bf16 convert into it)
    return shape_bytes(instr.shape)
  if kind != "all-gather":
    return operand_bytes
  result = shape_bytes(instr.shape)
  # all-gather-start's result tuple holds its operands beside the gathered buffers.
  return result - operand_bytes if instr.opcode.endswith("-start") else result


def stats(text: str) -> dict:
  """Per-step figures of one chip's compiled program (see the module docstring)."""
  module = Module(text)
  flops = hbm = host = 0.0
  sync = {k: 0.0 for k in COLLECTIVES}
  async_ = {k: 0.0 for k in COLLECTIVES}
  largest_sync_all_reduce = (0.0, "")  # (bytes, shape): a weight gradient, or activations?
  splash = 0
  for instr, mult, comp in module.instructions():
    if instr.opcode in ("dot", "convolution"):
      flops += mult * matmul_flops(module, instr)
    if instr.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in instr.attrs:
      splash += 1
    found = collective_kind(instr.opcode)
    if found:
      kind, is_async = found
      size = _collective_bytes(module, instr, kind)
      (async_ if is_async else sync)[kind] += mult * size
      if kind == "all-reduce" and not is_async and size > largest_sync_all_reduce[0]:
        largest_sync_all_reduce = (size, re.sub(r"\{[^{}]*\}", "", instr.shape))
    if _touches_host(module, instr):
      host += mult * _moved_bytes(module, instr)
    if comp not in module.on_chip and instr.opcode not in NO_TRAFFIC:
      hbm += mult * _traffic(module, instr)
  return {"matmul_flops": flops, "hbm_bytes": hbm, "sync_collective_bytes": sync,
          "async_collective_bytes": async_, "largest_sync_all_reduce":
          largest_sync_all_reduce, "splash_kernels": splash,
          "host_transfer_bytes": host,
          "unknown_loops": module.unknown_loops}
