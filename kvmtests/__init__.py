"""kvmtests: conformance suite for the KVM interfaces of the Hyper-V VSM series."""
from . import watchdog as _watchdog  # installs the vCPU kick handler on the main thread

__version__ = "0.1.0"
