"""Two-VTL harness: the VMM design of spec 5.1 (one KVM VM per VTL over one shared guest memory, one vCPU per
(VP, VTL), VTL switching in userspace) driving the TLFS VSM sequences through the series' exits. Not a VMM: no
devices, no SynIC. Guest side in guestasm/vsm.S; every KVM_RUN is bounded by the watchdog.

Readings of the TLFS the harness relies on (run so far only on a local, partial port of the series to 6.12
under QEMU TCG, AMD; not on the posted series). The values are the constants below, which vsm.S builds its inputs
with too; tests/test_tlfs_headers.py checks each against the Hyper-V definitions in the kernel's own headers, and
each one those headers lack cites the page of the online TLFS it comes from
(https://learn.microsoft.com/virtualization/hyper-v-on-windows/tlfs/PAGE):
- GPRs other than RSP are shared between VTLs; RIP, RSP, RFLAGS and the control registers are private (TLFS vsm).
  A VTL return gives the lower VTL the RAX/RCX that the higher VTL left in its control page (TLFS
  datatypes/hv_vp_vtl_control: VtlReturnX64Rax/Rcx); here the control page is a host-defined page, not the VP
  assist page.
- The higher VTL resumes after its last HvCallVtlReturn; the entry reason (1 VTL call, 2 interrupt) is in its
  control page. An intercept reaches it as a message (HvMessageTypeGpaIntercept) with an interrupt entry; with
  no SynIC the harness writes the message into the control page.
- HvCallModifyVtlProtectionMask (rep): partition id, map flags (u32), target VTL (u8), 3 reserved bytes, then
  one GPA page number per rep. Map flags R 1, W 2, kernel X 4 map onto the series' negative attributes NR, NW,
  NX (user X is MBEC, which the series does not model: ignored).
- Fast HvGetVpRegisters: header in RDX/R8 (partition id; VP index, input VTL), register names (u32) from XMM0,
  values (16 bytes each) from the first XMM register after the input. Fast HvSetVpRegisters: (name, value)
  pairs of 32 bytes from XMM0. HvCallStartVirtualProcessor: header (partition id, VP index, target VTL) and
  HV_INITIAL_VP_CONTEXT at input + 16.
"""
from __future__ import annotations

import errno
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from kvmtests import hvtlfs, uapi

from . import asm, guest, hyperv, watchdog
from .exits import describe
from .kvm import Exit, Kvm, KvmError, MemRegion, Unavailable, Vcpu
from .memfault import Fault, FieldMismatch

ENTRY_VTL_CALL, ENTRY_INTERRUPT = 1, 2          # TLFS datatypes/hv_vp_vtl_control: HV_VTL_ENTRY_REASON
MSG_GPA_INTERCEPT = 0x80000001                  # HvMessageTypeGpaIntercept
ACCESS_READ, ACCESS_WRITE, ACCESS_EXECUTE = 0, 1, 2   # TLFS datatypes/hv-x64-intercept-message-header
MAP_READ, MAP_WRITE, MAP_KERNEL_EXEC, MAP_USER_EXEC = 1, 2, 4, 8  # TLFS hypercalls/hvcallmodifyvtlprotectionmask
HV_X64_REGISTER_RIP, HV_X64_REGISTER_RFLAGS = 0x00020010, 0x00020011   # TLFS datatypes/hv_register_name
USE_TARGET_VTL = hvtlfs.HV_INPUT_VTL_USE_TARGET_VTL
# Hypercall inputs, byte offsets (a fast hypercall's input is RDX, R8, then XMM0-5: offset 16 is XMM0).
MODIFY_FLAGS, MODIFY_VTL, MODIFY_PAGES = 8, 12, 16   # TLFS hypercalls/hvcallmodifyvtlprotectionmask
# VP index and VTL after the partition id, in HvGetVpRegisters, HvSetVpRegisters and HvCallStartVirtualProcessor.
HEADER_VP_INDEX, HEADER_VTL = 8, 12             # TLFS hypercalls/hvcallstartvirtualprocessor
GET_NAMES, GET_NAME_SIZE, VALUE_SIZE = 16, 4, 16   # TLFS hypercalls/hvcallgetvpregisters: u32 names, 16-byte values
SET_PAIRS, SET_PAIR_SIZE, SET_PAIR_VALUE = 16, 32, 16   # TLFS hypercalls/hvcallsetvpregisters: (name, value) pairs
START_CONTEXT = 16                              # TLFS hypercalls/hvcallstartvirtualprocessor: HV_INITIAL_VP_CONTEXT
CONTEXT_RIP, CONTEXT_RSP, CONTEXT_RFLAGS = 0, 8, 16                          # TLFS datatypes/hv_initial_vp_context
CONTEXT_EFER, CONTEXT_CR0, CONTEXT_CR3, CONTEXT_CR4 = 184, 192, 200, 208     # TLFS datatypes/hv_initial_vp_context

# The control page in VTL-shared memory, its whole layout: what vsm.S writes (it gets these as --defsym,
# guest_layout()) and the harness and tests read.
CONTROL = guest.DATA_GPA
ENTRY_REASON, RET_RAX, RET_RCX = CONTROL + 0x00, CONTROL + 0x08, CONTROL + 0x10
MSG_TYPE, MSG_GPA, MSG_ACCESS = CONTROL + 0x20, CONTROL + 0x28, CONTROL + 0x30
VTL1_ENTRIES, VTL1_INTERCEPTS, VTL1_INTERRUPTS = CONTROL + 0x40, CONTROL + 0x48, CONTROL + 0x50
VTL1_STATUS, VTL1_GOT_RIP = CONTROL + 0x58, CONTROL + 0x60   # VTL1's last own hypercall status; XMM1 low after
WAKE_FLAG, WRITES_DONE, VP1_FLAG = CONTROL + 0x68, CONTROL + 0x70, CONTROL + 0x78   # GetVpRegisters(VTL0 RIP)
VP1_RSP, VTL1_STATUS2 = CONTROL + 0x80, CONTROL + 0x88      # ... and the status of VTL1's second hypercall
VTL0_HCALL, VTL1_HCALL = CONTROL + 0x90, CONTROL + 0x98     # NOTE_HCALL: a VTL's hypercall the VMM has not served
INPUT, VP0_INPUT = guest.DATA_GPA + 0x1000, guest.DATA_GPA + 0x2000   # VTL1's and VTL0's hypercall input pages
PROTECTED_PAGE = guest.DATA_GPA + 0x3000
VP1_STACK = guest.STACK_TOP - 0x6000            # what vtl0_start_vp passes in the initial context
VTL1_STACK = guest.STACK_TOP - 0x8000           # VTL1's private stack (RSP is not shared)
VP1_PORT = 0xEA

SHARED_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
VSM_BITS = hyperv.CpuidBits(ebx_set=hvtlfs.HV_ACCESS_VSM | hvtlfs.HV_ACCESS_VP_REGISTERS
                            | hvtlfs.HV_START_VIRTUAL_PROCESSOR,
                            edx_set=hvtlfs.HV_X64_HYPERCALL_XMM_INPUT_AVAILABLE
                            | hvtlfs.HV_X64_HYPERCALL_XMM_OUTPUT_AVAILABLE)
STEP = 5.0            # bound of one KVM_RUN of an active vCPU
WAIT_LIMIT = 60.0     # bound of one KVM_RUN of an inactive VTL in state 11 (it ends on a kick or an event)
INACTIVE, RUNNABLE = uapi.KVM_MP_STATE_HV_INACTIVE_VTL, uapi.KVM_MP_STATE_RUNNABLE


class HarnessError(AssertionError):
    """The VSM sequence left the TLFS path; the message names the catalog row or the exit."""


class StepFailed(HarnessError, FieldMismatch):
    """A step that relied on a feature group's behaviour and did not get it: counted under that group like a wrong
    exit field, so a scenario composing the group gets that group's error, not a failure of its own groups."""

    what = "VSM harness step"


def _ok(result: tuple[int, int], what: str) -> None:
    ret, err = result
    if ret < 0:
        raise HarnessError(f"{what}: {uapi.errno_name(err)}")


def _set_state(vcpu: Vcpu, state: int, what: str) -> None:
    """KVM_SET_MP_STATE into state 11 or out of it, which every VTL switch relies on: mp_inactive_vtl's (P05)."""
    ret, err = vcpu.set_mp_state_raw(state)
    if ret < 0:
        raise StepFailed("mp_inactive_vtl", f"{what}: {uapi.errno_name(err)}")


class Job:
    """One piece of work for a vCPU thread; a lock held until it is done is the cheapest hand-off Python has."""

    __slots__ = ("fn", "args", "value", "error", "finished")

    def __init__(self, fn: Callable[..., object], args: tuple):
        self.fn, self.args, self.value, self.error = fn, args, None, None
        self.finished = threading.Lock()
        self.finished.acquire()

    def done(self) -> bool:
        return not self.finished.locked()

    def result(self, timeout: float) -> object:
        """Its return value (or its exception, raised here) once it ran; TimeoutError if it did not in time."""
        if not self.finished.acquire(timeout=timeout):
            raise TimeoutError(f"{getattr(self.fn, '__name__', self.fn)} did not finish within {timeout:g} s")
        self.finished.release()
        if self.error is not None:
            raise self.error
        return self.value


class VcpuThread:
    """The one thread that issues every KVM_RUN of a vCPU, as in a VMM; jobs run there in submission order."""

    def __init__(self, vcpu: Vcpu, name: str):
        self.vcpu = vcpu
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()
        self.ident = self.thread.ident

    def _loop(self) -> None:
        # The idle wait for the next job is unbounded on purpose: close() ends it with None, and bounds its join.
        while (job := self.jobs.get()) is not None:
            try:
                job.value = job.fn(*job.args)
            except BaseException as e:     # handed to whoever waits for the job
                job.error = e
            finally:
                job.finished.release()

    def submit(self, fn: Callable[..., object], *args: object) -> Job:
        job = Job(fn, args)
        self.jobs.put(job)
        return job

    def kick(self) -> None:
        """End the vCPU's KVM_RUN (EINTR), or its next one if it is between runs."""
        watchdog.kick(self.vcpu.run_struct, self.ident)

    def close(self, timeout: float = WAIT_LIMIT) -> None:
        """Stop the thread once its queued jobs ran; HarnessError naming the thread if it has not ended in time (a
        KVM_RUN no kick or watchdog ended): it still uses the vCPU, so the caller must not free the VM under it."""
        self.jobs.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise HarnessError(f"vCPU thread {self.thread.name} (vCPU {self.vcpu.id}) did not finish within "
                               f"{timeout:g} s of being closed")


@dataclass
class Wake:
    """How an inactive VTL's wait in state 11 ended: its exit, the system event type, the MP state after a WAKEUP."""

    exit: Exit
    event: int
    mp_state: int

    @property
    def woken(self) -> bool:
        return self.exit.ret == 0 and self.exit.reason == uapi.KVM_EXIT_SYSTEM_EVENT \
            and self.event == uapi.KVM_SYSTEM_EVENT_WAKEUP


@dataclass
class Log:
    """What the harness did, for the scenarios to assert against."""

    vtl_calls: int = 0
    vtl_returns: int = 0
    faults: list[tuple[Fault, int]] = field(default_factory=list)          # (fault, VTL0 RIP)
    protections: list[tuple[int, int]] = field(default_factory=list)       # (GPA, attributes set on VTL0)
    wakes: list[Wake] = field(default_factory=list)                        # waits that ended with an event
    hcalls: list[tuple[int, int, list[tuple[int, int]]]] = field(default_factory=list)  # (vtl, input, xmm)
    started: dict[int, Job] = field(default_factory=dict)                   # VP index -> its first exit


def guest_readings() -> dict[str, int]:
    """The TLFS readings vsm.S builds its hypercall inputs with: the very values the harness parses them with."""
    codes = ("HVCALL_VTL_CALL", "HVCALL_VTL_RETURN", "HVCALL_MODIFY_VTL_PROTECTION_MASK", "HVCALL_GET_VP_REGISTERS",
             "HVCALL_SET_VP_REGISTERS", "HVCALL_START_VP")
    return {**{code: getattr(hvtlfs, code) for code in codes},
            "FAST": hvtlfs.HV_HYPERCALL_FAST_BIT, "REP1": 1 << hvtlfs.HV_HYPERCALL_REP_COMP_OFFSET,
            "ENTRY_VTL_CALL": ENTRY_VTL_CALL, "ENTRY_INTERRUPT": ENTRY_INTERRUPT,
            "MSG_GPA_INTERCEPT": MSG_GPA_INTERCEPT, "HV_X64_REGISTER_RIP": HV_X64_REGISTER_RIP,
            "USE_TARGET_VTL": USE_TARGET_VTL,
            "MAP_ALL": MAP_READ | MAP_WRITE | MAP_KERNEL_EXEC | MAP_USER_EXEC,
            "MAP_NO_WRITE": MAP_READ | MAP_KERNEL_EXEC | MAP_USER_EXEC,
            "MODIFY_FLAGS": MODIFY_FLAGS, "MODIFY_VTL": MODIFY_VTL, "MODIFY_PAGES": MODIFY_PAGES,
            "HEADER_VP_INDEX": HEADER_VP_INDEX, "HEADER_VTL": HEADER_VTL, "START_CONTEXT": START_CONTEXT,
            "CONTEXT_RIP": CONTEXT_RIP, "CONTEXT_RSP": CONTEXT_RSP, "CONTEXT_RFLAGS": CONTEXT_RFLAGS,
            "CONTEXT_EFER": CONTEXT_EFER, "CONTEXT_CR0": CONTEXT_CR0, "CONTEXT_CR3": CONTEXT_CR3,
            "CONTEXT_CR4": CONTEXT_CR4}


def vsm_payload(vmmcall: bool) -> asm.Payload:
    """vsm.S for the layout and readings above, calling with VMMCALL (AMD) or VMCALL (Intel)."""
    return asm.assemble("vsm", base=guest.CODE_GPA, defines={**guest.layout_defines(), **guest_layout(),
                                                             **guest_readings(), "USE_VMMCALL": int(vmmcall)})


def guest_layout() -> dict[str, int]:
    """The guest addresses vsm.S shares with the harness (the control page, input pages, VP 1's stack and port)."""
    names = ("CONTROL", "ENTRY_REASON", "RET_RAX", "RET_RCX", "MSG_TYPE", "MSG_GPA", "MSG_ACCESS", "VTL1_ENTRIES",
             "VTL1_INTERCEPTS", "VTL1_INTERRUPTS", "VTL1_STATUS", "VTL1_GOT_RIP", "WAKE_FLAG", "WRITES_DONE",
             "VP1_FLAG", "VP1_RSP", "VTL1_STATUS2", "VTL0_HCALL", "VTL1_HCALL", "INPUT", "VP0_INPUT", "VP1_STACK",
             "VP1_PORT")
    return {name: globals()[name] for name in names}


def fast_input(hcall: object, xmm: list[tuple[int, int]]) -> bytes:
    """A fast hypercall's input as its memory form would hold it: RDX, R8, then XMM0-5 (TLFS hypercall-interface)."""
    return struct.pack("<QQ", hcall.params[0], hcall.params[1]) + b"".join(struct.pack("<QQ", lo, hi) for lo, hi in xmm)


def field(data: bytes, offset: int, fmt: str = "<Q") -> int:
    """One little-endian field of a hypercall input."""
    return struct.unpack_from(fmt, data, offset)[0]


def hcall_of(vcpu: Vcpu) -> object | None:
    """The kvm_run hcall of a KVM_EXIT_HYPERV/HCALL exit, or None."""
    ex, run = vcpu.last_exit, vcpu.run_struct
    if ex is not None and ex.ret == 0 and ex.reason == uapi.KVM_EXIT_HYPERV \
            and run.x.hyperv.type == uapi.KVM_EXIT_HYPERV_HCALL:
        return run.x.hyperv.u.hcall
    return None


# vsm.S NOTE_HCALL, in the control page beside vsm.S's layout: per VTL, the control word of a hypercall the guest made
# that the VMM has not served. Every hypercall of vsm.S must exit, so a note left behind names one KVM answered itself.
NOTED = {0: VTL0_HCALL, 1: VTL1_HCALL}


def served(mem: MemRegion, vtl: int, control: int) -> None:
    """VTLn's hypercall `control` reached the VMM: no earlier one of VTLn may be noted still; clear the note."""
    answered_in_kernel(mem, vtl, control)
    mem.write_u64(NOTED[vtl], 0)


def answered_in_kernel(mem: MemRegion, vtl: int, serving: int = 0) -> None:
    """A hypercall VTLn noted, other than the one being served, never exited: the failure of the group whose patch
    makes its code exit (StepFailed), not of the scenario that composed it."""
    noted = mem.read_u64(NOTED[vtl])
    if noted not in (0, serving):
        raise StepFailed(hyperv.code_group(noted & 0xFFFF), f"catalog 80: VTL{vtl}'s hypercall {noted:#x} never "
                                                             "reached the VMM: KVM answered it in the kernel")


def complete_now(vcpu: Vcpu, what: str) -> None:
    """Let KVM finish a userspace hypercall exit without entering the guest (immediate_exit, api.rst), so that
    RIP is past the VMCALL before the harness reads or moves the vCPU's state."""
    ex = vcpu.complete_exit(STEP)
    if not (ex.ret < 0 and ex.errno == errno.EINTR):
        raise HarnessError(f"completing {what} with immediate_exit: {describe(vcpu)}")


def complete_vtl_switch(vcpu: Vcpu, hcall: object, what: str) -> None:
    """Complete HvCallVtlCall/HvCallVtlReturn, which return no status (TLFS): the harness leaves one in
    hcall.result all the same, and KVM must not write it to RAX (catalog 85)."""
    rax = vcpu.get_regs().rax
    hcall.result = hvtlfs.HV_STATUS_INVALID_PARAMETER
    complete_now(vcpu, what)
    after = vcpu.get_regs().rax
    if after != rax:
        raise StepFailed("vsm_hcalls", f"catalog 85: completing {what} changed RAX from {rax:#x} to {after:#x}")


class Vsm:
    """VP 0 in VTL0 and VTL1 (and more VPs in VTL0), one VM per VTL over one memory; VTL0 runs on the caller's
    thread, every other vCPU on its own, VTL1 waiting in KVM_MP_STATE_HV_INACTIVE_VTL while VTL0 runs."""

    def __init__(self, kvm: Kvm, vps: int = 1):
        self.kvm, self.log = kvm, Log()
        self.vm0 = self.vm1 = None
        self.threads: list[VcpuThread] = []
        self.waiting: Job | None = None
        self.wake_pending = threading.Event()
        self.caller = threading.get_ident()
        try:
            self._build(vps)
        except BaseException:
            self.close()
            raise

    # --- set-up ---------------------------------------------------------------------------------
    def _hv_vcpu(self, vcpu: Vcpu) -> None:
        vcpu.set_cpuid(hyperv.hv_cpuid(self.kvm, vcpu, VSM_BITS))
        hyperv.enable_lapic(vcpu)

    def _irqchip(self, vm: object) -> None:
        ret, err = vm.create_irqchip_raw()
        if ret < 0:
            raise Unavailable(f"KVM_CREATE_IRQCHIP failed ({uapi.errno_name(err)})")

    def _build(self, vps: int) -> None:
        hyperv.require_hyperv(self.kvm)
        self.vmmcall = hyperv.host_uses_vmmcall()
        payload = vsm_payload(self.vmmcall)
        self.vm0 = self.kvm.create_vm()
        self._irqchip(self.vm0)
        self.m0 = guest.build_machine(self.vm0, payload, vcpus=vps)
        self.mem = self.m0.mem
        for vcpu in self.m0.vcpus:
            self._hv_vcpu(vcpu)
        self.m0.vcpu.set_msrs({hvtlfs.HV_X64_MSR_GUEST_OS_ID: hvtlfs.GUEST_OS_ID_LINUX})
        self.vtl0 = self.m0.vcpu
        # VTL1: its own VM over the same mapping (VTL0's region owns it), its own vCPU for VP 0.
        self.vm1 = self.kvm.create_vm()
        self._irqchip(self.vm1)
        self.vm1.set_tss_addr()
        ret, err = self.vm1.set_user_memory_region_raw(0, 0, self.mem.size, self.mem.hva)
        if ret < 0:
            raise KvmError(err, "VTL1 VM: KVM_SET_USER_MEMORY_REGION over VTL0's memory")
        self.m1 = guest.Machine(self.vm1, payload, self.mem)
        self.vtl1 = self.m1.add_vcpu("vtl1_entry", vcpu_id=0)
        self._hv_vcpu(self.vtl1)
        self.vtl1.set_msrs({hvtlfs.HV_X64_MSR_GUEST_OS_ID: hvtlfs.GUEST_OS_ID_LINUX})
        regs = self.vtl1.get_regs()
        regs.rsp = VTL1_STACK
        self.vtl1.set_regs(regs)
        self.t1 = VcpuThread(self.vtl1, "vtl1-vp0")
        self.threads.append(self.t1)
        self.aps = {i: VcpuThread(v, f"vtl0-vp{i}") for i, v in enumerate(self.m0.vcpus) if i}
        self.threads.extend(self.aps.values())
        _set_state(self.vtl1, INACTIVE, "catalog 125: KVM_SET_MP_STATE(HV_INACTIVE_VTL) on VP 0's VTL1 vCPU")
        self.waiting = self.t1.submit(self._wait)

    def close(self) -> None:
        """Stop every vCPU thread (kicking a VTL out of its wait), then the VMs: VTL1's first, VTL0's owns the memory."""
        stuck: list[HarnessError] = []
        for t in self.threads:
            for _ in range(100):
                t.kick()
                if self._idle(t):
                    break
            try:
                t.close()
            except HarnessError as e:
                stuck.append(e)
        self.threads.clear()
        if stuck:       # the VMs stay open: a thread still in KVM_RUN would run on unmapped memory
            raise HarnessError("; ".join(str(e) for e in stuck) + ": the VMs are left open")
        for vm in (self.vm1, self.vm0):
            if vm is not None:
                vm.close()

    def _idle(self, t: VcpuThread) -> bool:
        """Has the thread's queue drained (a kick ended its KVM_RUN)? Waits a moment for it."""
        done = t.submit(lambda: None)
        try:
            done.result(timeout=0.05)
            return True
        except TimeoutError:
            return False

    # --- the inactive VTL ---------------------------------------------------------------------------
    def _wait(self) -> Wake:
        """On VTL1's thread: KVM_RUN in state 11 until an event for VTL1 (WAKEUP, TLFS: it preempts VTL0) or the
        harness's kick (EINTR: a VTL call or an intercept switches to it)."""
        vcpu = self.vtl1
        ex = vcpu.run(WAIT_LIMIT)
        if ex.errno == errno.EINTR:
            vcpu.run_struct.immediate_exit = 0
        wake = Wake(ex, vcpu.run_struct.x.system_event.type, -1)
        if wake.woken:
            wake.mp_state = vcpu.get_mp_state_raw()[0]
            self.log.wakes.append(wake)
            self.wake_pending.set()
            watchdog.kick(self.vtl0.run_struct, self.caller)   # preempt VTL0 wherever it is
        return wake

    def _end_wait(self) -> Wake:
        if not self.waiting.done():
            self.t1.kick()
        wake = self.waiting.result(timeout=WAIT_LIMIT)
        self.wake_pending.clear()
        if wake.exit.timed_out:
            raise StepFailed("mp_inactive_vtl", f"VTL1 waited in state 11 past {WAIT_LIMIT:g} s: {describe(self.vtl1)}")
        if not wake.woken and wake.exit.errno != errno.EINTR:
            raise StepFailed("mp_inactive_vtl", f"catalog 126/130: VTL1 in state 11 stopped without WAKEUP: "
                                                f"{describe(self.vtl1)}")
        return wake

    @contextmanager
    def vtl1_held(self) -> Iterator[Vcpu]:
        """VTL1's vCPU out of its wait for a look at its state (any other ioctl on it would wait for that KVM_RUN
        to end, as KVM holds the vCPU's mutex through KVM_RUN), then back in it."""
        self._end_wait()
        try:
            yield self.vtl1
        finally:
            self.waiting = self.t1.submit(self._wait)

    # --- VTL switches -------------------------------------------------------------------------------
    def switch_to_vtl1(self, reason: int) -> None:
        """TLFS VTL entry: park VTL0 (state 11), carry the shared registers into VTL1, run VTL1 on its thread until
        its VtlReturn, carry them back (RAX/RCX from the control page) and make VTL0 runnable again."""
        regs0 = self.vtl0.get_regs()
        _set_state(self.vtl0, INACTIVE, "catalog 125: parking VTL0 in KVM_MP_STATE_HV_INACTIVE_VTL")
        self._end_wait()
        self.mem.write(ENTRY_REASON, struct.pack("<I", reason))
        shared = self.t1.submit(self._vtl1_active, {r: getattr(regs0, r) for r in SHARED_GPRS}).result(WAIT_LIMIT)
        regs0 = self.vtl0.get_regs()   # again: SetVpRegisters may have moved VTL0 meanwhile
        for r in SHARED_GPRS:
            setattr(regs0, r, shared[r])
        regs0.rax, regs0.rcx = self.mem.read_u64(RET_RAX), self.mem.read_u64(RET_RCX)
        self.vtl0.set_regs(regs0)
        _set_state(self.vtl0, RUNNABLE, "making VTL0 runnable after VTL1's return")
        self.waiting = self.t1.submit(self._wait)

    def _vtl1_active(self, shared: dict[str, int]) -> dict[str, int]:
        """On VTL1's thread: run VTL1 with VTL0's shared registers, serving its hypercalls, until HvCallVtlReturn."""
        vcpu = self.vtl1
        vcpu.run_struct.immediate_exit = 0
        _set_state(vcpu, RUNNABLE, "waking VTL1: KVM_SET_MP_STATE(RUNNABLE)")
        regs = vcpu.get_regs()
        for r, value in shared.items():
            setattr(regs, r, value)
        vcpu.set_regs(regs)
        while True:
            ex = vcpu.run(STEP)
            if ex.ret < 0 and ex.errno == errno.EINTR and not ex.timed_out:
                vcpu.run_struct.immediate_exit = 0    # the kick that ended the wait arrived late
                continue
            hcall = hcall_of(vcpu)
            if hcall is None:
                answered_in_kernel(self.mem, 1)
                raise HarnessError(f"VTL1: {self.m1.describe(vcpu)}")
            served(self.mem, 1, hcall.input)
            if hcall.input & 0xFFFF == hvtlfs.HVCALL_VTL_RETURN:
                self.log.vtl_returns += 1
                complete_vtl_switch(vcpu, hcall, "HvCallVtlReturn")
                regs = vcpu.get_regs()
                _set_state(vcpu, INACTIVE, "catalog 125: VTL1 back to KVM_MP_STATE_HV_INACTIVE_VTL")
                return {r: getattr(regs, r) for r in SHARED_GPRS}
            hcall.result = self.serve(1, vcpu, hcall)

    # --- VTL0 -------------------------------------------------------------------------------------
    def enter(self, entry: str, **regs: int) -> None:
        """Point VP 0's VTL0 at a vsm.S entry with the given registers."""
        r = self.vtl0.get_regs()
        r.rip, r.rsp = self.m0.sym(entry), guest.STACK_TOP
        for name, value in regs.items():
            setattr(r, name, value)
        self.vtl0.set_regs(r)

    def step(self) -> guest.Ucall | None:
        """One KVM_RUN of VTL0 and what it asks of the VMM (a VTL switch, a served hypercall); its ucall if any."""
        if threading.get_ident() != self.caller:
            raise RuntimeError("VTL0 of VP 0 runs on the thread that built the harness")
        if self.wake_pending.is_set():     # an event for VTL1 came while VTL0 was not in KVM_RUN
            self.switch_to_vtl1(ENTRY_INTERRUPT)
            return None
        vcpu = self.vtl0
        ex = vcpu.run(STEP)
        hcall = hcall_of(vcpu)
        if hcall is not None:
            served(self.mem, 0, hcall.input)
            if hcall.input & 0xFFFF == hvtlfs.HVCALL_VTL_CALL:
                self.log.vtl_calls += 1
                complete_vtl_switch(vcpu, hcall, "HvCallVtlCall")
                self.switch_to_vtl1(ENTRY_VTL_CALL)
            else:
                hcall.result = self.serve(0, vcpu, hcall)
            return None
        if ex.ret == -1 and ex.errno == errno.EFAULT and ex.reason == uapi.KVM_EXIT_MEMORY_FAULT:
            self.intercept(vcpu)
            return None
        if ex.ret == -1 and ex.errno == errno.EINTR and not ex.timed_out:
            vcpu.run_struct.immediate_exit = 0      # preempted for VTL1 (switched on the next step), or a stale kick
            return None
        answered_in_kernel(self.mem, 0)      # VTL0 stopped after a hypercall that never exited
        uc = self.m0.ucall(vcpu)
        if uc is None or uc.cmd == guest.UCALL_ASSERT:
            raise HarnessError(f"VTL0: {self.m0.describe(vcpu)}")
        return uc

    def run(self, max_steps: int) -> guest.Ucall:
        """Run VTL0 of VP 0, switching VTLs and serving exits like a VMM, until its next ucall (within max_steps
        KVM_RUNs of VTL0: a sequence that loops, e.g. on a protection never lifted, fails instead of spinning)."""
        for _ in range(max_steps):
            uc = self.step()
            if uc is not None:
                return uc
        raise HarnessError(f"VTL0 made no ucall in {max_steps} exits: {self.m0.describe(self.vtl0)}")

    def intercept(self, vcpu: Vcpu) -> None:
        """A VTL0 access denied by VTL1's protection: post a GPA intercept message and enter VTL1 for it."""
        fault = Fault.of(vcpu.run_struct)
        self.log.faults.append((fault, vcpu.get_regs().rip))
        access = (ACCESS_WRITE if fault.flags & uapi.KVM_MEMORY_EXIT_FLAG_WRITE else
                  ACCESS_EXECUTE if fault.flags & uapi.KVM_MEMORY_EXIT_FLAG_EXEC else ACCESS_READ)
        self.mem.write(MSG_TYPE, struct.pack("<IIQQ", MSG_GPA_INTERCEPT, 0, fault.gpa, access))
        self.switch_to_vtl1(ENTRY_INTERRUPT)

    # --- hypercalls the VMM serves -----------------------------------------------------------------
    def serve(self, vtl: int, vcpu: Vcpu, hcall: object) -> int:
        """The result of a hypercall exit that is not a VTL switch (TLFS semantics; XMM output written back)."""
        xmm = [(hcall.xmm[i].low, hcall.xmm[i].high) for i in range(6)]
        self.log.hcalls.append((vtl, hcall.input, xmm))
        code, reps = hcall.input & 0xFFFF, (hcall.input >> 32) & 0xFFF
        fast = bool(hcall.input & hvtlfs.HV_HYPERCALL_FAST_BIT)
        if code == hvtlfs.HVCALL_MODIFY_VTL_PROTECTION_MASK and vtl == 1 and not fast:
            return self._modify_protection(hcall.params[0], reps)
        if code == hvtlfs.HVCALL_GET_VP_REGISTERS and fast:
            return self._get_vp_registers(vtl, hcall, xmm, reps)
        if code == hvtlfs.HVCALL_SET_VP_REGISTERS and fast:
            return self._set_vp_registers(vtl, hcall, xmm, reps)
        if code == hvtlfs.HVCALL_START_VP and vtl == 0 and not fast:
            return self._start_vp(hcall.params[0])
        raise HarnessError(f"VTL{vtl}: hypercall {hcall.input:#x} is not one the harness serves")

    def _modify_protection(self, gpa: int, reps: int) -> int:
        data = self.mem.read(gpa, MODIFY_PAGES + 8 * reps)
        flags, target = field(data, MODIFY_FLAGS, "<I"), data[MODIFY_VTL]
        attrs = ((0 if flags & MAP_READ else uapi.KVM_MEMORY_ATTRIBUTE_NR)
                 | (0 if flags & MAP_WRITE else uapi.KVM_MEMORY_ATTRIBUTE_NW)
                 | (0 if flags & MAP_KERNEL_EXEC else uapi.KVM_MEMORY_ATTRIBUTE_NX))
        if target != USE_TARGET_VTL:     # VTL 0, named: the only VTL below VTL1
            return hvtlfs.HV_STATUS_INVALID_PARAMETER
        for number in struct.unpack_from(f"<{reps}Q", data, MODIFY_PAGES):
            page = number << 12
            ret, err = self.vm0.set_memory_attributes_raw(page, guest.PAGE, attrs)
            if ret < 0:
                raise StepFailed("rwx_attributes", f"catalog 16: KVM_SET_MEMORY_ATTRIBUTES({page:#x}, {attrs:#x}) on "
                                                   f"the VTL0 VM: {uapi.errno_name(err)}")
            self.log.protections.append((page, attrs))
        return hvtlfs.HV_STATUS_SUCCESS | reps << 32

    def _vp_target(self, vtl: int, data: bytes) -> Vcpu | None:
        """The vCPU a VP-register hypercall's header names: (VP, target VTL), without use_target_vtl the caller's."""
        vp_index, input_vtl = field(data, HEADER_VP_INDEX, "<I"), data[HEADER_VTL]
        target_vtl = input_vtl & 0xF if input_vtl & USE_TARGET_VTL else vtl
        if target_vtl == 1 and vp_index == 0:
            return self.vtl1
        if target_vtl == 0 and vp_index < len(self.m0.vcpus):
            return self.m0.vcpus[vp_index]
        return None

    def _get_vp_registers(self, vtl: int, hcall: object, xmm: list[tuple[int, int]], reps: int) -> int:
        data = fast_input(hcall, xmm)
        target = self._vp_target(vtl, data)
        first_out = -(-(GET_NAMES + GET_NAME_SIZE * reps) // 16) - 1    # the XMM register after the names (XMM0 at 16)
        if target is None or first_out + reps * VALUE_SIZE // 16 > 6:
            return hvtlfs.HV_STATUS_INVALID_PARAMETER
        names = struct.unpack_from(f"<{reps}I", data, GET_NAMES)
        regs = target.get_regs()
        values = {HV_X64_REGISTER_RIP: regs.rip, HV_X64_REGISTER_RFLAGS: regs.rflags}
        if any(n not in values for n in names):
            return hvtlfs.HV_STATUS_INVALID_PARAMETER
        for i, name in enumerate(names):     # every XMM is written back (P01): inputs unchanged, values after them
            out = hcall.xmm[first_out + i * VALUE_SIZE // 16]
            out.low, out.high = values[name], 0
        return hvtlfs.HV_STATUS_SUCCESS | reps << 32

    def _set_vp_registers(self, vtl: int, hcall: object, xmm: list[tuple[int, int]], reps: int) -> int:
        data = fast_input(hcall, xmm)
        target = self._vp_target(vtl, data)
        if target is None or SET_PAIRS + SET_PAIR_SIZE * reps > len(data):
            return hvtlfs.HV_STATUS_INVALID_PARAMETER
        regs = target.get_regs()
        for i in range(reps):
            pair = SET_PAIRS + SET_PAIR_SIZE * i
            name, value = field(data, pair, "<I"), field(data, pair + SET_PAIR_VALUE)
            if name == HV_X64_REGISTER_RIP:
                regs.rip = value
            elif name == HV_X64_REGISTER_RFLAGS:
                regs.rflags = value
            else:
                return hvtlfs.HV_STATUS_INVALID_PARAMETER
        target.set_regs(regs)
        return hvtlfs.HV_STATUS_SUCCESS | reps << 32

    def _start_vp(self, gpa: int) -> int:
        """HvCallStartVirtualProcessor: the VP's VTL0 vCPU gets the initial context and runs on its own thread."""
        data = self.mem.read(gpa, START_CONTEXT + CONTEXT_CR4 + 8)
        vp_index, target_vtl = field(data, HEADER_VP_INDEX, "<I"), data[HEADER_VTL]
        t = self.aps.get(vp_index)
        if t is None or target_vtl != 0:
            return hvtlfs.HV_STATUS_INVALID_PARAMETER
        rip, rsp, rflags, efer, cr0, cr3, cr4 = (field(data, START_CONTEXT + offset) for offset in (
            CONTEXT_RIP, CONTEXT_RSP, CONTEXT_RFLAGS, CONTEXT_EFER, CONTEXT_CR0, CONTEXT_CR3, CONTEXT_CR4))
        vcpu = t.vcpu
        sregs = vcpu.get_sregs()
        sregs.efer, sregs.cr0, sregs.cr3, sregs.cr4 = efer, cr0, cr3, cr4
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rsp, regs.rflags = rip, rsp, rflags
        vcpu.set_regs(regs)
        _ok(vcpu.set_mp_state_raw(RUNNABLE), f"starting VP {vp_index}: KVM_SET_MP_STATE(RUNNABLE)")
        self.log.started[vp_index] = t.submit(vcpu.run, STEP)
        return hvtlfs.HV_STATUS_SUCCESS

    # --- events for VTL1 ----------------------------------------------------------------------------
    def signal_vtl1_raw(self, vector: int) -> tuple[int, int]:
        """A fixed interrupt for VP 0's VTL1 (its VM's APIC 0), as a device or another VP would send it."""
        return self.vm1.signal_msi_raw(0xFEE00000, vector)


@contextmanager
def build_vsm(kvm: Kvm, vps: int = 1) -> Iterator[Vsm]:
    """A two-VTL harness that is always closed: threads stopped, VMs, fds and mappings released."""
    vsm = Vsm(kvm, vps)
    try:
        yield vsm
    finally:
        vsm.close()
