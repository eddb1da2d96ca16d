"""`kvmtests kernel fetch` without the network: mirror choice, package choice, the cache, the command,
and the checks around a kernel build (the build itself runs in CI, under `.ci/run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvmtests.runner import kbuild, kernels, qualify
from kvmtests.runner.console import RunnerError

pytestmark = pytest.mark.selftest

SHOW = """Package: linux-image-amd64
Version: 6.12.95-1~bpo12+1
Depends: linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)

Package: linux-image-amd64
Version: 6.1.176-1
Depends: linux-image-6.1.0-50-amd64 (= 6.1.176-1)
"""


def fake_fetched(cache: Path, name: str, release: str) -> kernels.Kernel:
    """A cache entry as fetch() leaves it."""
    root = cache / "kernels" / name
    (root / "root" / "boot").mkdir(parents=True)
    (root / "root" / "boot" / f"vmlinuz-{release}").write_bytes(b"k")
    (root / "root" / "lib" / "modules" / release).mkdir(parents=True)
    (root / kernels.DONE).write_text("pkg\n")
    return kernels.Kernel(root / "root" / "boot" / f"vmlinuz-{release}", root / "root" / "lib" / "modules" / release)


def test_mirror_from_deb822_skips_security(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n")
    assert kernels.debian_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources_and_default(tmp_path: Path) -> None:
    assert kernels.debian_mirror(tmp_path) == kernels.DEFAULT_MIRROR
    (tmp_path / "sources.list").write_text("# comment\ndeb [arch=amd64] http://one.example/debian bookworm main\n")
    assert kernels.debian_mirror(tmp_path) == "http://one.example/debian"


@pytest.mark.parametrize("series, package", [
    ("6.12.", "linux-image-6.12.95+deb12-amd64=6.12.95-1~bpo12+1"),
    ("6.1.", "linux-image-6.1.0-50-amd64=6.1.176-1"),
])
def test_image_package_follows_the_metapackage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               series: str, package: str) -> None:
    monkeypatch.setattr(kernels, "apt", lambda args, work, cwd=None: SHOW)
    assert kernels.image_package(tmp_path, series) == package
    with pytest.raises(RunnerError, match="no linux-image-amd64 5.10.x"):
        kernels.image_package(tmp_path, "5.10.")


def test_apt_options_keep_state_private(tmp_path: Path) -> None:
    opts = kernels.apt_options(tmp_path)
    values = dict(o.split("=", 1) for o in opts[1::2])
    assert values["Dir::Etc::SourceList"] == str(tmp_path / "sources.list")
    assert values["Dir::State::Lists"] == str(tmp_path / "lists")
    assert values["Dir::Cache"] == str(tmp_path / "cache")


def test_fetch_unknown_name() -> None:
    with pytest.raises(RunnerError, match="choose one of debian-6.12, debian-6.1, debian-6.12-sw-protected"):
        kernels.fetch("debian-2.6")


def test_fetch_is_instant_when_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KVMTESTS_CACHE", str(tmp_path))
    expected = fake_fetched(tmp_path, "debian-6.1", "6.1.0-50-amd64")

    def no_apt(*args: object, **kwargs: object) -> str:
        raise AssertionError("a cached kernel must not run apt")

    monkeypatch.setattr(kernels, "apt", no_apt)
    assert kernels.fetch("debian-6.1") == expected
    parser = argparse.ArgumentParser(prog="kvmtests")
    kernels.register(parser.add_subparsers())
    args = parser.parse_args(["kernel", "fetch", "debian-6.1"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines() == [str(expected.image), str(expected.modules)]
    assert qualify.resolve_kernel("debian-6.1") == (expected.image, expected.modules)


def test_apt_failures_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(RunnerError, match=r"^false update failed: \(no output\)$"):
        kernels.apt(["false", "update"], tmp_path)
    with pytest.raises(RunnerError, match="needs Debian's apt and dpkg"):
        kernels.apt([str(tmp_path / "apt-get"), "update"], tmp_path)


def test_built_kernel_is_instant_when_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KVMTESTS_CACHE", str(tmp_path))
    root = tmp_path / "kernels" / "debian-6.12-sw-protected"
    root.mkdir(parents=True)
    (root / "bzImage").write_bytes(b"k")
    (root / kernels.DONE).write_text("linux-source-6.12.deb\n")
    monkeypatch.setattr(kernels, "apt", lambda *a, **k: pytest.fail("a cached kernel must not run apt"))
    assert kernels.fetch("debian-6.12-sw-protected") == kernels.Kernel(root / "bzImage", None)
    parser = argparse.ArgumentParser(prog="kvmtests")
    kernels.register(parser.add_subparsers())
    args = parser.parse_args(["kernel", "fetch", "debian-6.12-sw-protected"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines() == [str(root / "bzImage")], "no modules line: drivers built in"
    assert qualify.resolve_kernel("debian-6.12-sw-protected") == (root / "bzImage", None)


def test_every_fragment_line_is_an_option_or_a_comment() -> None:
    for fragment in kbuild.FRAGMENTS.glob("*.config"):
        lines = [line for line in fragment.read_text().splitlines() if line.strip()]
        options = kbuild.wanted_options(fragment)
        comments = [line for line in lines if line.startswith("#") and " is not set" not in line]
        assert len(options) + len(comments) == len(lines), f"{fragment.name}: a line is neither"
    assert all(r.fragment in {f.name for f in kbuild.FRAGMENTS.glob("*.config")} for r in kernels.BUILT.values())
    assert kbuild.wanted_options(kbuild.FRAGMENTS / "sw-protected-vm.config")["CONFIG_KVM_SW_PROTECTED_VM"] == "y"


def test_config_mismatches_name_what_kconfig_dropped(tmp_path: Path) -> None:
    fragment = tmp_path / "f.config"
    fragment.write_text("# why\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\n# CONFIG_D is not set\n")
    wanted = kbuild.wanted_options(fragment)
    assert wanted == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "m", "CONFIG_D": "n"}
    config = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n"
    assert kbuild.config_mismatches(config, wanted) == ["CONFIG_B=n (got y)", "CONFIG_C=m (got n)"]


def test_missing_build_tools_are_one_clear_error() -> None:
    with pytest.raises(RunnerError, match=r"needs flex, /usr/include/gelf.h: install the kernel build tools"):
        kbuild.check_tools(which=lambda tool: None if tool == "flex" else f"/usr/bin/{tool}",
                           exists=lambda path: not path.endswith("gelf.h"))
    kbuild.check_tools(which=lambda tool: f"/usr/bin/{tool}", exists=lambda path: True)


def test_kbuild_keeps_the_trees_hyperv_headers(tmp_path: Path) -> None:
    tree, out = tmp_path / "linux-source-6.12", tmp_path / "out"
    headers = ["arch/x86/include/asm/hyperv-tlfs.h", "include/asm-generic/hyperv-tlfs.h", "include/hyperv/hvgdk.h",
               "include/hyperv/hvhdk_mini.h"]
    for rel in headers + ["include/linux/hyperv.h", "arch/x86/include/asm/mshyperv.h"]:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(f"/* {rel} */\n")
    stale = out / kbuild.HYPERV_HEADERS_DIR / "include/hyperv/stale.h"
    stale.parent.mkdir(parents=True)
    stale.touch()
    kbuild.keep_hyperv_headers(tree, out)
    kept = out / kbuild.HYPERV_HEADERS_DIR
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*.h")) == headers, "the Hyper-V headers, only they"
    assert all((kept / rel).read_text() == f"/* {rel} */\n" for rel in headers)
    assert kbuild.hyperv_headers(kept) == kbuild.hyperv_headers(tree) == [Path(rel) for rel in headers]
