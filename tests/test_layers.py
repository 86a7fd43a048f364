"""No module imports from a layer above its own (docs/ARCHITECTURE.md, "Layers"), and the layers that validate
input before any heavy work never load torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distlin"
LAYERS = [  # (layer, modules matching): the first match wins
    (7, r"(cli|app|bench|distill)\b"),
    (6, r"run$"),
    (5, r"(settings|memory|loading|components|schedulers|families\.\w+\.memory$)\b"),  # a family's plan
    (1, r"(presets|sources|io|inputs|sampling\.stages|models\.architectures)$"),
    (0, r"(thresholds|errors|notices|progress|sizes|commands|ranks)$"),
    (4, r"(sampling\b|families\.\w+\.sdedit$)"),  # a family's cascade sampler is a sampler
    # layer 3 package by package: each may import those listed below it
    (3.6, r"parallel\.pipeline$"),  # parallelize(pipe): the family's rewrite of a whole pipeline
    (3.5, r"families\b"),
    (3.4, r"vae\b"),
    (3.3, r"parallel\b"),
    (3.2, r"lean\b"),
    (3.1, r"(linfusion|models)\b"),
    (2, r"(ops|surgery)\b"),
]


def layer_of(module: str) -> float | None:
    name = module.removeprefix("distlin").removeprefix(".")
    return next((layer for layer, pattern in LAYERS if re.match(pattern, name)), None)


def test_every_import_goes_down_the_layers() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module)
        if module == "distlin":
            continue  # the package's lazy exports
        assert own is not None, f"{module} is in no layer of docs/ARCHITECTURE.md"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distlin."):
                target = layer_of(node.module)
                if target is not None and target > own:
                    upward.append(f"{module} (layer {own}) imports {node.module} (layer {target})")
    assert not upward, "\n".join(upward)


def test_input_checks_import_neither_torch_nor_diffusers() -> None:
    code = (
        "import sys, distlin.cli.generate, distlin.settings;"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_only_distlin_ranks_reads_the_rank_variables() -> None:
    """torchrun's RANK, WORLD_SIZE and LOCAL_RANK are read in one place (distlin/ranks.py)."""
    variable = r"[\"'](RANK|WORLD_SIZE|LOCAL_RANK)[\"']"
    reading = re.compile(rf"environ(\.get\(|\[){variable}|{variable} in ")
    readers = [
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if path.name != "ranks.py" and reading.search(path.read_text(encoding="utf-8"))
    ]
    assert not readers, readers


def _imports() -> dict[str, set[str]]:
    """Every distlin module and the distlin modules it imports anywhere (at the top, in a function, for types)."""
    paths = {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in paths:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in paths)
        graph[module] = targets - {module}
    return graph


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph, cycles = _imports(), []
    for start in graph:
        seen, todo = set(), [(start, (start,))]
        while todo:
            module, path = todo.pop()
            for target in graph[module]:
                if target == start:
                    cycles.append(" -> ".join((*path, start)))
                elif target not in seen:
                    seen.add(target)
                    todo.append((target, (*path, target)))
    assert not cycles, "\n".join(sorted(cycles))
