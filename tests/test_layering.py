"""The package's import layering, read from the sources with `ast` (nothing here imports jax).

Layers, lowest first (`LAYERS`): a module may import from a lower layer or from its own group;
`data` and `models` share a level but are independent of each other. Checked for every import
(module level, inside functions, under `if TYPE_CHECKING:`; `import a.b`, `from a import b`,
relative `from . import b`):
  1. no module imports from a higher layer (or from a sibling group of its own level);
  2. no import cycle among vidleak_jax modules (imports executed when the module is loaded);
  3. no module imports another module's private name (`from m import _x`, `import m._x`) or
     reads `m._x` of a module `m` it imported (dunder names and `__future__` are fine).
`vidleak_jax/__init__.py` is the package's façade: exempt as an importer; imported from inside the
package it counts as above every package layer. `experiments/` sits above everything.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib
from typing import AbstractSet, Iterable, Mapping

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "vidleak_jax"
FACADE = PACKAGE  # vidleak_jax/__init__.py
SCANNED = (PACKAGE, "experiments")  # top-level packages whose imports are checked

# (level, group, module prefixes): a prefix names a module and everything under it.
LAYERS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (0, "base", ("vidleak_jax.types", "vidleak_jax.registry", "vidleak_jax.io",
                 "vidleak_jax.tree_io", "vidleak_jax.training", "vidleak_jax.sweep",
                 "vidleak_jax.settings", "vidleak_jax.inputs",
                 "vidleak_jax.resources")),
    (1, "data", ("vidleak_jax.data",)),
    (1, "models", ("vidleak_jax.models",)),  # same level as data; neither imports the other
    (2, "fl", ("vidleak_jax.fl", "vidleak_jax.pretrain")),
    (3, "attack", ("vidleak_jax.attack",)),
    (4, "sr", ("vidleak_jax.sr",)),
    (5, "metrics", ("vidleak_jax.metrics", "vidleak_jax.metrics_lpips")),
    (6, "report", ("vidleak_jax.report",)),
    (7, "pipeline", ("vidleak_jax.pipeline",)),
    (8, "facade", ()),  # vidleak_jax itself (exact name only), see `layer_of`
    (9, "experiments", ("experiments",)),
)


@dataclasses.dataclass(frozen=True)
class Import:
  importer: str
  target: str  # the module imported from (or the module imported)
  line: int
  at_load: bool  # runs when the importer is loaded: not inside a function or `if TYPE_CHECKING:`


@dataclasses.dataclass
class Module:
  name: str
  is_package: bool
  imports: list[Import]
  private: list[str]  # "module:line ..." for each use of another module's private name


def layer_of(module: str) -> tuple[int, str] | None:
  """(level, group) of `module` by its longest matching prefix in LAYERS; None if unlisted."""
  if module == FACADE:
    return next((lvl, grp) for lvl, grp, _ in LAYERS if grp == "facade")
  best = None
  for level, group, prefixes in LAYERS:
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and (
          best is None or len(prefix) > len(best[0])):
        best = (prefix, level, group)
  return None if best is None else best[1:]


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _scanned(module: str) -> bool:
  return module.split(".")[0] in SCANNED


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def parse_module(name: str, source: str, *, is_package: bool, known: AbstractSet[str]) -> Module:
  """The imports of module `name` (of SCANNED packages only) and its uses of private names.

  `known`: every module name of the tree, to tell `from pkg import submodule` from
  `from pkg import name`.
  """
  tree = ast.parse(source, filename=name)
  mod = Module(name, is_package, [], [])
  bindings: dict[str, str] = {}  # local name -> module it refers to

  def add(target: str, node: ast.stmt, at_load: bool) -> None:
    imp = Import(name, target, node.lineno, at_load)
    if imp not in mod.imports:  # `from m import a, b` is one import of m
      mod.imports.append(imp)

  def private(node: ast.AST, what: str) -> None:
    mod.private.append(f"{name}:{node.lineno} {what}")

  def base_of(node: ast.ImportFrom) -> str:
    if not node.level:
      return node.module or ""
    parts = name.split(".") if is_package else name.split(".")[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))

  def visit(node: ast.AST, at_load: bool) -> None:
    if isinstance(node, ast.Import):
      for alias in node.names:
        if _scanned(alias.name):
          add(alias.name, node, at_load)
          if any(_is_private(p) for p in alias.name.split(".")[1:]):
            private(node, f"imports {alias.name}")
    elif isinstance(node, ast.ImportFrom):
      base = base_of(node)
      if _scanned(base):
        if any(_is_private(p) for p in base.split(".")[1:]):
          private(node, f"imports from {base}")
        for alias in node.names:
          sub = f"{base}.{alias.name}"
          add(sub if sub in known else base, node, at_load)  # `from pkg import submodule`
          if _is_private(alias.name):
            private(node, f"imports {alias.name} from {base}")
    elif isinstance(node, ast.Attribute):
      owner = resolve(node.value)
      if owner is not None and _is_private(node.attr):
        private(node, f"reads {owner}.{node.attr}")
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      at_load = False
    if isinstance(node, ast.If) and _is_type_checking(node.test):
      visit(node.test, at_load)
      for child in node.body:
        visit(child, False)
      for child in node.orelse:
        visit(child, at_load)
      return
    for child in ast.iter_child_nodes(node):
      visit(child, at_load)

  def resolve(node: ast.expr) -> str | None:
    """The module an expression names (`vio`, `vidleak_jax.attack.objectives`), else None."""
    if isinstance(node, ast.Name):
      return bindings.get(node.id)
    if isinstance(node, ast.Attribute):
      owner = resolve(node.value)
      if owner is not None and f"{owner}.{node.attr}" in known:
        return f"{owner}.{node.attr}"
    return None

  # The names bound to modules by imports anywhere in the file, before the walk reads attributes.
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if _scanned(alias.name):  # `import a.b` binds a; `import a.b as c` binds c to a.b
          local = alias.asname or alias.name.split(".")[0]
          bindings[local] = alias.name if alias.asname else local
    elif isinstance(node, ast.ImportFrom) and _scanned(base := base_of(node)):
      for alias in node.names:
        if f"{base}.{alias.name}" in known:
          bindings[alias.asname or alias.name] = f"{base}.{alias.name}"
  visit(tree, True)
  return mod


def layer_violations(modules: Iterable[Module]) -> list[str]:
  """'importer:line (layer) imports target (layer)' for each import from a higher layer."""
  out = []
  for mod in modules:
    if mod.name == FACADE:
      continue
    src = layer_of(mod.name)
    for imp in mod.imports:
      dst = layer_of(imp.target)
      if src is None or dst is None:
        continue  # unlisted modules are reported by test_every_module_has_a_layer
      if dst[0] > src[0] or (dst[0] == src[0] and dst[1] != src[1]):
        out.append(f"{mod.name}:{imp.line} ({src[1]}, layer {src[0]}) imports {imp.target} "
                   f"({dst[1]}, layer {dst[0]})")
  return out


def import_cycles(modules: Iterable[Module]) -> list[str]:
  """Each cycle of load-time imports among the given modules, as 'a:3 -> b:7 -> a'."""
  modules = {m.name: m for m in modules}
  edges: dict[str, dict[str, int]] = {n: {} for n in modules}
  for mod in modules.values():
    for imp in mod.imports:
      if imp.at_load and imp.target in modules:
        edges[mod.name].setdefault(imp.target, imp.line)
  # Tarjan's strongly connected components; each non-trivial one holds a cycle.
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components: list[list[str]] = []

  def connect(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      components.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      connect(v)
  out = []
  for component in components:
    start = component[0]
    if len(component) == 1 and start not in edges[start]:
      continue
    members = set(component)
    # Shortest path start -> ... -> start inside the component (breadth first).
    parent: dict[str, str] = {}
    frontier = [start]
    while start not in parent:
      nxt = []
      for v in frontier:
        for w in sorted(edges[v]):
          if w in members and w not in parent:
            parent[w] = v
            nxt.append(w)
      frontier = nxt
    path = [start]
    while True:
      path.append(parent[path[-1]])
      if path[-1] == start:
        break
    path.reverse()
    out.append(" -> ".join(f"{a}:{edges[a][b]}" for a, b in zip(path, path[1:])) + f" -> {start}")
  return sorted(out)


def private_uses(modules: Iterable[Module]) -> list[str]:
  return [use for mod in modules for use in mod.private]


def parse_sources(sources: Mapping[str, str], packages: Iterable[str] = ()) -> list[Module]:
  """Modules from {module name: source}; `packages` are the names that are `__init__.py`s."""
  packages, known = set(packages), frozenset(sources)
  return [parse_module(n, s, is_package=n in packages, known=known) for n, s in sources.items()]


@functools.lru_cache(maxsize=None)
def tree_modules() -> tuple[Module, ...]:
  """Every module of the repository's SCANNED packages."""
  files = {}
  for top in SCANNED:
    for path in sorted((ROOT / top).rglob("*.py")):
      parts = list(path.relative_to(ROOT).with_suffix("").parts)
      is_package = parts[-1] == "__init__"
      if is_package:
        parts.pop()
      files[".".join(parts)] = (path, is_package)
  known = frozenset(files)
  return tuple(parse_module(n, p.read_text(encoding="utf-8"), is_package=pkg, known=known)
               for n, (p, pkg) in files.items())


def _package_modules() -> list[Module]:
  return [m for m in tree_modules() if m.name.split(".")[0] == PACKAGE]


# ---- the repository ------------------------------------------------------------------------------


def test_every_module_has_a_layer():
  unlisted = [m.name for m in tree_modules() if layer_of(m.name) is None]
  assert unlisted == [], f"add these modules to LAYERS: {unlisted}"


def test_no_module_imports_from_a_higher_layer():
  assert layer_violations(tree_modules()) == []


def test_no_import_cycles():
  assert import_cycles(_package_modules()) == []


def test_no_private_names_of_other_modules():
  assert private_uses(tree_modules()) == []


# ---- the checker itself --------------------------------------------------------------------------


def _check(sources: Mapping[str, str], packages: Iterable[str] = ()) -> dict[str, list[str]]:
  modules = parse_sources(sources, packages)
  return {"layers": layer_violations(modules), "cycles": import_cycles(modules),
          "private": private_uses(modules)}


# Today's (now fixed) upward imports, as they were written.
UPWARD = {
    "fl -> attack": ("vidleak_jax.fl.captured",
                     "from vidleak_jax.attack.reconstruct import validate_target_grads\n",
                     "vidleak_jax.attack.reconstruct"),
    "base -> attack": ("vidleak_jax.tree_io",
                       "from vidleak_jax.attack.objectives import leaf_paths\n",
                       "vidleak_jax.attack.objectives"),
    "data -> report": ("vidleak_jax.data.video_io",
                       "from vidleak_jax.report.frames import encode_gif, to_rgb, to_uint8\n",
                       "vidleak_jax.report.frames"),
    "data -> models": ("vidleak_jax.data.clips", "from vidleak_jax.models import layers\n",
                       "vidleak_jax.models.layers"),
    "models -> data": ("vidleak_jax.models.victims", "import vidleak_jax.data.clips as clips\n",
                       "vidleak_jax.data.clips"),
    "function level": ("vidleak_jax.metrics",
                       "def f():\n  from vidleak_jax.report import frames\n  return frames\n",
                       "vidleak_jax.report.frames"),
    "relative": ("vidleak_jax.fl.captured", "from ..attack import reconstruct\n",
                 "vidleak_jax.attack.reconstruct"),
    "relative package": ("vidleak_jax.sr", "from ..pipeline import run\n",
                         "vidleak_jax.pipeline.run"),
    "type checking": ("vidleak_jax.types",
                      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "  from vidleak_jax.attack.config import AttackConfig\n",
                      "vidleak_jax.attack.config"),
    "facade": ("vidleak_jax.attack.engine", "import vidleak_jax as vl\n", "vidleak_jax"),
    "experiments": ("vidleak_jax.pipeline.run", "from experiments import cli\n", "experiments.cli"),
}


def test_checker_reports_upward_imports():
  for case, (importer, source, target) in UPWARD.items():
    sources = {importer: source, target: ""}
    found = _check(sources, packages={"vidleak_jax.sr"})["layers"]
    assert len(found) == 1 and found[0].startswith(f"{importer}:") and f" imports {target} " in (
        found[0]), (case, found)


def test_checker_accepts_downward_and_same_group_imports():
  sources = {
      "vidleak_jax": "from vidleak_jax import attack, pipeline\n",  # the façade is exempt
      "vidleak_jax.attack": "from . import objectives\nfrom .objectives import leaf_paths\n",
      "vidleak_jax.attack.objectives": "from vidleak_jax.tree_io import leaf_paths\n"
                                       "from vidleak_jax.fl import updates\n",
      "vidleak_jax.pipeline": "import vidleak_jax.attack.objectives\nfrom vidleak_jax import io\n"
                              "from vidleak_jax.report import frames\n"
                              "print(io.__name__, vidleak_jax.attack.objectives.__doc__)\n",
      "vidleak_jax.report.frames": "from vidleak_jax.data.video_io import encode_gif\n",
      "vidleak_jax.data.video_io": "from __future__ import annotations\nimport numpy as np\n"
                                  "print(np._core)\n",  # third-party privates: not ours to police
      "experiments.cli": "import vidleak_jax as vl\nfrom vidleak_jax.pipeline import run\n",
  }
  for name in ("vidleak_jax.tree_io", "vidleak_jax.fl.updates", "vidleak_jax.io"):
    sources[name] = ""
  packages = {"vidleak_jax", "vidleak_jax.attack", "vidleak_jax.pipeline"}
  assert _check(sources, packages) == {"layers": [], "cycles": [], "private": []}


def test_checker_reports_private_names():
  sources = {
      "vidleak_jax.metrics": "def _fold(a):\n  return a\n__all__ = []\n",
      "vidleak_jax.metrics_lpips": "from vidleak_jax.metrics import _check_clips, _fold\n",
      "vidleak_jax.report.a": "from vidleak_jax import metrics\nmetrics._fold(1)\n"
                              "print(metrics.__all__)\n",
      "vidleak_jax.report.b": "import vidleak_jax.metrics as m\ndef f():\n  return m._fold\n",
      "vidleak_jax.report.c": "import vidleak_jax.metrics\nvidleak_jax.metrics._fold(1)\n",
      "vidleak_jax.report.d": "from ..metrics import _fold as fold\n",
      "vidleak_jax.report.e": "def f():\n  from vidleak_jax import _internal\n",
  }
  found = _check(sources)["private"]
  assert found == [
      "vidleak_jax.metrics_lpips:1 imports _check_clips from vidleak_jax.metrics",
      "vidleak_jax.metrics_lpips:1 imports _fold from vidleak_jax.metrics",
      "vidleak_jax.report.a:2 reads vidleak_jax.metrics._fold",
      "vidleak_jax.report.b:3 reads vidleak_jax.metrics._fold",
      "vidleak_jax.report.c:2 reads vidleak_jax.metrics._fold",
      "vidleak_jax.report.d:1 imports _fold from vidleak_jax.metrics",
      "vidleak_jax.report.e:2 imports _internal from vidleak_jax",
  ]


def test_checker_reports_cycles_of_load_time_imports_only():
  sources = {
      "vidleak_jax.data.a": "from vidleak_jax.data import b\n",
      "vidleak_jax.data.b": "import os\n\nfrom vidleak_jax.data.a import x\n",
      # Imports inside functions or under TYPE_CHECKING do not run at load time.
      "vidleak_jax.data.c": "def f():\n  from vidleak_jax.data import d\n",
      "vidleak_jax.data.d": "import typing\nif typing.TYPE_CHECKING:\n"
                            "  from vidleak_jax.data import c\nfrom vidleak_jax.data import e\n",
      "vidleak_jax.data.e": "def g():\n  import vidleak_jax.data.d\n",
      "vidleak_jax.data.f": "from . import f\n",  # a module importing itself
  }
  assert _check(sources)["cycles"] == [
      "vidleak_jax.data.a:1 -> vidleak_jax.data.b:3 -> vidleak_jax.data.a",
      "vidleak_jax.data.f:1 -> vidleak_jax.data.f",
  ]
