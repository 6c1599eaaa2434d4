"""The package's layers (docs/architecture.md): imports point one way, core/ is pure torch, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "mocoray"

# What each layer (a sub-package or a top-level module of mocoray) may import from the others.
# cli -> jobs -> (tracking, detection, data, encoders, checkpoints) -> core; config and the small
# top-level helpers sit beside them.
ALLOWED = {
    "core": set(),
    "detection": {"core"},
    "config": {"core", "detection"},
    "data": {"config", "core", "storage"},
    "storage": set(),
    "table": set(),
    "checkpoints": {"storage", "core"},
    "tracking": {"data", "storage", "table", "config", "core", "__init__"},
    "encoders": {"checkpoints", "config", "core", "storage", "tracking"},
    "jobs": {"checkpoints", "config", "core", "data", "detection", "encoders", "storage", "table", "tracking",
             "__init__"},
    "cli": {"checkpoints", "config", "core", "data", "detection", "encoders", "jobs", "storage", "table",
            "tracking", "__init__"},
}
# Third-party frameworks a layer must not import, even lazily inside a function.
FORBIDDEN = {
    "core": ("ray", "mlflow"),
    "detection": ("ray", "mlflow"),
    "data": ("mlflow",),
    "config": ("ray", "mlflow"),
}
MAX_LINES = 400


def _layer(module: str) -> str:
    """`mocoray.jobs.pretrain.loop` -> `jobs`; `mocoray` itself (its `__version__`) -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and not parts[1].startswith("__") else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if node.module:
                found.append((node.lineno, module))
            else:  # `from .. import storage`: each name may be a module
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_layer_imports_only_the_layers_below_it():
    wrong = []
    for path in _modules():
        own = _layer(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for line, module in _imports(path):
            if not module.startswith("mocoray"):
                continue
            target = _layer(module)
            if target != own and target not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({own}) imports {module} ({target})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_core_detection_and_config_import_neither_ray_nor_mlflow():
    wrong = []
    for path in _modules():
        own = _layer(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for line, module in _imports(path):
            if module.split(".")[0] in FORBIDDEN.get(own, ()):
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_layer_table_covers_every_layer_in_the_package():
    layers = {_layer(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in _modules()}
    assert layers - {"__init__"} <= set(ALLOWED), f"add the new layer to ALLOWED: {layers - set(ALLOWED)}"


def test_no_module_is_longer_than_a_reader_can_follow():
    long = [f"{p.relative_to(PACKAGE)}: {n} lines" for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"split these modules (at most {MAX_LINES} lines each):\n" + "\n".join(long)


def test_relative_imports_resolve_to_their_absolute_module():
    """The checks above only see what `_imports` resolves: `from .queue import` in core/moco.py is core's queue,
    `from ... import storage` in a job's module is the top-level storage module."""
    assert "mocoray.core.queue" in {m for _, m in _imports(PACKAGE / "core" / "moco.py")}
    assert "mocoray.storage" in {m for _, m in _imports(PACKAGE / "jobs" / "pretrain" / "driver.py")}
    assert _layer("mocoray.jobs.pretrain.loop") == "jobs" and _layer("mocoray") == "__init__"
