"""The package's import graph runs one way: every import, at the top of a module or inside a function,
goes to the same layer or a lower one; no two modules import each other, through any path; and the
library layers import no Ray."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, "mura_ray")

# Low to high. A module is in the layer of its longest matching name (a package or a module).
LAYERS = [
    ("base", ["", "errors", "hardware", "faults", "console", "progress", "versions"]),
    ("archive", ["archive"]),
    ("imaging", ["imaging"]),
    ("model", ["model"]),
    ("reporting", ["reporting"]),  # figures and documents of a model: metrics, calibration, plots, card, guard
    ("settings", ["options", "checks", "recipes", "config", "cluster", "data"]),
    ("jobs", ["training", "scoring"]),
    ("review", ["review", "bench"]),  # evaluate, explain, monitor; the benchmarks
    ("app", ["cli", "verbs", "demo", "doctor"]),
]
RAY_FREE = {"archive", "imaging", "model", "reporting"}


def _modules() -> dict[str, str]:
    """Dotted name under mura_ray ('' for the package itself) -> file."""
    found = {}
    for folder, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[: -len(".py")].replace(os.sep, ".")
                found[rel.removesuffix("__init__").rstrip(".")] = os.path.join(folder, name)
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"mura_ray.{module} is in no layer: add it to LAYERS"
    return best[0]


def _imports(module: str) -> list[tuple[int, str]]:
    """(line, imported name) of every import in ``module``, anywhere in it; names under mura_ray are given
    as the module they resolve to ('' for the package), others whole."""
    out = []
    for node in ast.walk(ast.parse(open(MODULES[module]).read())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"mura_ray.{module}:{node.lineno}: relative import"
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.append((node.lineno, full if full.removeprefix("mura_ray.") in MODULES else node.module))
    return sorted({(line, name) for line, name in out if name})


def _own(name: str) -> str | None:
    if name == "mura_ray":
        return ""
    return name.removeprefix("mura_ray.") if name.startswith("mura_ray.") else None


def test_every_import_goes_to_its_own_layer_or_a_lower_one():
    upward = []
    for module in MODULES:
        for line, name in _imports(module):
            target = _own(name)
            if target is not None and _layer(target) > _layer(module):
                upward.append(
                    f"mura_ray.{module}:{line} ({LAYERS[_layer(module)][0]}) imports {name} "
                    f"({LAYERS[_layer(target)][0]})"
                )
    assert not upward, "\n".join(upward)


def test_no_module_reaches_itself_through_its_imports():
    graph = {m: {t for _, n in _imports(m) if (t := _own(n)) is not None and t in MODULES and t != m} for m in MODULES}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join(f"mura_ray.{m}".rstrip(".") for m in [*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, "\n".join(sorted(cycles))


def test_the_library_layers_import_no_ray():
    found = [
        f"mura_ray.{m}:{line} imports {name}"
        for m in MODULES
        if LAYERS[_layer(m)][0] in RAY_FREE
        for line, name in _imports(m)
        if name == "ray" or name.startswith("ray.")
    ]
    assert not found, "\n".join(found)


def test_every_module_is_in_a_layer_and_the_layers_name_real_modules():
    for module in MODULES:
        _layer(module)
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            assert prefix in MODULES, f"LAYERS names {prefix!r}, which is no module or package of mura_ray"


def test_building_a_dataset_never_starts_ray_by_itself():
    """A job connects to Ray once, on purpose; a dataset builder called before that raises and starts nothing."""
    import subprocess
    import sys

    code = """
import pyarrow as pa, ray
from mura_ray.scoring.heatmaps import heatmap_dataset
from mura_ray.scoring.pipeline import ScoringSettings, scored_dataset
keys = pa.table({"image_uri": pa.array([], pa.string())})
for build in (lambda: scored_dataset(keys, b"", {}, ScoringSettings(data="/tmp")),
              lambda: heatmap_dataset(keys, b"", {}, "/tmp", placement=("no", 1.0, 0.0))):
    try:
        build()
    except RuntimeError as exc:
        print(exc)
assert not ray.is_initialized()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [
        "scored_dataset needs Ray: call mura_ray.cluster.connect() first",
        "heatmap_dataset needs Ray: call mura_ray.cluster.connect() first",
    ]
