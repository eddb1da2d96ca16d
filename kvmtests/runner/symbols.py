"""Name a guest kernel's code address on the host, for a hang the kernel could not report itself: the kernel's
System.map and the symbol tables of KVM's module files, moved to where this boot put them (KASLR; /init reports
the bases in one mark, stream.TEXT_BASES)."""

from __future__ import annotations

import bisect
import lzma
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kvmtests.verdict.crash import function_name

from .console import RunnerError
from .initramfs import read_module

TEXT_TYPES = frozenset("TtWw")
STT_NOTYPE, STT_FUNC, SHT_SYMTAB = 0, 2, 2


@dataclass
class Table:
    """Code symbols by start address (or offset in a section); a symbol without a size runs to the next one (the
    last to the end of the furthest sized one)."""

    starts: list[int] = field(default_factory=list)
    symbols: list[tuple[int, int, str]] = field(default_factory=list)   # (start, size, name), by start
    end: int = 0

    @classmethod
    def of(cls, symbols: list[tuple[int, int, str]]) -> Table:
        ordered = sorted(set(symbols))
        return cls([s[0] for s in ordered], ordered, max((s[0] + s[1] for s in ordered), default=0))

    def find(self, address: int) -> tuple[str, int, int] | None:
        """(name, offset, size) of the symbol the address falls in: a sized one (a function of a module) before
        a sizeless one (System.map's, or an assembler label) that starts at the same place."""
        i = bisect.bisect_right(self.starts, address)
        for start, size, name in reversed(self.symbols[max(0, i - 8): i]):
            if not size:
                following = bisect.bisect_right(self.starts, start)
                size = (self.starts[following] if following < len(self.starts) else max(self.end, start + 1)) - start
            if address < start + size:
                return name, address - start, size
        return None


def system_map(path: Path) -> tuple[int, int | None, Table] | None:
    """The link addresses of _text and _etext and the kernel's code symbols; None when the file names no _text
    (Debian ships a placeholder System.map: the real one is in the -dbg package)."""
    text = etext = None
    symbols = []
    for line in path.read_text(errors="replace").splitlines():
        words = line.split()
        if len(words) < 3 or (words[1] not in TEXT_TYPES and words[2] not in ("_text", "_etext")):
            continue
        try:
            address = int(words[0], 16)
        except ValueError:
            continue
        if words[2] == "_text":
            text = address
        elif words[2] == "_etext":
            etext = address
        if words[1] in TEXT_TYPES:
            symbols.append((address, 0, words[2]))
    return None if text is None else (text, etext, Table.of(symbols))


def module_symbols(elf: bytes) -> dict[str, Table]:
    """A module's code symbols per section (a relocatable object: values are offsets in their section)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not a 64-bit ELF object")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQII", elf, shoff + i * shentsize) for i in range(shnum)]

    def string(table: int, offset: int) -> str:
        start = headers[table][4] + offset
        return elf[start: elf.index(b"\0", start)].decode(errors="replace")

    names = [string(shstrndx, h[0]) for h in headers]
    found: dict[str, list[tuple[int, int, str]]] = {}
    for header in headers:
        if header[1] != SHT_SYMTAB:
            continue
        _, _, _, _, offset, size, link, _ = header
        for at in range(offset, offset + size, 24):
            st_name, st_info, _, st_shndx, value, st_size = struct.unpack_from("<IBBHQQ", elf, at)
            if st_info & 0xF not in (STT_FUNC, STT_NOTYPE) or not st_name or not 0 < st_shndx < shnum:
                continue
            name = string(link, st_name)
            if not name.startswith((".L", "$")):
                found.setdefault(names[st_shndx], []).append((value, st_size, name))
    return {section: Table.of(symbols) for section, symbols in found.items()}


class Symbolizer:
    """Names addresses of the kernel (its System.map) and of modules (their files), loaded when first needed."""

    def __init__(self, system_map_path: Path | None, modules: Mapping[str, Path]):
        self.map_path, self.module_paths = system_map_path, dict(modules)
        self._kernel: tuple[int, int | None, Table] | None = None
        self._modules: dict[str, dict[str, Table]] = {}
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.map_path is not None:
            try:
                self._kernel = system_map(self.map_path)
            except OSError:
                self._kernel = None
        for module, path in self.module_paths.items():
            try:
                self._modules[module] = module_symbols(read_module(path))
            except (OSError, EOFError, ValueError, struct.error, IndexError, lzma.LZMAError, RunnerError):
                continue    # a module file that cannot be read names nothing

    def name(self, address: int, bases: Mapping[str, int]) -> tuple[str, str] | None:
        """(function, frame) of a code address this boot: `vmx_vcpu_run` and `vmx_vcpu_run+0x1d/0x30 [kvm_intel]`,
        or None when nothing it knows covers the address."""
        self._load()
        for key, base in bases.items():
            module, _, section = key.partition(":")
            if section.startswith(".init"):
                continue    # freed once the module loaded: other code may sit there now
            table = self._modules.get(module, {}).get(section) if section else None
            hit = table.find(address - base) if table is not None and address >= base else None
            if hit:
                return function_name(hit[0]), f"{hit[0]}+{hit[1]:#x}/{hit[2]:#x} [{module}]"
        if self._kernel is not None and "_text" in bases:
            text, etext, table = self._kernel
            link = address - bases["_text"] + text
            hit = table.find(link) if link >= text and (etext is None or link < etext) else None
            if hit:
                return function_name(hit[0]), f"{hit[0]}+{hit[1]:#x}/{hit[2]:#x}"
        return None


def find_system_map(image: Path, release: str) -> Path | None:
    """The kernel's System.map: beside the image (Debian's /boot, or a copy), in ../boot, or at the root of the tree
    an arch/x86/boot/bzImage was built in."""
    here = image.resolve().parent
    names = [f"System.map-{release}"] * bool(release) + ["System.map"]
    places = [here, here.parent / "boot"] + ([here.parents[2]] if here.match("arch/x86/boot") else [])
    for place in places:
        for name in names:
            if (place / name).is_file():
                return place / name
    return None
