"""The seams hold: the import graph has no loop and runs only downwards through the layers below, in-package
imports sit at the top of their modules, and only llmq/record.py reads `quantization_config` keys."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"llmq": REPO / "llmq", "llmq.kernels": REPO / "llmq" / "kernels", "llmq.eval": REPO / "eval"}

# Lowest first: a module may import only modules of earlier layers (or of its own layer, without a loop).
LAYERS = [
    ["llmq.errors", "llmq.version", "llmq.dtypes", "llmq.timing"],
    ["llmq.formats.grouping", "llmq.formats.packing", "llmq.formats.doublequant", "llmq.formats.scales",
     "llmq.formats.integer", "llmq.formats.codebook", "llmq.formats.nf", "llmq.formats.fp", "llmq.formats.ggml", "llmq.formats"],
    ["llmq.config", "llmq.verify"],
    ["llmq.qtensor"],
    ["llmq.algorithms.outliers", "llmq.algorithms.clipping", "llmq.algorithms.params", "llmq.algorithms.rtn",
     "llmq.algorithms.gptq", "llmq.algorithms.refine", "llmq.algorithms"],
    ["llmq.moe", "llmq.archs", "llmq.data", "llmq.calibration", "llmq.sources", "llmq.gguf_names", "llmq.recipes",
     "llmq.gguf_pretokenizers", "llmq.rotation"],
    ["llmq.checkpoint", "llmq.record", "llmq.codec"],
    ["llmq.kernels", "llmq.kernels.layout", "llmq.kernels.dequant", "llmq.kernels.gemm", "llmq.kernels.skinny"],
    ["llmq.backends.reference", "llmq.backends.cpu", "llmq.backends.triton", "llmq.backends"],
    ["llmq.nn"],
    ["llmq.lazy", "llmq.progress", "llmq.summary", "llmq.distributed"],
    ["llmq.pipeline.hessian", "llmq.pipeline.replay", "llmq.pipeline.solve", "llmq.pipeline.activations",
     "llmq.pipeline.experts", "llmq.pipeline.refine", "llmq.pipeline.layer", "llmq.pipeline", "llmq.sensitivity",
     "llmq.allocate",
     "llmq.mixed"],
    ["llmq.hf", "llmq.modeling"],
    ["llmq.exporters.common", "llmq.exporters.compressed_tensors", "llmq.exporters.gptq", "llmq.exporters.gguf",
     "llmq.exporters"],
    ["llmq.inspect", "llmq.eval", "llmq.eval.perplexity", "llmq.eval.run", "llmq.eval.report", "llmq.eval.plots"],
    ["llmq.convert", "llmq.targets"],
    ["llmq.cli", "llmq", "llmq.__main__"],
]  # fmt: skip
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}
# In-package imports allowed inside a function, and why:
LATE = {("llmq.backends.triton", "llmq.kernels.gemm"), ("llmq.backends.triton", "llmq.kernels.skinny")}  # Triton
# quantization_config keys (as string constants) that only llmq/record.py may use
RECORD_KEYS = {"quantization_config", "row_splits", "outlier_nnz", "permuted_modules", "format_version", "sentinel",
               "shapes", "overrides"}  # fmt: skip


def modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "llmq" and parts and parts[0] in ("kernels", "eval"):
                continue
            out[".".join([pkg, *parts])] = f
    return out


MODULES = modules()


def resolve(mod: str, node: ast.ImportFrom | ast.Import, is_pkg: bool) -> list[str]:
    """The in-package modules an import statement of module `mod` loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = mod.split(".") if is_pkg else mod.split(".")[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join(here + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return sorted({n for n in names if n in MODULES})


def edges() -> list[tuple[str, str, bool]]:
    """(importer, imported, at module level) for every in-package import."""
    out = []
    for mod, f in MODULES.items():
        tree = ast.parse(f.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in resolve(mod, node, f.name == "__init__.py"):
                    if target != mod:
                        out.append((mod, target, id(node) in top))
    return out


def test_every_module_has_a_layer():
    assert set(MODULES) - set(RANK) == set(), "add new modules to LAYERS"
    assert set(RANK) - set(MODULES) == set(), "LAYERS names modules that do not exist"


def test_imports_run_downwards_and_never_loop():
    up = [(a, b) for a, b, _ in edges() if RANK[b] > RANK[a]]
    assert up == [], "imports running back up the layers"
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                pytest.fail("import loop: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_in_package_imports_at_the_top():
    late = sorted({(a, b) for a, b, at_top in edges() if not at_top} - LATE)
    assert late == [], "in-package imports inside functions (move them up, or say why in LATE)"


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if m != "llmq.record"))
def test_only_the_record_reads_quantization_config(mod):
    tree = ast.parse(MODULES[mod].read_text())
    used = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in RECORD_KEYS}
    assert used == set(), f"{mod} reads quantization_config keys {used}: ask llmq.record.CheckpointRecord"


# ---- the whole tree: scripts too ----------------------------------------------------------------------------------
SCRIPT_DIRS = ("benchmarks", "tests", "examples")  # run with their own dir first on sys.path (and tests/ for tiny.py)


def scripts() -> dict[str, Path]:
    return {f"{d}/{f.stem}": f for d in SCRIPT_DIRS for f in sorted((REPO / d).glob("*.py"))}


def tree_edges() -> dict[str, set[str]]:
    """Every module of the tree (llmq's by dotted name, scripts as DIR/NAME) -> the modules of the tree it imports:
    `import X` in a script is X.py beside it, else tests/X.py (what benchmarks put on sys.path), else llmq's."""
    graph = {a: {b} for a, b, _ in edges()}
    for a, b, _ in edges():
        graph[a].add(b)
    for name, f in scripts().items():
        here = name.split("/")[0]
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                tops = [node.module]
            else:
                continue
            for t in tops:
                first = t.split(".")[0]
                if (REPO / here / f"{first}.py").is_file():
                    deps.add(f"{here}/{first}")
                elif (REPO / "tests" / f"{first}.py").is_file():
                    deps.add(f"tests/{first}")
                elif t in MODULES:
                    deps.add(t)
    return graph


def test_the_whole_tree_has_no_import_loop():
    """benchmarks, tests and examples included (issue 38: benchmarks/gguf.py and gguf_llama_cpp.py imported each
    other through a shim)."""
    graph = tree_edges()
    assert "benchmarks/common" in graph["benchmarks/families"] and "tests/tiny" in graph["benchmarks/families"]
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                pytest.fail("import loop: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_script_shadows_an_installed_module():
    """A script dir leads sys.path when its scripts run: a file there named like an installed module (gguf.py) hides
    that module from every script beside it."""
    import importlib.machinery
    import sys

    ours = {REPO, *(REPO / d for d in SCRIPT_DIRS)}
    outside = [p for p in sys.path if p and Path(p).resolve() not in ours]
    shadows = [n for n in scripts() if (stem := n.split("/")[1]) not in ("conftest",) and (
        stem in sys.builtin_module_names or importlib.machinery.PathFinder.find_spec(stem, outside) is not None)]
    assert shadows == []
