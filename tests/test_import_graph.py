"""The dependency graph of ``src/jitkiln``, read from the source (every import, at any depth in a module):
no cycles, and no engine module imports a family (families and front ends own their hooks)."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "jitkiln"
# front ends for outside libraries live beside the families: they may import them, the engine may not
NOT_ENGINE = ("jitkiln.families", "jitkiln.aiter", "jitkiln.flashinfer")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in SRC.rglob("*.py")}
    g: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[:len(base) - node.level + 1]
                    root = ".".join(base + ([node.module] if node.module else []))
                else:
                    root = node.module or ""
                # `from pkg import sub` imports the submodule; `from pkg import name` the package itself
                targets = [f"{root}.{a.name}" if f"{root}.{a.name}" in mods else root for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and t.startswith("jitkiln"):
                    g[m].add(t)
    return g


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_engine_never_imports_a_family():
    g = graph()
    bad = {m: sorted(t for t in ts if t.startswith(NOT_ENGINE))
           for m, ts in g.items() if not m.startswith(NOT_ENGINE)}
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"engine modules importing families or front ends: {bad}"
    assert "jitkiln.build" in g and "jitkiln.families.demo" in g  # the graph is the real one


def test_files_stay_small_or_say_why():
    big = []
    for p in SRC.rglob("*.py"):
        n = len(p.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        if n > 400 and "longer than 400 lines" not in doc.lower():
            big.append(f"{p.relative_to(SRC)} ({n} lines)")
    assert not big, "files over ~400 lines without a reason in their docstring: " + ", ".join(big)
