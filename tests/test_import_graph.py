"""xlingo's import graph: no circle, and every arrow points down the declared layers.

Entry points above tools above the loop above the library (docs: ARCHITECTURE "Arrows point
down"). Every import counts, also one inside a function: a lazy import is still an arrow.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xlingo"

# Module (or package prefix) -> layer; an import may go to the same layer or a lower one.
# The longest matching prefix decides.
LAYERS = {
    "xlingo": 0, "xlingo.errors": 0, "xlingo.paths": 0,  # the ground
    # the library: configs, the model, text to batches, devices, stop requests
    "xlingo.config": 1, "xlingo.sharding": 1, "xlingo.preemption": 1, "xlingo.model": 1,
    "xlingo.data": 1,
    # what loops and tools share: decoding, scoring, the training library (state, losses,
    # steps, metrics, checkpoints, loading a model)
    "xlingo.decode": 2, "xlingo.scoring": 2, "xlingo.training": 2,
    "xlingo.hf": 2,  # Hugging Face checkpoints <-> xlingo's, beside the training library
    "xlingo.training.loop": 3,  # the one loop
    # the command line and the tools that read a checkpoint
    "xlingo.cli": 4, "xlingo.evaluate": 4, "xlingo.generate": 4, "xlingo.hf.__main__": 4,
    # entry points that train
    "xlingo.train": 5, "xlingo.adapt": 5, "xlingo.distill": 5, "xlingo.demo": 5,
    "xlingo.finetune": 5,
}

# Arrows allowed for now although they break the rules. Each must still exist here: once one
# is gone, delete it from this set.
PENDING: set[tuple[str, str]] = set()


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """The xlingo modules ``path`` imports, anywhere in the file."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from xlingo.training import load`: the submodule when it is one, else the module
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
               for a in node.names]
    else:
      continue
    out |= {n for n in names if n in known}
  return out


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  known = set(modules)
  return {m: _imports(p, known) - {m} for m, p in modules.items()}


def _layer(module: str) -> int:
  prefix = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
  return LAYERS[prefix]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One circle of ``graph`` (its modules in order), or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(m):
    state[m] = 1
    path.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        return path[path.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    state[m] = 2
    path.pop()
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_every_module_has_a_layer():
  graph = _graph()
  assert "xlingo.training.loop" in graph and "xlingo.data.vocab" in graph
  for m in graph:
    _layer(m)  # raises ValueError (max of nothing) for a module no prefix covers


def test_no_import_circle():
  graph = _graph()
  pending = {a: {b for b in bs if (a, b) not in PENDING} for a, bs in graph.items()}
  assert _cycle(pending) is None, " -> ".join(_cycle(pending))


def test_arrows_point_down():
  up = sorted(f"{a} ({_layer(a)}) -> {b} ({_layer(b)})" for a, bs in _graph().items()
              for b in bs if _layer(b) > _layer(a) and (a, b) not in PENDING)
  assert not up, "imports that point up the layers:\n" + "\n".join(up)


def test_pending_arrows_still_exist():
  graph = _graph()
  gone = sorted(f"{a} -> {b}" for a, b in PENDING if b not in graph.get(a, set()))
  assert not gone, f"fixed, so drop them from PENDING: {gone}"


def test_the_checker_finds_a_circle_and_an_upward_arrow():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None
  assert _layer("xlingo.training.loop") > _layer("xlingo.training.load") > _layer("xlingo.data")
