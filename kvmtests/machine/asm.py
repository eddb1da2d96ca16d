"""Guest payloads: GNU assembler sources assembled on first use into a content-keyed cache."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .tools import require

ASM_DIR = Path(__file__).parent.parent / "guestasm"
CACHE_ENV = "KVMTESTS_CACHE"


@dataclass(frozen=True)
class Payload:
    """A flat binary loaded at `base`, with its symbols (labels) as guest addresses."""

    name: str
    base: int
    code: bytes
    symbols: dict[str, int]
    cached: Path   # the cache directory it was assembled into

    def __getitem__(self, label: str) -> int:
        try:
            return self.symbols[label]
        except KeyError:
            raise KeyError(f"payload {self.name} has no label {label!r}") from None

    def length(self, start: str, end: str) -> int:
        """Bytes between two labels: the length of a labelled instruction."""
        return self[end] - self[start]


def cache_dir() -> Path:
    """Where assembled payloads are kept: $KVMTESTS_CACHE/asm or ~/.cache/kvmtests/asm."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "kvmtests")
    return Path(root) / "asm"


def _key(source: str, includes: list[str], bits: int, base: int, defines: dict[str, int]) -> str:
    h = hashlib.sha256()
    for part in [source, *includes, str(bits), hex(base), json.dumps(sorted(defines.items()))]:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _run(cmd: list[str], cwd: str) -> None:
    require(cmd[0], "binutils")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")


def _build(src: Path, bits: int, base: int, defines: dict[str, int], out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="kvmtests-asm-") as tmp:
        obj, elf = os.path.join(tmp, "p.o"), os.path.join(tmp, "p.elf")
        defsyms = [a for k, v in sorted(defines.items()) for a in ("--defsym", f"{k}={v:#x}")]
        _run(["as", f"--{bits}", "-I", str(ASM_DIR), *defsyms, "-o", obj, str(src)], tmp)
        emulation = "elf_x86_64" if bits == 64 else "elf_i386"
        _run(["ld", "-m", emulation, "-static", "-nostdlib", f"-Ttext={base:#x}", "-e", "_start_common",
              "--no-warn-rwx-segments", "-o", elf, obj], tmp)
        _run(["objcopy", "-O", "binary", "-j", ".text", elf, str(out / "payload.bin")], tmp)
        nm = subprocess.run(["nm", elf], capture_output=True, text=True, check=True).stdout
        symbols = {}
        for line in nm.splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[1] in "tTdDbBaA":
                symbols[fields[2]] = int(fields[0], 16)
        (out / "symbols.json").write_text(json.dumps(symbols, indent=0, sort_keys=True))


def assemble(name: str, *, bits: int = 64, base: int, defines: dict[str, int]) -> Payload:
    """Assemble guestasm/<name>.S (cached by content) into a Payload."""
    src = ASM_DIR / f"{name}.S"
    include = "common.inc" if bits == 64 else "common32.inc"
    key = _key(src.read_text(), [(ASM_DIR / include).read_text()], bits, base, defines)
    out = cache_dir() / f"{name}-{key}"
    if not (out / "symbols.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
        try:
            _build(src, bits, base, defines, staging)
            os.rename(staging, out)
        except OSError:
            if not (out / "symbols.json").exists():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    symbols = json.loads((out / "symbols.json").read_text())
    return Payload(name, base, (out / "payload.bin").read_bytes(), symbols, out)
