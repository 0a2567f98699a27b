"""The shape of the code (docs/architecture.md): imports point down the layer order, never up or in circles;
an import inside a function is only for an optional or heavy dependency and says so; nothing outside tests/ imports
from tests/; fault-injection variables are read in one module; atomic writes, rank detection and MDS index reading
each exist once."""
import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "pixart_ds")

# Lowest first. A module may import modules of its own layer or of lower layers only. model, diffusion and data sit
# side by side above config; diffusion and data use model's encoders; eval uses all three; train runs them.
LAYERS = [
    {"fsutil", "dist", "hardware"},
    {"config"},
    {"model"},
    {"diffusion", "data"},
    {"eval"},
    {"train"},
    {"bench"},
    {"testing", "commands", "cli"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

# Modules an import inside a function may name, each an optional or heavy dependency.
LAZY_OK = ("flash_attn", "wandb", "torch.utils.tensorboard", "matplotlib", "spacy", "open_clip",
           "torch.nn.attention.varlen", "pixart_ds.eval")
LAZY_REASON = re.compile(r"#.*\b(optional|heavy)\b")
# Scripts that start on a bare GPU machine before its packages are known to import: they import late so that
# `--check-imports` (and the kit installer) can name what is missing instead of dying at the top.
LATE_IMPORT_SCRIPTS = ("benchmarks/gpu_mfu.py", "benchmarks/gpu_kit.py")


def _py_files(*roots):
    for root in roots:
        for d, _, files in os.walk(root):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(d, f)


def _module(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str):
    """(imported module, line number, inside a function) for every import statement of a file."""
    tree = ast.parse(open(path).read(), path)
    func_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    func_lines.add(sub.lineno)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, node.lineno in func_lines
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import")
            if node.module == "pixart_ds":
                for a in node.names:
                    yield f"pixart_ds.{a.name}", node.lineno, node.lineno in func_lines
            else:
                yield node.module, node.lineno, node.lineno in func_lines


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_imports_follow_the_layer_order():
    bad = []
    for path in _py_files(PKG):
        me = _module(path)
        if me == "pixart_ds":
            continue
        assert _layer(me) in RANK, f"{me}: not in the layer list of tests/test_layout.py (add it, lowest first)"
        for mod, line, _ in _imports(path):
            if not mod.startswith("pixart_ds."):
                continue
            if RANK[_layer(mod)] > RANK[_layer(me)]:
                bad.append(f"{os.path.relpath(path, REPO)}:{line}: {me} imports {mod} (a higher layer)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {}
    for path in _py_files(PKG):
        me = _module(path)
        graph[me] = {m for m, _, _ in _imports(path) if m.startswith("pixart_ds.")}
    modules = set(graph)

    def target(m):  # `from pixart_ds.data import convert` names a module; `from pixart_ds.config import X` does not
        while m not in modules and "." in m:
            m = m.rsplit(".", 1)[0]
        return m

    graph = {k: {target(m) for m in v} - {k, "pixart_ds"} for k, v in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_inside_functions_are_optional_or_heavy_and_say_so():
    bad = []
    for path in _py_files(PKG, os.path.join(REPO, "benchmarks")):
        if os.path.relpath(path, REPO) in LATE_IMPORT_SCRIPTS:
            continue
        lines = open(path).read().splitlines()
        for mod, line, lazy in _imports(path):
            if not lazy:
                continue
            said = LAZY_REASON.search(lines[line - 1]) or (line > 1 and LAZY_REASON.search(lines[line - 2]))
            if not mod.startswith(LAZY_OK) or not said:
                bad.append(f"{os.path.relpath(path, REPO)}:{line}: `import {mod}` inside a function")
    assert not bad, "\n".join(bad)


def test_nothing_outside_tests_imports_from_tests():
    bad = []
    for path in _py_files(PKG, os.path.join(REPO, "benchmarks")):
        text = open(path).read()
        for mod, line, _ in _imports(path):
            if mod == "tests" or mod.startswith("tests.") or mod.endswith("_helpers"):
                bad.append(f"{os.path.relpath(path, REPO)}:{line}: imports {mod}")
        if re.search(r"sys\.path\.(insert|append)\(.*tests", text):
            bad.append(f"{os.path.relpath(path, REPO)}: puts tests/ on sys.path")
    assert not bad, "\n".join(bad)


def _count(pattern: str, roots=(PKG,)) -> list[str]:
    rx = re.compile(pattern)
    hits = []
    for path in _py_files(*roots):
        for i, line in enumerate(open(path).read().splitlines(), 1):
            if rx.search(line):
                hits.append(f"{os.path.relpath(path, REPO)}:{i}")
    return hits


@pytest.mark.parametrize("what, pattern, where", [
    # a temporary file renamed over its target: only pixart_ds/fsutil.py does it (checkpoint and shard commits
    # rename whole staged folders and merged indexes, which are not helpers)
    ("atomic write helper", r"^\s*def \w*atomic\w*\(", "pixart_ds/fsutil.py"),
    # the launcher environment -> ranks: pixart_ds/dist.py only
    ("rank detection", r"^\s*def (dist_env|launch_ranks|rank_env|rank_world|_rank)\(", "pixart_ds/dist.py"),
    # index.json parsed: pixart_ds/data/schema.py only
    ("MDS index reader", r"[\"']shards[\"']", "pixart_ds/data/schema.py"),
])
def test_one_implementation(what, pattern, where):
    hits = _count(pattern)
    assert hits and {h.split(":")[0] for h in hits} == {where}, f"{what}: {hits}"


def test_fault_injection_variables_are_read_in_one_module():
    hits = _count(r"PIXART_DS_(TEST_|INJECT_|CAPTION_KILL)")
    assert {h.split(":")[0] for h in hits} == {"pixart_ds/train/faults.py"}, hits
    readers = _count(r"os\.environ")
    assert not [h for h in readers if h.startswith(("pixart_ds/train/step.py", "pixart_ds/train/trainer.py",
                                                     "pixart_ds/train/checkpoint.py"))], readers
