"""Dependencies point one way: data -> models -> training -> evaluation/conversion -> commands.

Read from the source with ``ast`` (nothing is imported, so it takes well under a second):

- each library module imports only its own layer or a lower one; ``data`` and ``models`` are two
  independent bottom layers (neither imports the other: what both need, such as the pixel
  normalisation and the tokens a tile or a pruned video takes, lives in ``megatron_vlm.media_tokens``);
- the commands (``megatron_vlm.cli``) and the data preparation (``megatron_vlm.data_prep``) are the
  top layer: no other library module imports them;
- the library imports none of ``bench`` and ``tests`` (nor the old top-level ``data_prep``/``tools``);
- no ``sys.path`` edits in the library or ``bench``;
- no private name (``_x``) of one library module is used by another.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBRARY = "megatron_vlm"
OUTSIDE = ("data_prep", "tools", "bench", "tests")

# Rank of each layer; a module may import its own layer and lower ranks. "data" and "models" share
# a rank but may not import each other (FORBIDDEN below).
RANKS = {
    "foundation": 0,    # the package, platform, distributed, media_tokens
    "data": 1,
    "models": 1,
    "training": 2,
    "evaluation": 3,
    "conversion": 3,
    "planning": 3,
    "entry": 4,         # megatron_vlm.train, the training command
    "cli": 5,           # the commands (run-stages, evaluate, convert, plan, demo)
    "data_prep": 5,     # offline data preparation (build-shards, inspect, the demo corpus)
}
FORBIDDEN = {("data", "models"), ("models", "data")}

# Modules outside a layer package.
LAYER_OF_MODULE = {
    "megatron_vlm.train": "entry",
    "megatron_vlm.planning": "planning",
}

# Known exceptions, each owned by a named change that removes it. An entry that no longer matches
# fails the test, so that it is dropped as soon as the import is gone.
ALLOWED: set = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(*tops: str):
    for top in tops:
        for path in sorted((REPO / top).rglob("*.py")):
            yield _module_name(path), path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def _layer(module: str) -> str:
    if module in LAYER_OF_MODULE:
        return LAYER_OF_MODULE[module]
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in RANKS:
        return parts[1]
    return "foundation"


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, tree: ast.AST):
    """(imported module, imported name or None, line) for every import, relative ones resolved."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node, is_package)
            for alias in node.names:
                yield target, alias.name, node.lineno


def _is_library_module(name: str) -> bool:
    return name == LIBRARY or name.startswith(LIBRARY + ".")


def _top(name: str) -> str:
    return name.split(".")[0]


def _allowed(seen: set, module: str, target: str) -> bool:
    for key in ALLOWED:
        if key[0] == module and (target == key[1] or target.startswith(key[1] + ".")):
            seen.add(key)
            return True
    return False


def test_library_imports_point_down_the_layers():
    seen, problems = set(), []
    for module, path, tree in _sources(LIBRARY):
        mine = _layer(module)
        for target, name, line in _imports(module, path, tree):
            where = f"{path.relative_to(REPO)}:{line}"
            if _top(target) in OUTSIDE:
                if not _allowed(seen, module, target):
                    problems.append(f"{where}: the library imports {target} (outside the library)")
                continue
            if not _is_library_module(target):
                continue
            # `from megatron_vlm.models import vlm` names a module: judge the module.
            full = f"{target}.{name}" if name and (REPO / (target.replace(".", "/")) / f"{name}.py").is_file() \
                else target
            theirs = _layer(full)
            if (mine, theirs) in FORBIDDEN or RANKS[theirs] > RANKS[mine]:
                if not _allowed(seen, module, full):
                    problems.append(f"{where}: {module} ({mine}) imports {full} ({theirs})")
    stale = sorted(k for k in ALLOWED if k[1] != "sys.path" and k not in seen)
    assert not problems, "imports against the layer order:\n" + "\n".join(sorted(set(problems)))
    assert not stale, f"ALLOWED entries no longer needed (drop them): {stale}"


def _edits_sys_path(node: ast.AST) -> bool:
    def is_sys_path(n):
        return isinstance(n, ast.Attribute) and n.attr == "path" and \
            isinstance(n.value, ast.Name) and n.value.id == "sys"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return is_sys_path(node.func.value)
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value))
                   for t in targets)
    return False


def test_no_sys_path_edits():
    seen, problems = set(), []
    for module, path, tree in _sources(LIBRARY, "bench"):
        for node in ast.walk(tree):
            if _edits_sys_path(node):
                if (module, "sys.path") in ALLOWED:
                    seen.add((module, "sys.path"))
                    continue
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: edits sys.path "
                                "(run it as `python -m`, or install the package)")
    stale = sorted(k for k in ALLOWED if k[1] == "sys.path" and k not in seen)
    assert not problems, "\n".join(problems)
    assert not stale, f"ALLOWED entries no longer needed (drop them): {stale}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_names_across_library_modules():
    problems = []
    for module, path, tree in _sources(LIBRARY):
        module_aliases = set()  # local names bound to another library module
        for target, name, line in _imports(module, path, tree):
            where = f"{path.relative_to(REPO)}:{line}"
            if not _is_library_module(target):
                continue
            if name is None:
                continue
            if (REPO / target.replace(".", "/") / f"{name}.py").is_file():
                module_aliases.add(name)
            elif _private(name) and target != module:
                problems.append(f"{where}: {module} imports private {target}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_library_module(alias.name) and alias.asname:
                        module_aliases.add(alias.asname)
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.asname and alias.name in module_aliases:
                        module_aliases.add(alias.asname)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and \
                    isinstance(node.value, ast.Name) and node.value.id in module_aliases:
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: {module} uses private "
                                f"{node.value.id}.{node.attr}")
    assert not problems, "private names used across modules:\n" + "\n".join(sorted(set(problems)))


def test_the_checks_see_a_violation(tmp_path):
    """The walkers find what they look for (a test that cannot fail is a defect)."""
    tree = ast.parse("import sys\nsys.path.insert(0, 'x')\nfrom megatron_vlm.training.loop import run\n"
                     "from .recipe import _build\n")
    assert sum(_edits_sys_path(n) for n in ast.walk(tree)) == 1
    fake = REPO / "megatron_vlm" / "models" / "fake.py"
    imports = list(_imports("megatron_vlm.models.fake", fake, tree))
    assert ("megatron_vlm.training.loop", "run", 3) in imports
    assert ("megatron_vlm.models.recipe", "_build", 4) in imports
    assert _layer("megatron_vlm.models.fake") == "models"
    assert RANKS[_layer("megatron_vlm.training.loop")] > RANKS["models"]
    assert ("data", "models") in FORBIDDEN
