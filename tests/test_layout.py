"""The library's shape: the documented direction of flow holds, and every library notebook reads
prose -> one public definition -> its visible test (export cells short, public names tested in sight)."""
import ast, json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB, NBS = ROOT / "xr0_lib", ROOT / "nbs"
# The documented flow (CONTRIBUTING.md): a module may import only from its own layer or layers to its left.
FLOW = ["core", "data", "knn", "augment", "models", "ssl", "train", "eval", "viz", "experiments", "matrix", "quickstart", "cli"]
MAX_EXPORT_LINES = 60
MAX_PUBLIC_DEFS = 2


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__": parts = parts[:-1]
    return ".".join(parts)


def layer(mod: str) -> int:
    part = mod.split(".")[1] if mod.count(".") else ""
    if mod == "xr0_lib": return -1
    if part not in FLOW: raise AssertionError(f"{mod}: not in the documented flow {FLOW}")
    return FLOW.index(part)


def xr0_imports(path: Path) -> list[tuple[str, int, bool]]:
    "(imported xr0 module, line, at top level) for each import of an xr0_lib module in `path`."
    tree = ast.parse(path.read_text())
    me = module_name(path).split(".")
    pkg = me if path.name == "__init__.py" else me[:-1]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else: mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import): mod, names = None, [a.name for a in node.names]
        else: continue
        for n in ([mod] if mod else []) + names:
            if n.startswith("xr0_lib"):
                # `from .pkg import module` names a module; `from .module import name` names the module
                target = n if (LIB.parent / (n.replace(".", "/") + ".py")).is_file() or (LIB.parent / n.replace(".", "/")).is_dir() else None
                if target and target != module_name(path): out.append((target, node.lineno, id(node) in top))
    return out


def modules():
    return [p for p in sorted(LIB.rglob("*.py")) if p.name != "_modidx.py"]


def test_imports_follow_the_flow():
    bad = []
    for p in modules():
        me = module_name(p)
        for dep, line, _ in xr0_imports(p):
            if dep == "xr0_lib": continue
            if layer(dep) > layer(me): bad.append(f"{p.relative_to(ROOT)}:{line} imports {dep} (right of {me} in the flow)")
    assert not bad, "back-edges against core -> data -> knn -> augment -> ... -> cli:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {module_name(p): {d for d, _, _ in xr0_imports(p)} for p in modules()}
    state = {}
    def visit(m, stack):
        if state.get(m) == 1: raise AssertionError("import cycle: " + " -> ".join(stack + [m]))
        if state.get(m) == 2: return
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d in graph: visit(d, stack + [m])
        state[m] = 2
    for m in sorted(graph): visit(m, [])


def test_imports_at_the_top():
    "An import inside a function needs a comment (on its line or the one above) naming the cost it avoids."
    bad = []
    for p in modules():
        lines = p.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                if "#" not in here and not above.strip().startswith("#"): bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    assert not bad, "imports below the top without a comment saying why:\n" + "\n".join(bad)


def test_modules_state_their_purpose():
    missing = [str(p.relative_to(ROOT)) for p in modules() if p.name != "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a one-line purpose at the top: {missing}"


def library_notebooks():
    return sorted(NBS.glob("[0-9]*.ipynb"))


def cells(nb: Path):
    for c in json.loads(nb.read_text())["cells"]:
        if c["cell_type"] == "code": yield "".join(c["source"])


def directive(src: str, name: str) -> bool:
    return any(re.match(rf"#\|\s*{name}\b", l) for l in src.splitlines()[:3])


def public_defs(src: str) -> list[str]:
    try: tree = ast.parse(src)
    except SyntaxError: return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("_")]


def shape_problems(nb: Path) -> list[str]:
    srcs = list(cells(nb))
    probs = []
    for i, s in enumerate(srcs):
        if not directive(s, "export"): continue
        n = len(s.splitlines())
        defs = public_defs(s)
        if n > MAX_EXPORT_LINES: probs.append(f"export cell {i} ({', '.join(defs) or s.splitlines()[1][:40]}) has {n} lines > {MAX_EXPORT_LINES}")
        if len(defs) > MAX_PUBLIC_DEFS: probs.append(f"export cell {i} defines {len(defs)} public names {defs} (at most {MAX_PUBLIC_DEFS})")
        later = [t for t in srcs[i + 1:] if not directive(t, "export") and not directive(t, "hide")]
        for d in defs:
            if not any(re.search(rf"\b{re.escape(d)}\b", t) and re.search(r"\bassert\b|\btest_\w+\(", t) for t in later):
                probs.append(f"public {d} (cell {i}) has no visible test below it")
    return probs


@pytest.mark.parametrize("nb", library_notebooks(), ids=lambda p: p.name)
def test_notebook_shape(nb):
    probs = shape_problems(nb)
    assert not probs, f"{nb.name}:\n" + "\n".join(probs)
