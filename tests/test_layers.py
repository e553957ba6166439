"""Imports point down the layers (DESIGN.md): common <- llama <- data <- training <- models <- runtime <- compress
<- eval <- serve <- visualizations <- runners <- bench, and no two parts of the project import each other in a
loop; and each folder keeps its role: runtime never imports compress, serve never llama (it drives runtime), eval
never training nor compress, bench never runners."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    "common",
    "llama",
    "data",
    "training",
    "models",
    "runtime",
    "compress",
    "eval",
    "serve",
    "visualizations",
    "runners",
    "bench",
]


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module in ``path``, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            # "from compress import prune" imports the module compress.prune
            for a in node.names:
                if (REPO / node.module.replace(".", "/") / f"{a.name}.py").is_file():
                    out.append((node.lineno, f"{node.module}.{a.name}"))
    return [(line, m) for line, m in out if m.split(".")[0] in LAYERS]


def sources():
    for layer in LAYERS:
        yield from sorted((REPO / layer).rglob("*.py")) if (REPO / layer).is_dir() else []


def module_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_imports_point_down_the_layers():
    upward = []
    for path in sources():
        here = LAYERS.index(path.relative_to(REPO).parts[0])
        for line, module in project_imports(path):
            if LAYERS.index(module.split(".")[0]) > here:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert upward == [], "imports that point up the layers:\n" + "\n".join(upward)


def test_no_import_loops_between_parts():
    # Parts are a layer's modules and sub-packages (eval.perplexity, compress.prune, training.trainer ...).
    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for path in sources():
        src = part(module_of(path))
        graph.setdefault(src, set()).update(part(m) for _, m in project_imports(path) if part(m) != src)
    loops, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                loops.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert loops == [], "import loops:\n" + "\n".join(loops)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    # the checker itself: a llama module importing training must be caught
    bad = tmp_path / "llama" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("import os\ndef f():\n    from training.trainer import train\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert project_imports(bad) == [(3, "training.trainer")]


ROLES = {  # (layer, a layer below it that it must not import): each folder keeps its role (DESIGN.md)
    ("serve", "eval"): "serve drives runtime, never the evaluators",
    ("serve", "llama"): "serve decodes through runtime, never the model's own functions",
    ("eval", "compress"): "eval measures models compress made; runtime loads them",
    ("eval", "training"): "eval reads held-out data through data/, never the trainer's modules",
    ("runtime", "compress"): "runtime is the inference core, directly above models/ and llama/",
    ("runtime", "training"): "runtime never trains",
    ("runtime", "data"): "runtime decodes tokens; data preparation is not its business",
    ("bench", "runners"): "benchmarks share helpers through common/ and the layers below, not runners/",
}


def test_each_folder_keeps_its_role():
    found = []
    for path in sources():
        layer = path.relative_to(REPO).parts[0]
        for line, module in project_imports(path):
            why = ROLES.get((layer, module.split(".")[0]))
            if why:
                found.append(f"{path.relative_to(REPO)}:{line} imports {module} ({why})")
    assert found == [], "\n".join(found)


def family_branches(path: Path) -> list[str]:
    """Where code compares a model's ``family`` or looks it up in a table of its own: what differs by family is
    a family's definition (models/families.py), never a branch on its name."""

    def is_family(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "family") or (
            isinstance(node, ast.Name) and node.id == "family"
        )

    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and any(is_family(n) for n in [node.left, *node.comparators]):
            out.append(f"{path.name}:{node.lineno} compares a family")
        elif isinstance(node, ast.Subscript) and is_family(node.slice):
            out.append(f"{path.name}:{node.lineno} looks a family up in a table")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            if node.args and is_family(node.args[0]):
                out.append(f"{path.name}:{node.lineno} looks a family up in a table")
    return sorted(out)


def test_no_branch_on_a_family_name_outside_the_family_definitions(tmp_path):
    allowed = REPO / "models" / "families.py"
    found = [hit for path in sources() if path != allowed for hit in family_branches(path)]
    assert found == [], "\n".join(found)
    bad = tmp_path / "bad.py"  # the check finds what it looks for
    bad.write_text(
        'def f(m):\n    if m.family == "llama":\n        return TABLE[m.family]\n    return T.get(m.family)\n'
    )
    assert family_branches(bad) == [
        "bad.py:2 compares a family",
        "bad.py:3 looks a family up in a table",
        "bad.py:4 looks a family up in a table",
    ]


def test_no_function_is_over_80_lines():
    """A function a reader holds in view: none of the project's (tests aside) runs over 80 lines."""
    long = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert long == [], "\n".join(long)
