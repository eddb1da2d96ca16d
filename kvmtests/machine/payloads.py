"""Every guest payload the suite assembles, in one list: a guest under an emulator that starts the assembler and
linker for each pays seconds of its boot, so the host assembles them all into the cache the guest reads."""
from __future__ import annotations

from . import asm, guest, hyperv, vsm


def assemble_all() -> list[asm.Payload]:
    """Each payload the suite loads, as it loads it (the cache keys them by content: the same entries)."""
    return [*(guest.load_payload(name) for name in ("basic", "probe", "mem", "insn_len")),
            guest.load_payload("basic32", bits=32), hyperv.hcall_payload(64), hyperv.hcall_payload(32),
            vsm.vsm_payload(False), vsm.vsm_payload(True)]
