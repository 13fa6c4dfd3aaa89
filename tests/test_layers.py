"""The package's layering, declared once: every import (lazy and TYPE_CHECKING ones included) runs
from a package to itself or to a package below it, and no set of modules imports itself round.

The order, top to bottom, is the one docs/architecture.md draws; a new package goes into LAYERS
where its imports put it, and a test failure here means code sits in the wrong package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "agpo_megatron"
LAYERS = [
    "cli",  # the entry points
    "demo",  # the CPU demo and its multi-seed sweep
    "train",  # the loop and what it drives: Actor, PPO step, batches, hand-overs, run checkpoints
    "evals",  # pass@k and token tables, for the trainer, the demo and `agpo eval`
    "plan",  # before anything is allocated: config loading, preflight, the memory planner
    "bridge",  # Megatron <-> HF weights: the name table, the export stream, HF I/O
    "rollout",  # rollout engines (vLLM)
    "checkpoint",  # the checkpoint format: dist_checkpointing storage, sidecar, checksums, step folders
    "models",  # HF config -> Megatron GPTModel, forward passes, generated tiny models
    "ops",  # fused kernels
    "config",  # typed dataclasses, YAML + overrides
    "data",  # datasets, rewards, the synthetic tasks
    "algo",  # the algorithm: pure functions
    "report",  # metrics, plots, console
    "runtime",  # process groups, the CPU platform layer, watchdog, preemption, finiteness
]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str, modules: set[str]) -> set[str]:
    """The `agpo_megatron` modules `path` imports; `from pkg import mod` counts as `pkg.mod`, not `pkg`."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == PKG)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PKG:
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & modules
            out.update(subs or {target})
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in (root / PKG).rglob("*.py")}
    return {m: {t for t in imports_of(p, m, set(files)) if t in files and t != m} for m, p in files.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]], layers: list[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(layers)}
    bad = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            a, b = layer(mod), layer(t)
            if a == b or b == "":  # within a package; the package root holds docstrings only
                continue
            if a not in rank or b not in rank:
                bad.append(f"{mod} -> {t}: package not in LAYERS")
            elif rank[b] < rank[a]:
                bad.append(f"{mod} -> {t}: {b} sits above {a}")
    return bad


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_package_is_layered_and_top_level_is_packages():
    top = sorted(p.stem if p.is_file() else p.name for p in (ROOT / PKG).iterdir() if p.name != "__pycache__")
    modules = [n for n in top if (ROOT / PKG / f"{n}.py").is_file()]
    assert set(modules) <= {"__init__", "cli"}, f"loose modules at the package top: {modules}"
    packages = [n for n in top if (ROOT / PKG / n).is_dir()]
    assert sorted(packages) == sorted(LAYERS[1:]), "a package is missing from LAYERS, or LAYERS names a gone one"


def test_no_import_runs_up_a_layer():
    assert upward_imports(import_graph(ROOT), LAYERS) == []


def test_no_import_circle():
    assert circles(import_graph(ROOT)) == []


def test_package_docstrings_say_what_they_own():
    for name in LAYERS[1:]:
        doc = ast.get_docstring(ast.parse((ROOT / PKG / name / "__init__.py").read_text()))
        assert doc and 2 <= len(doc.splitlines()) <= 6, f"{name}/__init__.py needs a 2-5 line docstring"


@pytest.fixture
def planted(tmp_path):
    """A copy of the package's layout with one planted upward import, and one planted circle."""

    def write(rel: str, text: str) -> None:
        p = tmp_path / PKG / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    for name in LAYERS[1:]:
        write(f"{name}/__init__.py", "")
    write("__init__.py", "")
    write("runtime/parallel.py", "def f():\n    from agpo_megatron.train import trainer  # planted: runtime -> train\n")
    write("train/trainer.py", "from agpo_megatron.runtime.parallel import f\n")
    write("report/a.py", "from agpo_megatron.report import b\n")
    write("report/b.py", "from agpo_megatron.report.a import x\n")
    return tmp_path


def test_the_checks_catch_a_planted_upward_import_and_circle(planted):
    graph = import_graph(planted)
    assert upward_imports(graph, LAYERS) == [
        "agpo_megatron.runtime.parallel -> agpo_megatron.train.trainer: train sits above runtime"
    ]
    assert sorted(circles(graph)) == [
        ["agpo_megatron.report.a", "agpo_megatron.report.b"],
        ["agpo_megatron.runtime.parallel", "agpo_megatron.train.trainer"],
    ]
