/* Hyper-V hypercalls from a 64-bit CPL0 guest. The host sets RCX/RDX/R8 (and a RAX sentinel) and
 * the XMM input area; the guest loads XMM0-5 from it, issues the hypercall, stores XMM0-5 to the
 * output area and syncs RAX (stage 1, with RCX as the next argument: KVM never writes RCX, so an
 * unchanged RCX shows that the guest resumed exactly after the 3-byte VMCALL/VMMCALL, whose tail
 * bytes would add into ECX). A #UD is reported by the exception handler. */
.include "common.inc"

.set XMM_IN, UCALL_GPA + 0x800
.set XMM_OUT, UCALL_GPA + 0x880

_start:
	GUEST_DONE

load_xmm:
	movdqu XMM_IN + 0x00, %xmm0
	movdqu XMM_IN + 0x10, %xmm1
	movdqu XMM_IN + 0x20, %xmm2
	movdqu XMM_IN + 0x30, %xmm3
	movdqu XMM_IN + 0x40, %xmm4
	movdqu XMM_IN + 0x50, %xmm5
	ret

store_xmm:
	movdqu %xmm0, XMM_OUT + 0x00
	movdqu %xmm1, XMM_OUT + 0x10
	movdqu %xmm2, XMM_OUT + 0x20
	movdqu %xmm3, XMM_OUT + 0x30
	movdqu %xmm4, XMM_OUT + 0x40
	movdqu %xmm5, XMM_OUT + 0x50
	ret

.globl hcall_vmcall
hcall_vmcall:
	call load_xmm
.globl hcall_vmcall_insn
hcall_vmcall_insn:
	vmcall
.globl hcall_vmcall_after
hcall_vmcall_after:
	call store_xmm
	movq %rcx, UCALL_ARG2
	GUEST_SYNC 1
	GUEST_DONE

.globl hcall_vmmcall
hcall_vmmcall:
	call load_xmm
.globl hcall_vmmcall_insn
hcall_vmmcall_insn:
	vmmcall
.globl hcall_vmmcall_after
hcall_vmmcall_after:
	call store_xmm
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
