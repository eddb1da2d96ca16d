/* Two-VTL guest for machine/vsm.py: VTL0 and VTL1 run this same image from one shared memory, each on its
 * own VM and vCPU (spec 5.1). VTL0 entries are called by the host; VTL1 is entered only by the harness (at
 * vtl1_entry the first time, afterwards after its last VtlReturn, TLFS "VTL return") and dispatches on the
 * entry reason and, for a VTL call, on the command in RDX. GPRs are shared between the VTLs (TLFS register
 * sharing): VTL1 preserves what it does not return, and returns RAX/RCX through the control page (TLFS
 * hv_vp_vtl_control vtl_ret_x64rax/rcx). USE_VMMCALL comes from the builder (the host's native instruction),
 * and so do the TLFS readings (vsm.py guest_readings: hypercall codes, entry reasons, map flags MAP_ALL and
 * MAP_NO_WRITE, register names, hypercall input offsets), the values the harness parses the inputs with. */
.include "common.inc"

.set CMD_ECHO, 0
.set CMD_PROTECT, 1
.set CMD_REGS, 2
.set ECHO_MAGIC, 0x5a5a0000

/* The control page (its layout: vsm.py), VTL1's INPUT and VTL0's VP0_INPUT hypercall input pages, VP1_STACK and
 * VP1_PORT come from the builder (--defsym, vsm.py guest_layout). */

.macro HVCALL
.if USE_VMMCALL
	vmmcall
.else
	vmcall
.endif
.endm

/* Note the hypercall in RCX for the VMM unless an earlier one is noted still: the VMM clears the note when it serves
 * the exit (vsm.py served), and every hypercall here must exit, so a note left names one KVM answered itself. */
.macro NOTE_HCALL slot
	cmpq $0, \slot
	jne .Lnoted\@
	movq %rcx, \slot
.Lnoted\@:
.endm

_start:
	GUEST_DONE

/* --- VTL0 -------------------------------------------------------------------------------------- */

/* RBX VTL calls (echo): VTL1 answers RSI = 2i+1, RAX = i ^ ECHO_MAGIC, RCX = i; any drift is an ASSERT. */
.globl vtl0_calls
vtl0_calls:
	xorq %r12, %r12
	movq %rsp, %r13
1:	incq %r12
	movq %r12, %rdi
	movq $CMD_ECHO, %rdx
	movq $HVCALL_VTL_CALL, %rcx
	NOTE_HCALL VTL0_HCALL
.globl vtl0_call_insn
vtl0_call_insn:
	HVCALL
	leaq 1(%r12,%r12), %r14
	GUEST_ASSERT_EQ %rsi, %r14, 1
	movq %r12, %r14
	xorq $ECHO_MAGIC, %r14
	GUEST_ASSERT_EQ %rax, %r14, 2
	GUEST_ASSERT_EQ %rcx, %r12, 3
	GUEST_ASSERT_EQ %rsp, %r13, 4
	cmpq %rbx, %r12
	jb 1b
	GUEST_SYNC 1, %r12
	GUEST_DONE

/* VTL calls forever (benchmark): every round trip is one VtlCall exit of VTL0. */
.globl vtl0_call_loop
vtl0_call_loop:
	movq $1, %rdi
	movq $CMD_ECHO, %rdx
	movq $HVCALL_VTL_CALL, %rcx
	NOTE_HCALL VTL0_HCALL
	HVCALL
	jmp vtl0_call_loop

/* Ask VTL1 to make the page at RBX not writable for VTL0, then write RAX to it: the write faults, VTL1
 * lifts the protection on the intercept, and the write retires; WRITES_DONE counts the retirements. */
.globl vtl0_protect
vtl0_protect:
	movq %rbx, %rdi
	movq $CMD_PROTECT, %rdx
	movq $HVCALL_VTL_CALL, %rcx
	NOTE_HCALL VTL0_HCALL
	HVCALL
	movabsq $0x0123456789abcdef, %rax
	movq %rax, %r12
.globl vtl0_protected_write
vtl0_protected_write:
	movq %rax, (%rbx)
.globl vtl0_protected_write_end
vtl0_protected_write_end:
	incq WRITES_DONE
	GUEST_ASSERT_EQ %rax, %r12, 5
	movq (%rbx), %rax
	GUEST_SYNC 2
	GUEST_DONE

/* The same round trip forever (benchmark): protect, write, (intercept, lift), again. */
.globl vtl0_protect_loop
vtl0_protect_loop:
	movq %rbx, %rdi
	movq $CMD_PROTECT, %rdx
	movq $HVCALL_VTL_CALL, %rcx
	NOTE_HCALL VTL0_HCALL
	HVCALL
	movq %rax, (%rbx)
	jmp vtl0_protect_loop

/* Spin with a value in R12 until VTL1 (entered on an interrupt) sets WAKE_FLAG; report R12. */
.globl vtl0_spin
vtl0_spin:
	movabsq $0x7e57c0de7e57c0de, %r12
1:	pause
	cmpq $0, WAKE_FLAG
	je 1b
	GUEST_SYNC 3, %r12
	GUEST_DONE

/* VTL call asking VTL1 to read VTL0's RIP (GetVpRegisters, XMM output) and move it to vtl0_redirected
 * (SetVpRegisters): VTL0 must not come back after its VMCALL. */
.globl vtl0_regs
vtl0_regs:
	movq $CMD_REGS, %rdx
	movq $HVCALL_VTL_CALL, %rcx
	NOTE_HCALL VTL0_HCALL
.globl vtl0_regs_insn
vtl0_regs_insn:
	HVCALL
.globl vtl0_regs_after
vtl0_regs_after:
	GUEST_SYNC 4
	GUEST_DONE
.globl vtl0_redirected
vtl0_redirected:
	GUEST_SYNC 5
	GUEST_DONE

/* Start VP 1 at vp1_entry (StartVirtualProcessor, slow, HV_INITIAL_VP_CONTEXT at input + 16), then wait
 * for it to run; report the status. */
.globl vtl0_start_vp
vtl0_start_vp:
	movq $VP0_INPUT, %rdi
	movq $-1, (%rdi)                   /* partition_id: HV_PARTITION_ID_SELF */
	movq $1, HEADER_VP_INDEX(%rdi)     /* vp_index 1, target_vtl 0 and the reserved bytes after it */
	movq $vp1_entry, (START_CONTEXT + CONTEXT_RIP)(%rdi)
	movq $VP1_STACK, (START_CONTEXT + CONTEXT_RSP)(%rdi)
	movq $2, (START_CONTEXT + CONTEXT_RFLAGS)(%rdi)
	movl $0xc0000080, %ecx
	rdmsr
	shlq $32, %rdx
	orq %rdx, %rax
	movq %rax, (START_CONTEXT + CONTEXT_EFER)(%rdi)
	movq %cr0, %rax
	movq %rax, (START_CONTEXT + CONTEXT_CR0)(%rdi)
	movq %cr3, %rax
	movq %rax, (START_CONTEXT + CONTEXT_CR3)(%rdi)
	movq %cr4, %rax
	movq %rax, (START_CONTEXT + CONTEXT_CR4)(%rdi)
	movq $HVCALL_START_VP, %rcx
	movq %rdi, %rdx
	xorq %r8, %r8
	NOTE_HCALL VTL0_HCALL
	HVCALL
	movq %rax, %r12
1:	pause
	cmpq $0, VP1_FLAG
	je 1b
	GUEST_SYNC 6, %r12
	GUEST_DONE

/* VP 1 (started by StartVirtualProcessor): leaves its mark and RSP, then stops at its own port. */
.globl vp1_entry
vp1_entry:
	movq %rsp, VP1_RSP
	movq $0x1, VP1_FLAG
	outb %al, $VP1_PORT
	jmp vp1_entry

/* --- VTL1 -------------------------------------------------------------------------------------- */

.globl vtl1_entry
vtl1_entry:
	movq %rax, RET_RAX                 /* what VTL0 gets back unless the call answers otherwise */
	movq %rcx, RET_RCX
	incq VTL1_ENTRIES
	cmpl $ENTRY_VTL_CALL, ENTRY_REASON
	jne vtl1_event
	cmpq $CMD_PROTECT, %rdx
	je vtl1_protect
	cmpq $CMD_REGS, %rdx
	je vtl1_regs
	/* echo */
	leaq 1(%rdi,%rdi), %rsi
	movq %rdi, %rax
	xorq $ECHO_MAGIC, %rax
	movq %rax, RET_RAX
	movq %rdi, RET_RCX
vtl1_return:
	xorl %eax, %eax
	movq $HVCALL_VTL_RETURN, %rcx
	NOTE_HCALL VTL1_HCALL
.globl vtl1_return_insn
vtl1_return_insn:
	HVCALL
	jmp vtl1_entry

/* HvModifyVtlProtectionMask(1 page at RDI, map flags in ESI) for VTL0; RDX and R8 are preserved. */
modify_protection:
	pushq %rdx
	pushq %r8
	movq $INPUT, %rdx
	movq $-1, (%rdx)                   /* partition_id: HV_PARTITION_ID_SELF */
	movl %esi, MODIFY_FLAGS(%rdx)
	movl $USE_TARGET_VTL, MODIFY_VTL(%rdx)    /* target_vtl: use_target_vtl, VTL 0; the reserved bytes */
	movq %rdi, %rax
	shrq $12, %rax
	movq %rax, MODIFY_PAGES(%rdx)      /* gpa_page_list[0] */
	movabsq $(HVCALL_MODIFY_VTL_PROTECTION_MASK | REP1), %rcx
	xorq %r8, %r8
	NOTE_HCALL VTL1_HCALL
	HVCALL
	movq %rax, VTL1_STATUS
	popq %r8
	popq %rdx
	ret

vtl1_protect:
	movl $MAP_NO_WRITE, %esi
	call modify_protection
	jmp vtl1_return

/* GetVpRegisters(VTL0 RIP), fast with XMM output into XMM1; SetVpRegisters(VTL0 RIP := vtl0_redirected). */
vtl1_regs:
	movq $-1, %rdx                     /* partition_id */
	movabsq $(USE_TARGET_VTL << ((HEADER_VTL - 8) * 8)), %r8    /* input bytes 8-15: vp_index 0, input_vtl */
	movl $HV_X64_REGISTER_RIP, %eax
	movq %rax, %xmm0
	pxor %xmm1, %xmm1
	movabsq $(HVCALL_GET_VP_REGISTERS | FAST | REP1), %rcx
	NOTE_HCALL VTL1_HCALL
	HVCALL
	movq %rax, VTL1_STATUS
	movq %xmm1, %rax
	movq %rax, VTL1_GOT_RIP
	movl $HV_X64_REGISTER_RIP, %eax
	movq %rax, %xmm0                   /* hv_register_assoc: name, reserved */
	movq $vtl0_redirected, %rax
	movq %rax, %xmm1                   /* value */
	movabsq $(HVCALL_SET_VP_REGISTERS | FAST | REP1), %rcx
	NOTE_HCALL VTL1_HCALL
	HVCALL
	movq %rax, VTL1_STATUS2
	jmp vtl1_return

/* Entered on an event: a GPA intercept message (lift the protection, let the access retire) or an
 * interrupt (take it with IF = 1, raise WAKE_FLAG). VTL0 was preempted: every shared register is kept. */
vtl1_event:
	cmpl $MSG_GPA_INTERCEPT, MSG_TYPE
	jne vtl1_interrupt
	incq VTL1_INTERCEPTS
	pushq %rdi
	pushq %rsi
	movq MSG_GPA, %rdi
	movl $MAP_ALL, %esi
	call modify_protection
	movl $0, MSG_TYPE
	popq %rsi
	popq %rdi
	jmp vtl1_return
vtl1_interrupt:
	sti
	nop
	cli
	incq VTL1_INTERRUPTS
	movq $1, WAKE_FLAG
	jmp vtl1_return
