"""Fetch Debian's stock kernels with apt into a private cache, unpacked and never installed, or build
one from Debian's kernel source where no stock kernel has the configuration (kbuild)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import kbuild
from .console import RunnerError

SUITES = ("bookworm", "bookworm-backports")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SYSTEM_SOURCES = Path("/etc/apt")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# A stock kernel name: the version series of Debian's linux-image-amd64 metapackage it follows.
KERNELS = {"debian-6.12": "6.12.", "debian-6.1": "6.1."}
# A built kernel name: how kbuild makes it from Debian's source package.
BUILT = {"debian-6.12-sw-protected": kbuild.Recipe("linux-source-6.12", "sw-protected-vm.config",
                                                   "Debian's 6.12 with CONFIG_KVM_SW_PROTECTED_VM")}
NAMES = (*KERNELS, *BUILT)
DONE = "fetched"


@dataclass(frozen=True)
class Kernel:
    """A fetched kernel: its image and the modules directory that belongs to it (None: built in)."""

    image: Path
    modules: Path | None


def cache_dir() -> Path:
    """Where fetched kernels live: $KVMTESTS_CACHE, else ~/.cache/kvmtests."""
    env = os.environ.get("KVMTESTS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvmtests"


def debian_mirror(apt_dir: Path = SYSTEM_SOURCES) -> str:
    """The Debian archive URI the host's own apt sources use, so fetching goes where apt already goes."""
    for path in sorted(apt_dir.glob("sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and any(not s.endswith("-security") for s in suites.group(1).split()):
                return uris.group(1).rstrip("/")
    one_line = [apt_dir / "sources.list", *sorted(apt_dir.glob("sources.list.d/*.list"))]
    for path in one_line:
        if path.exists():
            for line in path.read_text().splitlines():
                m = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)", line.strip())
                if m and "security" not in m.group(1):
                    return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


def find_kernel(root: Path) -> Kernel:
    """Locate vmlinuz and lib/modules/<release> in an unpacked linux-image package."""
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if not images:
        raise RunnerError(f"no boot/vmlinuz-* under {root}: delete {root} and fetch again")
    release = images[0].name.removeprefix("vmlinuz-")
    return Kernel(images[0], root / "lib" / "modules" / release)


def apt_options(work: Path) -> list[str]:
    """apt options that keep the source list, package lists and archives inside work."""
    return [
        "-o", f"Dir::Etc::SourceList={work / 'sources.list'}",
        "-o", f"Dir::Etc::SourceParts={work / 'sources.list.d'}",
        "-o", f"Dir::State::Lists={work / 'lists'}",
        "-o", f"Dir::Cache={work / 'cache'}",
        "-o", "APT::Sandbox::User=root",
        "-o", "Debug::NoLocking=1",
    ]


def apt(args: list[str], work: Path, cwd: Path | None = None) -> str:
    """Run apt with the private configuration; a failure becomes one line."""
    try:
        done = subprocess.run(args[:1] + apt_options(work) + args[1:], cwd=cwd, capture_output=True,
                              text=True, check=True)
    except FileNotFoundError:
        raise RunnerError(f"{args[0]} not found: fetching stock kernels needs Debian's apt and dpkg") from None
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RunnerError(f"{' '.join(args[:2])} failed: {last}") from None
    return done.stdout


def image_package(work: Path, series: str) -> str:
    """The linux-image package (name=version) that linux-image-amd64 depends on in the wanted series."""
    shown = apt(["apt-cache", "show", "linux-image-amd64"], work)
    for stanza in shown.split("\n\n"):
        version = re.search(r"^Version:\s*(\S+)", stanza, re.M)
        depends = re.search(r"^Depends:\s*(linux-image-\S+)\s*\(=\s*([^)\s]+)\)", stanza, re.M)
        if version and depends and version.group(1).startswith(series):
            return f"{depends.group(1)}={depends.group(2)}"
    raise RunnerError(f"no linux-image-amd64 {series}x in {', '.join(SUITES)}: check the host's apt mirror")


def fetch(name: str) -> Kernel:
    """Download and unpack (or build) a kernel once; later calls return the cached one at once."""
    if name not in NAMES:
        raise RunnerError(f"unknown kernel {name!r}: choose one of {', '.join(NAMES)}")
    root = cache_dir() / "kernels" / name
    if (root / DONE).exists():
        return Kernel(root / "bzImage", None) if name in BUILT else find_kernel(root / "root")
    work = root / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror()
    (work / "sources.list").write_text(
        "".join(f"deb [signed-by={KEYRING}] {mirror} {suite} main\n" for suite in SUITES))
    print(f"kernel: fetching {name} from Debian {' and '.join(SUITES)}", file=sys.stderr)
    apt(["apt-get", "update"], work)
    package = BUILT[name].source if name in BUILT else image_package(work, KERNELS[name])
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        apt(["apt-get", "download", package], work, cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if name in BUILT:
            kernel = Kernel(kbuild.build(BUILT[name], debs[0], Path(tmp), root), None)
            package = debs[0].name
        else:
            unpacked = root / "root"
            for deb in debs:
                subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
            kernel = find_kernel(unpacked)
    (root / DONE).write_text(f"{package}\n")
    return kernel


def fetch_command(args: argparse.Namespace) -> int:
    """`kvmtests kernel fetch NAME`: print the image path, then the modules directory (if not built in)."""
    try:
        kernel = fetch(args.name)
    except RunnerError as exc:
        print(f"kernel: {exc}", file=sys.stderr)
        return 2
    print(kernel.image)
    if kernel.modules is not None:
        print(kernel.modules)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `kernel fetch` to the kvmtests command line."""
    kernel = subparsers.add_parser("kernel", help="kernel images to qualify: Debian's stock ones, or built")
    actions = kernel.add_subparsers(dest="kernel_action", required=True)
    fetch_parser = actions.add_parser(
        "fetch", help="download and unpack a Debian stock kernel into the cache (never installs it), or build one",
        description="Prints the kernel image path, then its modules directory (none for a built kernel: its "
                    f"drivers are built in). Built: {', '.join(f'{n} ({r.about})' for n, r in BUILT.items())}, "
                    "from Debian's source package, about 7 minutes on 2 cores the first time.")
    fetch_parser.add_argument("name", choices=NAMES, help="which kernel")
    fetch_parser.set_defaults(func=fetch_command)
