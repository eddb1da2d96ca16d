"""Build a small kernel from Debian's linux-source package and a config fragment: a bzImage with its
drivers built in, for configurations no stock kernel has (CONFIG_KVM_SW_PROTECTED_VM)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .console import RunnerError

FRAGMENTS = Path(__file__).parent / "kconfig"
BASE_CONFIGS = ("x86_64_defconfig", "kvm_guest.config")
TOOLS = ("make", "gcc", "flex", "bison", "bc")
HEADERS = ("/usr/include/gelf.h", "/usr/include/openssl/ssl.h")   # objtool's libelf, the cert tools' OpenSSL
INSTALL_HINT = "install the kernel build tools (scripts/install.sh: flex bison bc libelf-dev libssl-dev make)"
# The tree's Hyper-V TLFS headers (include/hyperv in later trees, the hyperv-tlfs.h pair before), kept beside the image
# at their tree paths: tests/test_tlfs_headers.py checks the suite's TLFS readings against them.
HYPERV_HEADERS = ("include/hyperv/*.h", "arch/x86/include/asm/hyperv-tlfs.h", "include/asm-generic/hyperv-tlfs.h")
HYPERV_HEADERS_DIR = "hyperv-headers"


@dataclass(frozen=True)
class Recipe:
    """Which source package to build and what to merge over the base configs."""

    source: str       # Debian binary package that ships the source tarball, e.g. linux-source-6.12
    fragment: str     # file in kvmtests/runner/kconfig
    about: str


def wanted_options(fragment: Path) -> dict[str, str]:
    """CONFIG_X=v lines and '# CONFIG_X is not set' (as 'n') from a fragment."""
    wanted = {}
    for line in fragment.read_text().splitlines():
        if m := re.match(r"(CONFIG_\w+)=(\S+)$", line):
            wanted[m.group(1)] = m.group(2)
        elif m := re.match(r"# (CONFIG_\w+) is not set$", line):
            wanted[m.group(1)] = "n"
    return wanted


def config_mismatches(config: str, wanted: dict[str, str]) -> list[str]:
    """Fragment options the final .config does not honour (Kconfig drops what it cannot satisfy)."""
    have = dict(re.findall(r"^(CONFIG_\w+)=(\S+)$", config, re.M))
    return [f"{opt}={want} (got {have.get(opt, 'n')})" for opt, want in wanted.items() if have.get(opt, "n") != want]


def check_tools(which: Callable[[str], str | None] = shutil.which,
                exists: Callable[[str], bool] = os.path.exists) -> None:
    """Fail before minutes of unpacking when a build tool or header is missing."""
    missing = [t for t in TOOLS if which(t) is None] + [h for h in HEADERS if not exists(h)]
    if missing:
        raise RunnerError(f"building a kernel needs {', '.join(missing)}: {INSTALL_HINT}")


def hyperv_headers(tree: Path) -> list[Path]:
    """The Hyper-V headers a kernel tree (or a kept copy) has, relative to it."""
    return sorted(path.relative_to(tree) for pattern in HYPERV_HEADERS for path in tree.glob(pattern))


def keep_hyperv_headers(tree: Path, out: Path) -> None:
    """Copy the tree's Hyper-V headers into out/hyperv-headers, which outlives the temporary directory of the tree."""
    kept = out / HYPERV_HEADERS_DIR
    shutil.rmtree(kept, ignore_errors=True)
    for header in hyperv_headers(tree):
        (kept / header).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree / header, kept / header)


def _run(cmd: list[str], cwd: Path, log: Path) -> None:
    """Run one build step with its output appended to log; a failure is one line naming the log."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise RunnerError(f"`{' '.join(cmd[:2])}` failed in {cwd}: {last[0].strip()} (full log: {log})")


def unpack_source(deb: Path, work: Path) -> Path:
    """dpkg-deb -x the source package, then untar the kernel tree it ships; return the tree."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True)
    tarballs = sorted((work / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
    if not tarballs:
        raise RunnerError(f"{deb.name} holds no usr/src/linux-source-*.tar.*: not a linux-source package")
    with tarfile.open(tarballs[0]) as tar:
        tar.extractall(work, filter="tar")
    trees = [p for p in work.iterdir() if p.name.startswith("linux-source-") and p.is_dir()]
    if not trees:
        raise RunnerError(f"{tarballs[0].name} unpacked no linux-source-* directory")
    return trees[0]


def build(recipe: Recipe, deb: Path, work: Path, out: Path) -> Path:
    """Configure and build the tree in deb (unpacked under work) into out/bzImage, with out/config, out/System.map
    (which names a hang's RIP: qualify looks for it beside the image) and out/hyperv-headers."""
    check_tools()
    log = out / "build.log"
    log.write_text("")
    print(f"kernel: building {recipe.about} from {deb.name} (about 7 minutes on 2 cores; log {log})",
          file=sys.stderr, flush=True)
    tree = unpack_source(deb, work)
    fragment = FRAGMENTS / recipe.fragment
    _run(["make", *BASE_CONFIGS], tree, log)
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)], tree, log)
    _run(["make", "olddefconfig"], tree, log)
    config = (tree / ".config").read_text()
    dropped = config_mismatches(config, wanted_options(fragment))
    if dropped:
        raise RunnerError(f"the kernel's Kconfig did not keep {', '.join(dropped)} from {fragment}")
    _run(["make", f"-j{(os.cpu_count() or 1) + 1}", "bzImage"], tree, log)
    shutil.copyfile(tree / "arch" / "x86" / "boot" / "bzImage", out / "bzImage")
    shutil.copyfile(tree / "System.map", out / "System.map")
    keep_hyperv_headers(tree, out)
    (out / "config").write_text(config)
    return out / "bzImage"
