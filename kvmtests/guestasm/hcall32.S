/* Hyper-V hypercalls from a 32-bit protected-mode CPL0 guest: control EDX:EAX, input EBX:ECX,
 * output EDI:ESI, status EDX:EAX. The guest syncs EAX (stage 1) and EDX (stage 2). */
.include "common32.inc"

_start:
	GUEST_DONE

.globl hcall_vmcall
hcall_vmcall:
.globl hcall_vmcall_insn
hcall_vmcall_insn:
	vmcall
.globl hcall_vmcall_after
hcall_vmcall_after:
	movl %edx, %esi
	GUEST_SYNC 1, %eax
	GUEST_SYNC 2, %esi
	GUEST_DONE

.globl hcall_vmmcall
hcall_vmmcall:
.globl hcall_vmmcall_insn
hcall_vmmcall_insn:
	vmmcall
.globl hcall_vmmcall_after
hcall_vmmcall_after:
	movl %edx, %esi
	GUEST_SYNC 1, %eax
	GUEST_SYNC 2, %esi
	GUEST_DONE
