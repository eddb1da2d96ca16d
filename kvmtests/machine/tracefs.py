"""tracefs access through a private instance, so that parallel tests and the host's tracing never mix."""
from __future__ import annotations

import itertools
import os
import re
import subprocess
from typing import Iterator

SET_ATTRS_EVENT = "kvm/kvm_vm_set_mem_attributes"
FAULTIN_EVENT = "kvmmmu/kvm_mem_attributes_faultin_access_prots"
# The series' own fields of each event. Upstream later added an event of the same name as P17's
# (trace_kvm_vm_set_mem_attributes, fields start/end/attr, 2025): the name alone does not mean P17.
SERIES_FIELDS = {SET_ATTRS_EVENT: ("start", "cnt", "attributes"),
                 FAULTIN_EVENT: ("vcpu_id", "guest_rip", "fault_address", "write", "exec", "mem_attrs")}
_ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
_counter = itertools.count()
_RECORD = re.compile(r"\d+\.\d+: (\w+): (.*)$")
# One field as options/fields prints it: "name=0x2a (42)", a bool "name=(1)", an 8-byte one on newer
# kernels "name=<%pS> (42)"; the decimal in parentheses is there in every form.
_FIELD = re.compile(r"(\w+)=(?:\S+ )?\((-?\d+)\)")


def root() -> str | None:
    """The mounted tracefs (mounting it at /sys/kernel/tracing if needed), or None."""
    for path in _ROOTS:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    if os.path.isdir(_ROOTS[0]) and os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tracefs", "nodev", _ROOTS[0]], capture_output=True)
        if os.path.isdir(os.path.join(_ROOTS[0], "events")):
            return _ROOTS[0]
    return None


def event_format(event: str) -> str | None:
    """The `format` file of an event, or None where the kernel has no such event."""
    base = root()
    path = os.path.join(base or "", "events", event, "format")
    if base is None or not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


def format_fields(text: str) -> dict[str, tuple[str, int, int]]:
    """Fields of a format file: name -> (C declaration, offset, size)."""
    fields = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("field:"):
            continue
        parts = dict(p.strip().split(":", 1) for p in line.rstrip(";").split(";") if ":" in p)
        decl = parts["field"].strip()
        name = decl.split()[-1].split("[")[0]
        fields[name] = (decl, int(parts["offset"]), int(parts["size"]))
    return fields


def series_event(event: str) -> bool | None:
    """Whether `event` exists with the series' fields; None where tracefs is not mounted."""
    if root() is None:
        return None
    text = event_format(event)
    return text is not None and set(SERIES_FIELDS[event]) <= set(format_fields(text))


class Instance:
    """A private tracefs instance with some events enabled, optionally only for one task (`pid`,
    a thread id): other processes' events never show; removed (tracing off) on exit. With `fields`,
    records show every field's raw value (options/fields) instead of the event's print format."""

    def __init__(self, events: list[str], pid: int | None = None, fields: bool = False):
        base = root()
        if base is None:
            raise FileNotFoundError("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")
        self.path = os.path.join(base, "instances", f"kvmtests-{os.getpid()}-{next(_counter)}")
        self.events, self.pid, self.fields = events, pid, fields

    def __enter__(self) -> "Instance":
        os.mkdir(self.path)
        try:
            if self.fields:
                self._write(os.path.join("options", "fields"), "1")
            for event in self.events:
                if self.pid is not None:
                    self._write(os.path.join("events", event, "filter"), f"common_pid == {self.pid}")
                self._write(os.path.join("events", event, "enable"), "1")
            self._write("tracing_on", "1")
        except OSError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if os.path.isdir(self.path):
            for event in self.events:
                try:
                    self._write(os.path.join("events", event, "enable"), "0")
                except OSError:
                    pass
            os.rmdir(self.path)

    def _write(self, rel: str, value: str) -> None:
        with open(os.path.join(self.path, rel), "w") as f:
            f.write(value)

    def lines(self) -> Iterator[str]:
        """Trace lines recorded so far (comments skipped)."""
        with open(os.path.join(self.path, "trace")) as f:
            for line in f:
                if not line.startswith("#"):
                    yield line.rstrip("\n")

    def clear(self) -> None:
        self._write("trace", "")

    def records(self, name: str) -> list[str]:
        """The printed payloads of the recorded events called `name` (e.g. kvm_vm_set_mem_attributes)."""
        out = []
        for line in self.lines():
            match = _RECORD.search(line)
            if match and match.group(1) == name:
                out.append(match.group(2))
        return out

    def field_records(self, name: str) -> list[dict[str, int]]:
        """The recorded events called `name` as field -> value (unsigned 64-bit); needs `fields`."""
        return [{f: int(v) & (2**64 - 1) for f, v in _FIELD.findall(text)} for text in self.records(name)]


def fields_option() -> bool:
    """Whether tracefs can print raw event fields (options/fields, Linux 6.3 and later)."""
    base = root()
    return base is not None and os.path.exists(os.path.join(base, "options", "fields"))
