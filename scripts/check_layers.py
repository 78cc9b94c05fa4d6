"""The package's layer order, and the check that its imports keep to it (`make lint` runs this).

Layers, top down. A module may import from its own layer and the layers below it, never from a
layer above. Layers joined by `|` are siblings: neither imports the other. Inside a layer the
modules may import each other, but no chain of imports anywhere runs in a circle.

An import inside a function must defer something heavy or optional: a third-party package the
module does not already load at import time (torch for commands that must not load it, vllm,
peft, lm_eval, matplotlib, ...), or a module of the package that loads one. Anything else
belongs at the top of the file, where a reader looks for it.

Sizes: no module over 700 lines; cli.py at most 400 (its flags are generated from the schema).

Run: python scripts/check_layers.py [PACKAGE_DIR]; exit 1 with one line per problem.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "simpo_cli"
LAYERS = [
    "__main__",
    "cli",
    "cli_recipes | cli_sweep",
    "flags",
    "run",
    "evaluate",
    "train",
    "onpolicy",
    "model",
    "launch",
    "faults",
    "outputs | data",
    "recipe",
    "stops",
    "losses | distributed | redact | errors | environment | progress",
]
MAX_LINES = 700
MAX_LINES_OF = {"cli": 400}
# Third-party packages whose import a function may defer: heavy at import time, or optional.
DEFERRABLE = {
    "torch", "transformers", "datasets", "accelerate", "deepspeed", "safetensors", "numpy",
    "pyarrow", "huggingface_hub", "tokenizers", "vllm", "peft", "bitsandbytes", "lm_eval",
    "matplotlib", "tiktoken", "flash_attn", "wandb", "tensorboard", "psutil", "tqdm", "scipy",
}  # fmt: skip


def _layer_table() -> dict[str, tuple[int, frozenset[str]]]:
    """Top-level name (a module or subpackage of the package) -> (floor, its siblings)."""
    table = {}
    for floor, entry in enumerate(LAYERS):
        names = frozenset(name.strip() for name in entry.split("|"))
        for name in names:
            table[name] = (floor, names - {name})
    return table


class Module:
    def __init__(self, name: str, path: Path, is_package: bool):
        self.name, self.path, self.is_package = name, path, is_package
        self.lines = len(path.read_text().splitlines())
        self.imports: list[tuple[int, str, bool]] = []  # (line, module, inside a function)

    @property
    def top(self) -> str:
        """Its top-level name inside the package: `run` for simpo_cli.run.pipeline."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else ""


def read_package(root: Path) -> dict[str, Module]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = Module(name, path, is_package)
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), str(module.path))
        _collect(module, tree, modules, in_function=False)
    return modules


def _collect(module: Module, node: ast.AST, modules: dict[str, Module], in_function: bool):
    for child in ast.iter_child_nodes(node):
        inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue  # never imported at run time
        if isinstance(child, ast.Import):
            for alias in child.names:
                module.imports.append((child.lineno, alias.name, inside))
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                package = module.name if module.is_package else module.name.rpartition(".")[0]
                anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = [f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in modules]
            if len(submodules) < len(child.names) or base not in modules:
                module.imports.append((child.lineno, base, inside))
            # `from pkg import submodule` imports the submodule (its parents are loaded with it)
            module.imports += [(child.lineno, name, inside) for name in submodules]
        _collect(module, child, modules, inside)


def _loaded_with(name: str, modules: dict[str, Module]) -> list[str]:
    """The module and its parent packages, which Python imports first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules]


def heavy_at_import(modules: dict[str, Module]) -> dict[str, set[str]]:
    """Module -> the deferrable third-party packages that importing it loads."""
    memo: dict[str, set[str]] = {}

    def visit(name: str, seen: frozenset[str]) -> set[str]:
        if name in memo:
            return memo[name]
        found: set[str] = set()
        for _, target, inside in modules[name].imports:
            if inside:
                continue
            if target.split(".")[0] in DEFERRABLE:
                found.add(target.split(".")[0])
            for loaded in _loaded_with(target, modules):
                if loaded not in seen and loaded != name:
                    found |= visit(loaded, seen | {name})
        memo[name] = found
        return found

    return {name: visit(name, frozenset()) for name in modules}


def problems(root: Path) -> list[str]:
    modules = read_package(root)
    table = _layer_table()
    heavy = heavy_at_import(modules)
    found = []
    order = " -> ".join(LAYERS)
    for module in modules.values():
        where = module.path.as_posix()
        limit = MAX_LINES_OF.get(module.name.removeprefix(f"{PACKAGE}."), MAX_LINES)
        if module.lines > limit:
            found.append(f"{where}: {module.lines} lines, over the limit of {limit}; split it")
        if module.top and module.top not in table:
            found.append(f"{where}: '{module.top}' has no layer; add it to LAYERS in {__file__}")
            continue
        for line, target, inside in module.imports:
            internal = target == PACKAGE or target.startswith(PACKAGE + ".")
            if inside and not _deferral_ok(module, target, internal, heavy, modules):
                found.append(
                    f"{where}:{line}: imports {target} inside a function, which defers nothing "
                    "heavy or optional; import it at the top of the file"
                )
            if not internal or target not in modules:
                continue
            other = modules[target]
            if not module.top or not other.top or other.top == module.top:
                continue
            (floor, siblings), (other_floor, _) = table[module.top], table[other.top]
            if other.top in siblings:
                found.append(
                    f"{where}:{line}: imports {target}, but {module.top} and {other.top} are "
                    f"sibling layers that must not import each other ({order})"
                )
            elif other_floor < floor:
                found.append(
                    f"{where}:{line}: imports {target}, a layer above {module.top}: imports "
                    f"point down {order}; move what both need to a lower layer"
                )
    found += [f"import circle: {' -> '.join(cycle)}" for cycle in circles(modules)]
    return found


def _deferral_ok(module, target, internal, heavy, modules) -> bool:
    if not internal:
        root = target.split(".")[0]
        return root in DEFERRABLE and root not in heavy[module.name]
    loaded = set().union(*(heavy[name] for name in _loaded_with(target, modules)))
    return bool(loaded - heavy[module.name])


def circles(modules: dict[str, Module]) -> list[list[str]]:
    """Every strongly connected group of modules (imports anywhere in a file count), each shown
    as one circle through it."""
    graph = {
        name: sorted(
            {
                loaded
                for _, target, _ in module.imports
                for loaded in _loaded_with(target, modules)
                if loaded != name and not modules[loaded].is_package
            }
        )
        for name, module in modules.items()
    }
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in graph:
        if node not in index:
            connect(node)
    return [_one_circle(sorted(group), graph) for group in groups]


def _one_circle(group: list[str], graph: dict[str, list[str]]) -> list[str]:
    start, members = group[0], set(group)
    path, seen = [start], {start}
    while True:  # walk inside the group until a module repeats
        nxt = next(n for n in graph[path[-1]] if n in members)
        if nxt in seen:
            return path[path.index(nxt) :] + [nxt]
        path.append(nxt)
        seen.add(nxt)


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else PACKAGE)
    found = problems(root)
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} problem(s) with the layer order; see scripts/check_layers.py")
        return 1
    print(f"imports keep the layer order: {' -> '.join(LAYERS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
