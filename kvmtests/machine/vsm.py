"""Two-VTL harness: the VMM design of spec 5.1 (one KVM VM per VTL over one shared guest memory, one vCPU per
(VP, VTL), VTL switching in userspace) driving the TLFS VSM sequences through the series' exits. Not a VMM: no
devices, no SynIC. Guest side in guestasm/vsm.S; every KVM_RUN is bounded by the watchdog.

Readings of the TLFS the harness relies on (run so far only on a local, partial port of the series to 6.12
under QEMU TCG, AMD; not on the posted series):
- GPRs other than RSP are shared between VTLs; RIP, RSP, RFLAGS and the control registers are private. A VTL
  return gives the lower VTL the RAX/RCX that the higher VTL left in its control page (hv_vp_vtl_control
  vtl_ret_x64rax/rcx); here the control page is a host-defined page, not the VP assist page.
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
from .kvm import Exit, Kvm, KvmError, Unavailable, Vcpu
from .memfault import Fault

ENTRY_VTL_CALL, ENTRY_INTERRUPT = 1, 2          # TLFS HV_VTL_ENTRY_REASON
MSG_GPA_INTERCEPT = 0x80000001                  # TLFS HvMessageTypeGpaIntercept
ACCESS_READ, ACCESS_WRITE, ACCESS_EXECUTE = 0, 1, 2   # TLFS HV_INTERCEPT_ACCESS_TYPE
MAP_READ, MAP_WRITE, MAP_KERNEL_EXEC = 1, 2, 4  # TLFS HV_MAP_GPA_* (HvModifyVtlProtectionMask)
HV_X64_REGISTER_RIP, HV_X64_REGISTER_RFLAGS = 0x00020010, 0x00020011
USE_TARGET_VTL = hvtlfs.HV_INPUT_VTL_USE_TARGET_VTL

# The control page (vsm.S, which has the full layout), in VTL-shared memory: what the harness and tests read.
CONTROL = guest.DATA_GPA
ENTRY_REASON, RET_RAX, RET_RCX = CONTROL + 0x00, CONTROL + 0x08, CONTROL + 0x10
MSG_TYPE, MSG_GPA, MSG_ACCESS = CONTROL + 0x20, CONTROL + 0x28, CONTROL + 0x30
VTL1_ENTRIES, VTL1_INTERCEPTS, VTL1_INTERRUPTS = CONTROL + 0x40, CONTROL + 0x48, CONTROL + 0x50
VTL1_STATUS, VTL1_GOT_RIP = CONTROL + 0x58, CONTROL + 0x60
WRITES_DONE, VP1_RSP, VTL1_STATUS2 = CONTROL + 0x70, CONTROL + 0x80, CONTROL + 0x88
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


def _ok(result: tuple[int, int], what: str) -> None:
    ret, err = result
    if ret < 0:
        raise HarnessError(f"{what}: {uapi.errno_name(err)}")


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

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


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


def hcall_of(vcpu: Vcpu) -> object | None:
    """The kvm_run hcall of a KVM_EXIT_HYPERV/HCALL exit, or None."""
    ex, run = vcpu.last_exit, vcpu.run_struct
    if ex is not None and ex.ret == 0 and ex.reason == uapi.KVM_EXIT_HYPERV \
            and run.x.hyperv.type == uapi.KVM_EXIT_HYPERV_HCALL:
        return run.x.hyperv.u.hcall
    return None


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
        raise HarnessError(f"catalog 85: completing {what} changed RAX from {rax:#x} to {after:#x}")


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
        ret, err = vm.create_irqchip()
        if ret < 0:
            raise Unavailable(f"KVM_CREATE_IRQCHIP failed ({uapi.errno_name(err)})")

    def _build(self, vps: int) -> None:
        hyperv.require_hyperv(self.kvm)
        self.vmmcall = hyperv.host_uses_vmmcall()
        payload = asm.assemble("vsm", base=guest.CODE_GPA,
                               defines={**guest.layout_defines(), "USE_VMMCALL": int(self.vmmcall)})
        self.vm0 = self.kvm.create_vm()
        self._irqchip(self.vm0)
        self.m0 = guest.build(self.vm0, payload, vcpus=vps)
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
        _ok(self.vtl1.set_mp_state(INACTIVE), "catalog 125: KVM_SET_MP_STATE(HV_INACTIVE_VTL) on VP 0's VTL1 vCPU")
        self.waiting = self.t1.submit(self._wait)

    def close(self) -> None:
        """Stop every vCPU thread (kicking a VTL out of its wait), then the VMs: VTL1's first, VTL0's owns the memory."""
        for t in self.threads:
            for _ in range(100):
                t.kick()
                if self._idle(t):
                    break
            t.close()
        self.threads.clear()
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
            wake.mp_state = vcpu.get_mp_state()[0]
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
            raise HarnessError(f"VTL1 waited in state 11 past {WAIT_LIMIT:g} s: {describe(self.vtl1)}")
        if not wake.woken and wake.exit.errno != errno.EINTR:
            raise HarnessError(f"catalog 126/130: VTL1 in state 11 stopped without WAKEUP: {describe(self.vtl1)}")
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
        _ok(self.vtl0.set_mp_state(INACTIVE), "catalog 125: parking VTL0 in KVM_MP_STATE_HV_INACTIVE_VTL")
        self._end_wait()
        self.mem.write(ENTRY_REASON, struct.pack("<I", reason))
        shared = self.t1.submit(self._vtl1_active, {r: getattr(regs0, r) for r in SHARED_GPRS}).result(WAIT_LIMIT)
        regs0 = self.vtl0.get_regs()   # again: SetVpRegisters may have moved VTL0 meanwhile
        for r in SHARED_GPRS:
            setattr(regs0, r, shared[r])
        regs0.rax, regs0.rcx = self.mem.read_u64(RET_RAX), self.mem.read_u64(RET_RCX)
        self.vtl0.set_regs(regs0)
        _ok(self.vtl0.set_mp_state(RUNNABLE), "making VTL0 runnable after VTL1's return")
        self.waiting = self.t1.submit(self._wait)

    def _vtl1_active(self, shared: dict[str, int]) -> dict[str, int]:
        """On VTL1's thread: run VTL1 with VTL0's shared registers, serving its hypercalls, until HvCallVtlReturn."""
        vcpu = self.vtl1
        vcpu.run_struct.immediate_exit = 0
        _ok(vcpu.set_mp_state(RUNNABLE), "waking VTL1: KVM_SET_MP_STATE(RUNNABLE)")
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
                raise HarnessError(f"VTL1: {self.m1.describe(vcpu)}")
            if hcall.input & 0xFFFF == hvtlfs.HVCALL_VTL_RETURN:
                self.log.vtl_returns += 1
                complete_vtl_switch(vcpu, hcall, "HvCallVtlReturn")
                regs = vcpu.get_regs()
                _ok(vcpu.set_mp_state(INACTIVE), "catalog 125: VTL1 back to KVM_MP_STATE_HV_INACTIVE_VTL")
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
        partition, flags, target = struct.unpack("<QIB", self.mem.read(gpa, 13))
        attrs = ((0 if flags & MAP_READ else uapi.KVM_MEMORY_ATTRIBUTE_NR)
                 | (0 if flags & MAP_WRITE else uapi.KVM_MEMORY_ATTRIBUTE_NW)
                 | (0 if flags & MAP_KERNEL_EXEC else uapi.KVM_MEMORY_ATTRIBUTE_NX))
        if target != USE_TARGET_VTL:     # VTL 0, named: the only VTL below VTL1
            return hvtlfs.HV_STATUS_INVALID_PARAMETER
        for i in range(reps):
            page = self.mem.read_u64(gpa + 16 + 8 * i) << 12
            ret, err = self.vm0.set_memory_attributes(page, guest.PAGE, attrs)
            if ret < 0:
                raise HarnessError(f"catalog 16: KVM_SET_MEMORY_ATTRIBUTES({page:#x}, {attrs:#x}) on the VTL0 VM: "
                                   f"{uapi.errno_name(err)}")
            self.log.protections.append((page, attrs))
        return hvtlfs.HV_STATUS_SUCCESS | reps << 32

    def _target(self, vtl: int, vp_index: int, input_vtl: int) -> Vcpu | None:
        """The vCPU a VP-register hypercall names: (VP, target VTL), the caller's VTL without use_target_vtl."""
        target_vtl = input_vtl & 0xF if input_vtl & USE_TARGET_VTL else vtl
        if target_vtl == 1 and vp_index == 0:
            return self.vtl1
        if target_vtl == 0 and vp_index < len(self.m0.vcpus):
            return self.m0.vcpus[vp_index]
        return None

    def _get_vp_registers(self, vtl: int, hcall: object, xmm: list[tuple[int, int]], reps: int) -> int:
        target = self._target(vtl, hcall.params[1] & 0xFFFFFFFF, hcall.params[1] >> 32 & 0xFF)
        names = struct.unpack(f"<{reps}I", b"".join(struct.pack("<QQ", lo, hi) for lo, hi in xmm)[:4 * reps])
        first_out = (4 * reps + 15) // 16
        if target is None or first_out + reps > 6:
            return hvtlfs.HV_STATUS_INVALID_PARAMETER
        regs = target.get_regs()
        values = {HV_X64_REGISTER_RIP: regs.rip, HV_X64_REGISTER_RFLAGS: regs.rflags}
        if any(n not in values for n in names):
            return hvtlfs.HV_STATUS_INVALID_PARAMETER
        for i, name in enumerate(names):     # every XMM is written back (P01): inputs unchanged, values after them
            hcall.xmm[first_out + i].low, hcall.xmm[first_out + i].high = values[name], 0
        return hvtlfs.HV_STATUS_SUCCESS | reps << 32

    def _set_vp_registers(self, vtl: int, hcall: object, xmm: list[tuple[int, int]], reps: int) -> int:
        target = self._target(vtl, hcall.params[1] & 0xFFFFFFFF, hcall.params[1] >> 32 & 0xFF)
        if target is None or 2 * reps > 6:
            return hvtlfs.HV_STATUS_INVALID_PARAMETER
        regs = target.get_regs()
        for i in range(reps):
            name, value = xmm[2 * i][0] & 0xFFFFFFFF, xmm[2 * i + 1][0]
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
        _, vp_index, target_vtl = struct.unpack("<QIB", self.mem.read(gpa, 13))
        t = self.aps.get(vp_index)
        if t is None or target_vtl != 0:
            return hvtlfs.HV_STATUS_INVALID_PARAMETER
        rip, rsp, rflags = struct.unpack("<QQQ", self.mem.read(gpa + 16, 24))
        efer, cr0, cr3, cr4 = struct.unpack("<QQQQ", self.mem.read(gpa + 16 + 184, 32))
        vcpu = t.vcpu
        sregs = vcpu.get_sregs()
        sregs.efer, sregs.cr0, sregs.cr3, sregs.cr4 = efer, cr0, cr3, cr4
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rsp, regs.rflags = rip, rsp, rflags
        vcpu.set_regs(regs)
        _ok(vcpu.set_mp_state(RUNNABLE), f"starting VP {vp_index}: KVM_SET_MP_STATE(RUNNABLE)")
        self.log.started[vp_index] = t.submit(vcpu.run, STEP)
        return hvtlfs.HV_STATUS_SUCCESS

    # --- events for VTL1 ----------------------------------------------------------------------------
    def signal_vtl1(self, vector: int) -> tuple[int, int]:
        """A fixed interrupt for VP 0's VTL1 (its VM's APIC 0), as a device or another VP would send it."""
        return self.vm1.signal_msi(0xFEE00000, vector)


@contextmanager
def build(kvm: Kvm, vps: int = 1) -> Iterator[Vsm]:
    """A two-VTL harness that is always closed: threads stopped, VMs, fds and mappings released."""
    vsm = Vsm(kvm, vps)
    try:
        yield vsm
    finally:
        vsm.close()
