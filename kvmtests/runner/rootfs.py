"""The host files a self-contained guest needs (no 9p under Bochs): Python with the suite's dependencies,
binutils, the part of gcc that builds the suite's C programs, their shared libraries, and the project
itself, at the same paths as on the host."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kvmtests.machine import payloads as machine_payloads
from kvmtests.machine.tools import ToolMissing, require

from .console import RunnerError

# Programs the suite runs in the guest (kvmtests.machine.asm) and the Debian package that brings them.
TOOLS = {"as": "binutils", "ld": "binutils", "objcopy": "binutils", "nm": "binutils"}
# Standard-library parts the suite never imports (and optimised bytecode it never loads), left out to keep
# the initramfs small: it is loaded through the emulated BIOS.
STDLIB_SKIP = re.compile(r"^(tests?|idlelib|tkinter|_tkinter\..*|turtledemo|ensurepip|lib2to3|pydoc_data|"
                         r"site-packages|dist-packages|venv|__phello__|config-.*|.*\.opt-[12]\.pyc)$")
# Project files the guest does not need: version control, earlier results, caches of other tools, and bytecode
# (bytecode() compiles it afresh).
PROJECT_SKIP = re.compile(r"^(\.|kvmtests-results$|results$|build$|dist$|.*\.egg-info$|__pycache__$)")
LDD_PATH = re.compile(r"(/\S+) \(0x")
# C programs the suite compiles at run time (kvmtests bench), relative to the project.
C_SOURCES = ("kvmtests/bench/ops.c",)


@dataclass(frozen=True)
class HostFile:
    """A host file copied into the guest at the same absolute path (symlinks followed), keeping its mtime."""

    path: str
    source: Path
    executable: bool


def requirement_names(requires: Iterable[str]) -> list[str]:
    """Distribution names of requirement strings that apply without extras (markers naming `extra` dropped)."""
    names = []
    for req in requires:
        if "extra ==" in req.replace("extra==", "extra =="):
            continue
        marker = req.partition(";")[2].strip()
        if marker and not _marker_holds(marker):
            continue
        names.append(re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0])
    return names


def _marker_holds(marker: str) -> bool:
    """Evaluate an environment marker for this interpreter (packaging ships with pytest, which the suite needs)."""
    from packaging.markers import Marker
    return Marker(marker).evaluate()


def distributions(roots: Iterable[str]) -> list[metadata.Distribution]:
    """The installed distributions roots need, transitively; a missing one says how to install it."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise RunnerError(f"the suite needs the Python package {name}, which is not installed: "
                              "pip install -e . (scripts/install.sh)") from None
        seen[key] = dist
        todo += requirement_names(dist.requires or [])
    return list(seen.values())


def project_requirements(project_dir: Path) -> list[str]:
    """The project's own dependencies, from its pyproject.toml (the installed metadata may be another checkout's)."""
    with (project_dir / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def walk(top: Path, skip: re.Pattern[str] | None = None) -> Iterator[Path]:
    """Every regular file under top, skipping directory and file names that match skip."""
    for root, dirs, files in os.walk(top):
        if skip is not None:
            dirs[:] = [d for d in dirs if not skip.match(d)]
        for name in files:
            if skip is None or not skip.match(name):
                yield Path(root) / name


def python_files(project_dir: Path) -> set[Path]:
    """The interpreter, its standard library and extension modules, and the suite's distributions."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = {Path(sys.executable)} | set(walk(stdlib, STDLIB_SKIP))
    for dist in distributions(requirement_names(project_requirements(project_dir))):
        for rel in dist.files or []:
            path = Path(str(dist.locate_file(rel)))
            if path.is_file() and "__editable__" not in path.name:
                files.add(path)
                if path.suffix == ".py":
                    files |= set(path.parent.glob(f"__pycache__/{path.stem}.*.pyc"))
    return files


def shared_libraries(elves: Iterable[Path]) -> set[Path]:
    """The shared libraries (and the loader) the ELF programs and extension modules load, as ldd names them."""
    found: set[Path] = set()
    for elf in elves:
        out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True).stdout
        found |= {Path(m) for m in LDD_PATH.findall(out)}
    return found


def compiler_files(sources: Iterable[Path]) -> set[Path]:
    """What gcc opens to build the sources: its programs and plugin (-v), the headers (-M), and every file
    the linker reads (-Wl,-t); empty without gcc (the suite then says gcc is missing)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return set()
    found = {Path(gcc)}
    with tempfile.TemporaryDirectory(prefix="kvmtests-gcc-") as tmp:
        for source in sources:
            deps = subprocess.run([gcc, "-O2", "-M", str(source)], capture_output=True, text=True)
            build = subprocess.run([gcc, "-O2", "-v", "-Wl,-t", "-o", f"{tmp}/a.out", str(source)],
                                   capture_output=True, text=True)
            words = (deps.stdout + build.stdout + build.stderr).replace("\\\n", " ").split()
            found |= {Path(os.path.normpath(w.strip("'\""))) for w in words if w.strip("'\"").startswith("/")}
    return {f for f in found if f.is_file() and not f.is_relative_to(Path(tempfile.gettempdir()))
            and f not in {Path(s) for s in sources}}


def is_elf(path: Path) -> bool:
    """True for an ELF file (a program or a shared object ldd can resolve)."""
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def pycache_env(out: Path) -> dict[str, str]:
    """This environment with Python writing bytecode under out (a pycache prefix), never into the project: its
    __pycache__ may be another Python's."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "SOURCE_DATE_EPOCH")}
    return env | {"PYTHONPYCACHEPREFIX": str(out)}


def bytecode(project_dir: Path, out: Path) -> list[HostFile]:
    """The project's bytecode, compiled on the host into out, for the guest's __pycache__ directories: its modules,
    and its test modules as pytest rewrites them (left in out by the host's collection, qualify.host_collection);
    the emulated guest spent minutes of every boot compiling them. What does not compile here the guest compiles
    (and reports) itself, as before."""
    sources = [str(f) for f in walk(project_dir, PROJECT_SKIP) if f.suffix == ".py"]
    subprocess.run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode", "timestamp", *sources],
                   cwd=project_dir, env=pycache_env(out), capture_output=True)
    mirror = out / str(project_dir).lstrip("/")   # a pycache prefix mirrors each source's directory
    return [HostFile(str(project_dir / pyc.parent.relative_to(mirror) / "__pycache__" / pyc.name).lstrip("/"), pyc,
                     False) for pyc in sorted(mirror.rglob("*.pyc"))]


def payloads() -> list[HostFile]:
    """The suite's guest payloads, assembled here into the cache at the path the guest looks in (it has this
    host's HOME and KVMTESTS_CACHE): an emulated guest spent seconds of every boot running the assembler."""
    try:
        built = machine_payloads.assemble_all()
    except ToolMissing as e:
        raise RunnerError(str(e)) from None
    return [HostFile(str(f).lstrip("/"), f, False) for p in built for f in sorted(p.cached.iterdir())]


def collect(project_dir: Path) -> list[HostFile]:
    """Everything the guest runs the suite with, once each, sorted so directories come before their files."""
    try:
        tools = {Path(require(tool, package)) for tool, package in TOOLS.items()}
        require("ldd", "libc-bin")
    except ToolMissing as e:
        raise RunnerError(str(e)) from None
    compiler = compiler_files(project_dir / source for source in C_SOURCES)
    files = python_files(project_dir) | tools | compiler | set(walk(project_dir, PROJECT_SKIP))
    programs = tools | compiler | {Path(sys.executable)}
    elves = [f for f in files if (f.suffix == ".so" or f in programs) and is_elf(f)]
    files |= shared_libraries(elves)
    return [HostFile(str(f).lstrip("/"), f, os.access(f, os.X_OK) and f.suffix not in (".py", ".pyc"))
            for f in sorted(files)]
