/* Hyper-V hypercalls from a 64-bit CPL0 guest. The host sets RCX/RDX/R8, a RAX sentinel, seeded RFLAGS and an
 * FXSAVE image: the guest restores XMM0-15 and MXCSR from it (FXRSTOR: memory forms only, some hosts emulate no
 * SSE register form and no LDMXCSR), issues the hypercall, stores RFLAGS (before any instruction can change it),
 * RDX, R8 and an FXSAVE image to the report area and syncs RAX (stage 1, with RCX as the next argument: KVM never
 * writes RCX, so an unchanged RCX shows that the guest resumed exactly after the 3-byte VMCALL/VMMCALL, whose tail
 * bytes would add into ECX). A #UD is reported by the exception handler. */
.include "common.inc"

/* From the builder (--defsym, hyperv.py HCALL_DEFINES): REGS_IN, the FXSAVE image restored before the call;
 * REGS_OUT, the FXSAVE image after it, then RDX, R8 and RFLAGS at REGS_OUT + REPORT_RDX/REPORT_R8/REPORT_RFLAGS. */

_start:
	GUEST_DONE

report:
	pushfq
	popq REGS_OUT + REPORT_RFLAGS
	movq %rdx, REGS_OUT + REPORT_RDX
	movq %r8, REGS_OUT + REPORT_R8
	fxsave REGS_OUT
	ret

.globl hcall_vmcall
hcall_vmcall:
	fxrstor REGS_IN
.globl hcall_vmcall_insn
hcall_vmcall_insn:
	vmcall
.globl hcall_vmcall_after
hcall_vmcall_after:
	call report
	movq %rcx, UCALL_ARG2
	GUEST_SYNC 1
	GUEST_DONE

.globl hcall_vmmcall
hcall_vmmcall:
	fxrstor REGS_IN
.globl hcall_vmmcall_insn
hcall_vmmcall_insn:
	vmmcall
.globl hcall_vmmcall_after
hcall_vmmcall_after:
	call report
	movq %rcx, UCALL_ARG2
	GUEST_SYNC 1
	GUEST_DONE

/* The same hypercall from CPL 3: expected to raise #UD. */
.globl hcall_user_vmcall
hcall_user_vmcall:
	ENTER_USER hcall_vmcall_insn
.globl hcall_user_vmmcall
hcall_user_vmmcall:
	ENTER_USER hcall_vmmcall_insn
