"""kvmtests: conformance suite for the KVM interfaces of the Hyper-V VSM series.

The package reads bottom-up, each part importing only the parts below it:

- `uapi` and `hvtlfs`: the KVM UAPI through cffi and the Hyper-V TLFS constants (layer 1);
- `guestasm/`: the guest payloads, GNU assembler sources;
- `machine/`: VM objects, the bounded run, the guest builder, the Hyper-V driver, host identity and
  kernel health (layer 2), usable without pytest;
- `verdict/`: feature detection, the host probe, the pytest plugin and the reports;
- `runner/`: `kvmtests qualify`, kernels fetched or built, the initramfs, one module per emulator;
- `bench/` and `cli`: the benchmark and the `kvmtests` command on top.
"""
from .machine import watchdog as _watchdog  # noqa: F401  installs the vCPU kick handler on the main thread

__version__ = "0.1.0"
