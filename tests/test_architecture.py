"""The package's shape as a checked contract: no import cycles, no upward imports of the CLI,
no private names imported across modules, and the size limits of DESIGN.md §6.

The layer order itself is an import-linter contract in pyproject.toml (`lint-imports`,
run by `make test`); these checks cover what a layers contract cannot say.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "weightsmith"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the package."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("weightsmith", cache_dir=None)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_known_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules(graph: grimp.ImportGraph) -> None:
    """Function-level imports count too: a lazy import only hides a circle."""
    modules = set(_modules())
    edges: dict[str, set[str]] = {}
    for module in modules:
        # A package's __init__ re-exporting its own submodules is not a circle of ideas.
        imported = graph.find_modules_directly_imported_by(module) & modules
        edges[module] = {m for m in imported if not module.startswith(m + ".")}
    assert _cycles(edges) == []


def test_nothing_below_the_cli_imports_it(graph: grimp.ImportGraph) -> None:
    importers = {
        m
        for m in graph.find_modules_that_directly_import("weightsmith.cli")
        | set().union(
            *(graph.find_modules_that_directly_import(c) for c in graph.find_children("weightsmith.cli"))
        )
    }
    allowed = {m for m in importers if m == "weightsmith.__main__" or m.startswith("weightsmith.cli")}
    assert importers - allowed == set()


def _private_imports(source: str, module: str, where: str) -> list[str]:
    """`from weightsmith.x import _name` lines of `source` where x is not `module` itself."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            continue
        if not node.module.startswith("weightsmith") or node.module == module:
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(f"{where}:{node.lineno}: {node.module}.{alias.name}")
    return found


def test_private_import_scan() -> None:
    source = (
        "from weightsmith.eval.runner import _ticker, evaluate\n"
        "from weightsmith.files import write_text_atomic\n"
        "def f():\n    from weightsmith.mod import _own\n    from weightsmith.rails import _views\n"
    )
    assert _private_imports(source, "weightsmith.mod", "m.py") == [
        "m.py:1: weightsmith.eval.runner._ticker",
        "m.py:5: weightsmith.rails._views",
    ]


def test_no_private_name_is_imported_across_modules() -> None:
    found = [
        hit
        for module, path in _modules().items()
        for hit in _private_imports(
            path.read_text(encoding="utf-8"), module, str(path.relative_to(SRC.parent))
        )
    ]
    assert found == []


def test_files_and_functions_stay_small() -> None:
    too_long = []
    for path in _modules().values():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(SRC.parent)
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            too_long.append(f"{rel}: {lines} lines (limit {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = node.end_lineno - node.lineno + 1
                if span > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno}: {node.name} is {span} lines")
    assert too_long == []


def test_starting_the_cli_imports_no_heavy_optional_module() -> None:
    """Every command pays for what `weightsmith.cli.main` imports: torch._dynamo (about a
    second), torch.distributed.checkpoint and fastapi are imported where they are used."""
    import subprocess
    import sys

    heavy = ["torch._dynamo", "torch.distributed.checkpoint", "fastapi", "uvicorn"]
    code = f"import sys, weightsmith.cli.main; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_building_a_model_on_meta_imports_no_heavy_module() -> None:
    """Every load builds the model on the meta device first (checkpoint/build.py). There, an
    op without a meta kernel of its own (nn.Embedding's normal_ init, RoPE's arange and pow)
    runs through torch's Python reference ops, which import torch._dynamo: ~2 s of each load."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from weightsmith.models import CausalLM, ModelConfig\n"
        "cfg = ModelConfig.from_hf({'model_type': 'llama', 'vocab_size': 64, 'hidden_size': 32,\n"
        "    'intermediate_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 4,\n"
        "    'num_key_value_heads': 2, 'tie_word_embeddings': True})\n"
        "with torch.device('meta'):\n"
        "    model = CausalLM(cfg)\n"
        "assert model.model.embed_tokens.weight.is_meta and model.inv_freq.is_meta\n"
        "model.reset_rope()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
