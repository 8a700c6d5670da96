"""The layering of llmjax, read from the source (ast only: no llmjax or jax import, well under a
second): every module sits on a floor and imports only from its own floor or below, the import
graph has no cycle, no module uses another module's `_private` names, and function-level imports
are only for heavy optional dependencies. docs/architecture.md describes the floors.
"""

from __future__ import annotations

import ast
import collections
import functools
import pathlib


ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmjax"

# Module or package -> floor. A module takes the floor of the longest entry that is it or a
# package above it (the root `llmjax` counts for llmjax/__init__.py only). A module may import
# from its own floor and below, never above; a module no entry covers fails
# test_every_module_has_a_floor, so a new top-level module or package is placed deliberately.
FLOORS = {
  # 0 foundations: the error types and the parameter-tree path helpers
  "llmjax": 0, "llmjax.errors": 0, "llmjax.treepaths": 0, "llmjax.platforms": 0,
  # 1 pure functions and tables that need no config: losses, metric sums, presets, plots,
  # clustering
  "llmjax.objectives": 1, "llmjax.eval.metrics": 1, "llmjax.eval.bleu": 1,
  "llmjax.eval.plots": 1, "llmjax.eval.translation_baselines": 1, "llmjax.models.presets": 1,
  "llmjax.cluster": 1,
  "llmjax.eval.frechet": 1, "llmjax.random_draws": 1,
  # 2 the experiment config: ConfigDict -> validated frozen dataclasses
  "llmjax.config": 2, "llmjax.config_checks": 2, "llmjax.config_tasks": 2,
  "llmjax.task_config": 2, "llmjax.config_sections": 2,
  "llmjax.config_prune": 2,
  # 3 devices and storage: logical axes, meshes, shardings, the cluster, checkpoints
  "llmjax.parallel": 3, "llmjax.distributed": 3, "llmjax.checkpoint": 3, "llmjax.checksums": 3,
  # 4 models (pure flax modules) and their FLOP counts
  "llmjax.models": 4, "llmjax.flops": 4,
  # 5 what runs a model without training it: decoding, beam search, zero-shot scoring
  "llmjax.generate": 5, "llmjax.beam_search": 5, "llmjax.eval.scoring": 5,
  "llmjax.eval.zeroshot": 5,
  # 6 data: tokenizers, sources, text, labelled rows, images, parallel text
  "llmjax.data": 6,
  # 7 fine-tuning: trainable/frozen split, LoRA and friends, as masks and added parameters
  "llmjax.finetune": 7,
  # 8 Hugging Face interop
  "llmjax.hf": 8,
  # 9 where weights come from (workdir, export, hf, peft)
  "llmjax.weights": 9,
  # 10 tasks: what differs between objectives
  "llmjax.tasks": 10,
  # 11 training: state, steps, init, the loop
  "llmjax.train": 11,
  # 12 evaluation of a trained run (reuses the train step and the run's assembly)
  "llmjax.eval": 12, "llmjax.eval.evaluate": 12,
  # 13 thin command-line entry points
  "llmjax.cli": 13,
}

# Function-level imports are for keeping a heavy optional dependency off `import llmjax...`;
# each says so in a comment on its line or the line above. These are the ones allowed.
HEAVY_OPTIONAL = {"torch", "tensorflow", "tensorflow_datasets", "sklearn", "peft", "transformers",
                  "huggingface_hub", "matplotlib", "tqdm", "sacrebleu", "tokenizers", "pyarrow",
                  # jax's Pallas TPU kernels: a third of a second that only splash runs need
                  "jax.experimental.pallas"}

# llmjax modules that bring heavy dependencies with them, deferred like those so that the
# model-only path (the GPU benchmark image has jax, flax and optax but no grain, no
# tensorflow-datasets, no orbax) imports without them (tests/test_benchmarks.py): prefix -> why.
HEAVY_LLMJAX = {"llmjax.data": "grain and tensorflow-datasets",
                "llmjax.weights": "orbax (through llmjax.checkpoint) and the data stack",
                "llmjax.train.loop": "orbax and the data stack"}

# Modules whose function-level imports are the point, llmjax's own included: prefix -> why.
DEFERRING = {
  "llmjax.cli": "a verb imports the library (and so jax) only once its flags are good, so "
                "`llmjax VERB --help` stays fast and jax-free (tests/test_cli_help.py)",
}


# ---------------------------------------------------------------------------------------------
# Reading the source.

Import = collections.namedtuple("Import", "module line target names in_function")


def _module_names() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every module under llmjax/."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _module_names()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}
SOURCES = {name: path.read_text().splitlines() for name, path in MODULES.items()}


def _owning_module(dotted: str) -> str:
  """The llmjax module a dotted name lives in (itself if it is a module)."""
  while dotted not in MODULES and "." in dotted:
    dotted = dotted.rsplit(".", 1)[0]
  return dotted


def _absolute(module: str, node: ast.ImportFrom) -> str:
  """The absolute module a `from ... import` reads from (resolves relative imports)."""
  if not node.level:
    return node.module or ""
  package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
  for _ in range(node.level - 1):
    package = package.rsplit(".", 1)[0]
  return f"{package}.{node.module}" if node.module else package


def _imports(module: str) -> list[Import]:
  """Every import statement of a module, module-level and inside functions alike: one Import per
  imported module (for `from m import n`, `m.n` when that is a module, else `m`)."""
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        for alias in child.names:
          out.append(Import(module, child.lineno, alias.name, (), in_function))
      elif isinstance(child, ast.ImportFrom):
        base = _absolute(module, child)
        for alias in child.names:
          full = f"{base}.{alias.name}"
          if full in MODULES:
            out.append(Import(module, child.lineno, full, (), in_function))
          else:
            out.append(Import(module, child.lineno, base, (alias.name,), in_function))
      visit(child, inner)

  visit(TREES[module], False)
  return out


IMPORTS = {m: _imports(m) for m in MODULES}


def _graph() -> dict[str, dict[str, int]]:
  """importer -> {imported llmjax module: first line}, self-imports left out."""
  graph = {m: {} for m in MODULES}
  for m, imports in IMPORTS.items():
    for imp in imports:
      if imp.target == "llmjax" or imp.target.startswith("llmjax."):
        target = _owning_module(imp.target)
        if target != m:
          graph[m].setdefault(target, imp.line)
  return graph


GRAPH = _graph()


def floor(module: str) -> int | None:
  """The module's floor from FLOORS, or None when no entry covers it."""
  name = module
  while True:
    if name in FLOORS and (name != "llmjax" or module == "llmjax"):
      return FLOORS[name]
    if "." not in name:
      return None
    name = name.rsplit(".", 1)[0]


def upward_imports() -> dict[tuple[str, str], str]:
  """(importer, imported) -> description, for every import of a higher floor."""
  out = {}
  for m, targets in GRAPH.items():
    for t, line in targets.items():
      if floor(m) is not None and floor(t) is not None and floor(t) > floor(m):
        out[(m, t)] = f"{m}:{line} (floor {floor(m)}) imports {t} (floor {floor(t)})"
  return out


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """The graph's strongly connected components of more than one module, each as one cycle
  through its first module (so the message shows a real loop), then the rest of the component."""
  index, low, stack, on_stack, comps = {}, {}, [], set(), []

  def strong(v):  # Tarjan; iterative enough for ~100 modules at recursion depth < 100
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        comps.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      strong(v)
  return [_loop_through(graph, comp) for comp in comps]


def _loop_through(graph, comp: list[str]) -> list[str]:
  """A shortest import loop from comp[0] back to itself inside the component, then the others."""
  start, members = comp[0], set(comp)
  parent, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v]):
        if w == start:
          path = [v]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          loop = [start] + path[::-1][1:] + [start]
          return loop + [f"(+{len(members) - len(loop) + 1} more in the component)"]
        if w in members and w not in parent:
          parent[w] = v
          nxt.append(w)
    frontier = nxt
  return comp


def private_uses() -> dict[tuple[str, str], str]:
  """(module, 'other.module._name') -> where, for every use of another module's private name:
  `from llmjax.x import _y` and `x._y` on an imported llmjax module. Dunders are public."""
  out = {}

  def private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

  for m, imports in IMPORTS.items():
    for imp in imports:
      if imp.target.startswith("llmjax") and imp.target != m:
        for name in imp.names:
          if private(name):
            out[(m, f"{imp.target}.{name}")] = f"{m}:{imp.line} imports {imp.target}.{name}"
    aliases = {}  # local name -> llmjax module it is bound to
    for node in ast.walk(TREES[m]):
      if isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.startswith("llmjax"):
            if alias.asname:
              aliases[alias.asname] = alias.name
            else:
              aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
      elif isinstance(node, ast.ImportFrom):
        base = _absolute(m, node)
        for alias in node.names:
          if f"{base}.{alias.name}" in MODULES:
            aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    for node in ast.walk(TREES[m]):
      if isinstance(node, ast.Attribute) and private(node.attr):
        dotted = _dotted(node.value, aliases)
        if dotted in MODULES and dotted != m:
          out[(m, f"{dotted}.{node.attr}")] = f"{m}:{node.lineno} uses {dotted}.{node.attr}"
  return out


def _dotted(node, aliases) -> str | None:
  """`a.b.c` as the module name it denotes through the module's import aliases, else None."""
  if isinstance(node, ast.Name):
    return aliases.get(node.id)
  if isinstance(node, ast.Attribute):
    head = _dotted(node.value, aliases)
    return f"{head}.{node.attr}" if head else None
  return None


def function_level(llmjax_modules: bool) -> dict[str, list[str]]:
  """importer -> ['line: target'] of its imports inside functions, of llmjax modules or others."""
  out = collections.defaultdict(list)
  for m, imports in IMPORTS.items():
    if _deferring(m):
      continue
    for imp in imports:
      if imp.in_function and imp.target.startswith("llmjax") == llmjax_modules:
        if llmjax_modules and _heavy_llmjax(imp.target) and _commented(m, imp):
          continue
        out[m].append(f"{imp.line}: {imp.target}")
  return dict(out)


def _heavy_llmjax(target: str) -> bool:
  return any(target == p or target.startswith(p + ".") for p in HEAVY_LLMJAX)


def _commented(module: str, imp: Import) -> bool:
  """A comment on the import's line or the line above (saying why it is deferred)."""
  lines = SOURCES[module]
  return "#" in lines[imp.line - 1] or lines[imp.line - 2].strip().startswith("#")


def _deferring(module: str) -> bool:
  return any(module == p or module.startswith(p + ".") for p in DEFERRING)


def light_deferred() -> dict[str, list[str]]:
  """importer -> function-level imports of modules not in HEAVY_OPTIONAL, or without a comment
  on their line or the line above saying why."""
  out = collections.defaultdict(list)
  for m, imports in IMPORTS.items():
    if _deferring(m):
      continue
    for imp in imports:
      if imp.in_function and not imp.target.startswith("llmjax"):
        commented = _commented(m, imp)
        heavy = any(imp.target == h or imp.target.startswith(h + ".") for h in HEAVY_OPTIONAL)
        if not heavy or not commented:
          out[m].append(f"{imp.line}: {imp.target}" + ("" if commented else " (no comment)"))
  return dict(out)


# ---------------------------------------------------------------------------------------------
# The rules.

@functools.cache
def found(rule: str):
  """A rule's findings over the real tree, computed once for all the tests that read them."""
  return {"upward": upward_imports, "private": private_uses,
          "function_level": lambda: function_level(True), "light": light_deferred}[rule]()


def test_every_module_has_a_floor():
  missing = [m for m in MODULES if floor(m) is None]
  assert not missing, f"modules no FLOORS entry covers (place them in FLOORS above): {missing}"


def test_floors_name_existing_modules():
  stale = [name for name in FLOORS if name not in MODULES
           and not any(m.startswith(name + ".") for m in MODULES)]
  assert not stale, f"FLOORS entries that match no module: {stale}"


def test_no_import_goes_up_a_floor():
  new = list(found("upward").values())
  assert not new, "imports from a higher floor:\n" + "\n".join(sorted(new))


def test_no_import_cycle():
  loops = cycles(GRAPH)
  assert not loops, "import cycles:\n" + "\n".join(" -> ".join(loop) for loop in loops)


def test_no_private_name_of_another_module():
  new = list(found("private").values())
  assert not new, "uses of another module's private names:\n" + "\n".join(sorted(new))


def test_no_function_level_llmjax_import():
  new = found("function_level")
  assert not new, f"llmjax modules imported inside functions (import them at the top): {new}"


def test_function_level_imports_keep_heavy_dependencies_off_the_import_path():
  new = found("light")
  assert not new, ("function-level imports of light modules, or without a comment saying why "
                   f"(import them at the top, or add the dependency to HEAVY_OPTIONAL): {new}")


def test_the_reader_sees_every_kind_of_import():
  """The reader itself: relative, aliased, function-level and private uses are all found."""
  tree = ast.parse("from . import errors\nfrom .data import _c\nimport llmjax.config as e\n"
                   "import llmjax.data.text\ndef f():\n  import llmjax.tasks\n"
                   "  return e._h, llmjax.data.text._unit, e.__name__\n")
  probe = "llmjax.zz_probe"
  MODULES[probe], TREES[probe], SOURCES[probe] = PACKAGE / "zz_probe.py", tree, []
  IMPORTS[probe] = _imports(probe)
  try:
    got = {(i.target, i.names, i.in_function) for i in IMPORTS[probe]}
    assert got == {("llmjax.errors", (), False), ("llmjax.data", ("_c",), False),
                   ("llmjax.config", (), False), ("llmjax.data.text", (), False),
                   ("llmjax.tasks", (), True)}
    uses = {key for key in private_uses() if key[0] == probe}
    assert uses == {(probe, "llmjax.data._c"), (probe, "llmjax.config._h"),
                    (probe, "llmjax.data.text._unit")}
  finally:
    for table in (MODULES, TREES, SOURCES, IMPORTS):
      del table[probe]
