"""The package's parts import only downwards (kvmtests/__init__.py): the machine layer stays usable alone."""
import ast
from pathlib import Path

import pytest

import kvmtests

pytestmark = pytest.mark.selftest
PACKAGE = Path(kvmtests.__file__).parent
# part -> the parts it may import (besides itself)
ALLOWED = {
    "uapi": set(),
    "hvtlfs": set(),
    "machine": {"uapi", "hvtlfs"},
    "verdict": {"uapi", "hvtlfs", "machine"},
    "runner": {"uapi", "hvtlfs", "machine", "verdict"},
    "bench": {"uapi", "hvtlfs", "machine"},
    "cli": {"uapi", "hvtlfs", "machine", "verdict", "runner", "bench"},
    "__init__": {"machine"},
}


def part_of(module: str) -> str:
    """kvmtests.machine.kvm -> machine; kvmtests.uapi -> uapi."""
    return module.split(".")[1] if "." in module else "__init__"


def imported_parts(path: Path) -> set[tuple[str, int]]:
    """Every kvmtests part that path imports, with the line, relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if base == "kvmtests" else base for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {(part_of(n), node.lineno) for n in names if n.split(".")[0] == "kvmtests" and n != "kvmtests"}
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    own = part_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    wrong = sorted((part, line) for part, line in imported_parts(path) if part != own and part not in ALLOWED[own])
    assert not wrong, f"{path.relative_to(PACKAGE)} ({own}) imports upwards: {wrong}; allowed: {sorted(ALLOWED[own])}"


def test_every_part_has_a_rule() -> None:
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert parts == set(ALLOWED)
