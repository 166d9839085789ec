"""The shape of the code: layers, no import circle, thin notebooks that name capabilities, the layout as documented.

The layers of ``../shared/DESIGN.md`` (README, Development), from the bottom: parameters, registry, results and
environment -> attention, data, models -> engines -> metrics -> report -> the runner. A module imports only from
its own layer or below; every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LIB = ROOT / "lib" / "sagecheck"
# every top-level module or package of lib/sagecheck, by layer (README's Development section lists the same)
LAYERS = {
    "__init__": 0, "params": 0, "registry": 0, "results": 0, "environment": 0, "runtime": 0, "redact": 0, "notebooks": 0,
    "thresholds": 0, "backend_stats": 0, "census": 0, "cuda_capture": 0, "gpu_clocks": 0,
    "attention": 1, "data": 1, "models": 1, "sources": 1,
    "engines": 2, "sglang_plugin": 2,
    "metrics": 3,
    "report": 4, "show": 4, "plots": 4, "session": 4, "templating": 4,
    "run": 5, "__main__": 5, "kernel": 5, "forkserver": 5, "papermill_cli": 5,
}
NEVER = [("engines", "metrics"), ("models", "engines"), ("params", "models"), ("metrics", "report"), ("engines", "report")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in LIB.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The sagecheck modules ``path`` imports (a name imported from a package that is a module counts as that module)."""
    out = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("sagecheck"):
                while name and name not in known:
                    name = name.rsplit(".", 1)[0] if "." in name else ""
                if name and name != module_name(path):
                    out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in LIB.iterdir() if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert tops == set(LAYERS), f"not in LAYERS: {tops - set(LAYERS)}; gone: {set(LAYERS) - tops}"


def test_no_import_runs_up_a_layer():
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            if top(dep) != top(mod) and LAYERS[top(dep)] > LAYERS[top(mod)]:
                bad.append(f"{mod} -> {dep}")
            if (top(mod), top(dep)) in NEVER:
                bad.append(f"{mod} -> {dep} (never)")
    assert not bad, bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of ``g`` (node -> the nodes it imports) meets, each as the path round it."""
    state: dict[str, int] = {}
    found = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circle():
    found = cycles(graph())
    assert not found, found


def test_cycles_finds_a_loop_and_passes_a_tree():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_loop_between_packages():
    """Nor round about through the package level (report -> plots -> show -> report was one, by lazy imports)."""
    g: dict[str, set[str]] = {}
    for mod, deps in graph().items():
        g.setdefault(top(mod), set()).update(top(d) for d in deps if top(d) != top(mod))
    loops = cycles(g)
    assert not loops, loops


def test_measurements_and_the_report_talk_to_engines_through_the_protocol_only():
    """Metrics, the report and the notebooks' helpers import the protocol (``sagecheck.engines``), never an engine of
    it; nothing but the plugin itself imports the plugin (SGLang's processes load it through its entry point)."""
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            concrete = dep.startswith(("sagecheck.engines.sglang", "sagecheck.engines.hf"))
            if concrete and top(mod) in ("metrics", "report", "show", "plots", "session", "run", "__main__"):
                bad.append(f"{mod} -> {dep}")
            if dep.startswith("sagecheck.sglang_plugin") and top(mod) != "sglang_plugin":
                bad.append(f"{mod} -> {dep} (the plugin)")
    assert not bad, bad


def test_only_the_plugins_own_tests_import_it():
    """Its own tests (test_sglang_plugin*.py), the stand-in SGLang and the deliberately wrong plugins built on it; no
    other test."""
    allowed = {"standin", "faults"}
    users = []
    for path in (ROOT / "tests").rglob("*.py"):
        rel = path.relative_to(ROOT / "tests")
        imports_it = re.search(r"^\s*(from|import)\s+sagecheck\.sglang_plugin", path.read_text(), flags=re.M)
        if imports_it and rel.parts[0] not in allowed and not rel.name.startswith("test_sglang_plugin"):
            users.append(str(rel))
    assert not users, users


def test_no_engine_is_named_outside_the_engines():
    """``engine == "sglang"`` and its kind live in ``engines/``: elsewhere an engine is what its registry entry and its
    recorded facts say."""
    found = []
    for path in LIB.rglob("*.py"):
        if path.relative_to(LIB).parts[0] in ("engines", "sglang_plugin", "registry.py"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""engine\s*[!=]=\s*["'](sglang|hf)["']|["'](sglang|hf)["']\s*[!=]=\s*\w*engine""", line):
                found.append(f"{path.relative_to(LIB)}:{i}: {line.strip()}")
    assert not found, found


def code_lines(nb_path: Path) -> list[str]:
    """The code lines of a notebook outside its parameters cell (no blank lines, no comments)."""
    nb = json.loads(nb_path.read_text())
    return [line for c in nb["cells"] if c["cell_type"] == "code" and "parameters" not in c.get("metadata", {}).get("tags", [])
            for line in "".join(c["source"]).splitlines() if line.strip() and not line.strip().startswith("#")]


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_thin_and_ask_for_capabilities_not_engines(path):
    lines = code_lines(path)
    assert len(lines) <= 40, f"{path.name}: {len(lines)} code lines"
    code = "\n".join(lines)
    assert "P.engine" not in code and ".engine ==" not in code
    assert not re.search(r"""["'](hf|sglang|transformers)["']""", code), "a notebook names an engine"


def test_the_layout_of_the_design_is_the_tree():
    """README's Development section lists the package's top level with each entry's layer; DESIGN.md's layout (where
    the shared folder is there) names entries that exist."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("<!-- layout -->"):readme.index("<!-- /layout -->")]
    listed = set(re.findall(r"^\s{2}(\w+)(?:\.py|/)", block, flags=re.M))
    assert listed == set(LAYERS) - {"__init__", "__main__"}, (listed ^ (set(LAYERS) - {"__init__", "__main__"}))
    for name in listed:
        assert (LIB / f"{name}.py").is_file() or (LIB / name / "__init__.py").is_file(), name
    assert (ROOT / "tools" / "train_builtin_model.py").is_file()
    design = ROOT.parent / "shared" / "DESIGN.md"
    if design.is_file():
        text = design.read_text()
        tree = text[text.index("lib/sagecheck/"):text.index("tools/")]
        for name in re.findall(r"^\s{2}(\w+)(?:\.py|/)", tree, flags=re.M):
            assert (LIB / f"{name}.py").is_file() or (LIB / name).is_dir(), f"DESIGN.md names {name}, the tree lacks it"


def test_the_command_line_and_the_report_start_without_torch():
    """`sagecheck run` (its own process: the notebooks run in kernels), `report` and `params` import no torch, which
    costs about 2 s of every start on CI's CPU; the notebooks' kernels import it (and `compare`, for 08's readings)."""
    code = ("import sys; import sagecheck.__main__, sagecheck.run, sagecheck.report; "
            "from sagecheck.report import recommendation, summary; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
