"""The layers of the code, checked on every import statement (module level and inside functions):
lower layers never import higher ones, inference imports nothing of training, and no two modules
import each other, directly or through others."""
import ast
from pathlib import Path

import pytest

from support import REPO

PACKAGES = ("unet", "adapters", "train")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """{module: the adapterkit modules it imports}, names without the `adapterkit.` prefix."""
    graph = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name, found = module_name(path), set()
            here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = here[:len(here) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in node.names)
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adapterkit."):
                    target = node.module.removeprefix("adapterkit.")
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    found.update(a.name.removeprefix("adapterkit.") for a in node.names
                                 if a.name.startswith("adapterkit."))
            graph[name] = found
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


GRAPH = imports()

# (importer prefix, imported prefixes it must not reach)
RULES = [
    ("unet", ("adapters", "train")),
    ("adapters", ("train",)),
    ("train.data", ("train.jobs", "train.cli", "train.world")),
    ("train.pipeline", ("train.jobs", "train.cli", "train.world", "train.data")),
    ("train.jobs", ("train.cli", "train.world.demo")),
    ("train.world.shapes", ("train.jobs", "train.cli")),
    ("train.world.quality", ("train.jobs", "train.cli")),
]


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_graph_sees_the_tree():
    assert len(GRAPH) > 50
    assert {"train.jobs.loop", "adapters.lora"} <= GRAPH["train.jobs.lora"]     # absolute imports
    assert {"unet.config", "unet.model"} <= GRAPH["unet"]                      # relative ones


@pytest.mark.parametrize("importer, forbidden", RULES)
def test_lower_layers_never_import_higher_ones(importer, forbidden):
    bad = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if under(m, importer)
                 for t in targets if any(under(t, f) for f in forbidden))
    assert not bad, bad


def test_nothing_imports_the_command_line():
    bad = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if not under(m, "train.cli")
                 for t in targets if under(t, "train.cli"))
    assert not bad, bad


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(GRAPH[m]):
            if t.startswith(m + "."):                 # a package importing its own modules
                continue
            if state.get(t) == 1 and not m.startswith(t + "."):
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
