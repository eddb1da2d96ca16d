"""The machine layer: what drives /dev/kvm, without pytest.

`kvm` (Kvm, Vm, MemRegion, Vcpu: raw calls return (ret, errno)), `watchdog` (every KVM_RUN bounded, kicks),
`exits` (decoded exits), `guest` and `asm` (the guest machine builder and its payloads from
`kvmtests/guestasm/`), `hyperv` (Hyper-V vCPUs and hypercalls), `hvexits` (the whole-exit checks every
Hyper-V row shares), `memfault` (attribute and memory-fault helpers), `vsm` (the two-VTL harness: one VM per
VTL, VTL switching in userspace), `tracefs` (private trace instances), `host` (CPU vendor, vendor module, TDP,
environment), `health` (taint and kernel-log checks), `tools` (host programs). It imports only
`kvmtests.uapi`, `kvmtests.hvtlfs` and itself: never the verdicts, the runner or the command line.
"""
