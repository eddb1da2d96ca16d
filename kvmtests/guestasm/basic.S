/* First payloads: port I/O, MMIO, HLT, read-only memslot, CPUID, MSRs. */
.include "common.inc"

/* PIO_PORT, MMIO_GPA and RO_GPA come from the builder (--defsym, guest.py layout_defines). */

_start:
	GUEST_DONE

/* out of 1, 2 and 4 bytes, then in of 1, 2 and 4 bytes */
.globl pio
pio:
	movw $PIO_PORT, %dx
	movl $0x12345678, %eax
	outb %al, %dx
	outw %ax, %dx
	outl %eax, %dx
	xorl %eax, %eax
	inb %dx, %al
	GUEST_SYNC 1
	inw %dx, %ax
	GUEST_SYNC 2
	inl %dx, %eax
	GUEST_SYNC 3
	GUEST_DONE

/* writes of 1, 2, 4, 8 bytes, then a read of 8 bytes, to an address with no memslot */
.globl mmio
mmio:
	movabsq $0x1122334455667788, %rax
	movq $MMIO_GPA, %rbx
	movb %al, (%rbx)
	movw %ax, 8(%rbx)
	movl %eax, 16(%rbx)
	movq %rax, 24(%rbx)
	movq 32(%rbx), %rax
	GUEST_SYNC 1
	GUEST_DONE

.globl halt
halt:
	hlt
.globl after_hlt
after_hlt:
	GUEST_DONE

/* a write to a read-only memslot exits as MMIO; the read before it does not exit */
.globl ro_write
ro_write:
	movq $RO_GPA, %rbx
	movq (%rbx), %rax
	GUEST_SYNC 1
	movq $0xabcdef, %rcx
.globl ro_store
ro_store:
	movq %rcx, 8(%rbx)
.globl ro_store_end
ro_store_end:
	GUEST_DONE

/* cpuid of the leaf in UCALL_ARG3 (set by the host), reported as four syncs */
.globl cpuid_leaf
cpuid_leaf:
	movq UCALL_ARG3, %rax
	xorl %ecx, %ecx
	cpuid
	movq %rbx, %rsi
	movq %rcx, %rdi
	GUEST_SYNC 0, %rax
	GUEST_SYNC 1, %rsi
	GUEST_SYNC 2, %rdi
	GUEST_SYNC 3, %rdx
	jmp cpuid_leaf

/* rdmsr and wrmsr of the MSR in UCALL_ARG3; the value read is synced */
.globl msr_access
msr_access:
	movq UCALL_ARG3, %rcx
.globl msr_rdmsr
msr_rdmsr:
	rdmsr
	shlq $32, %rdx
	orq %rdx, %rax
	GUEST_SYNC 1
	movq UCALL_ARG3, %rcx
	movl $0xcafef00d, %eax
	movl $0x12345678, %edx
	wrmsr
	GUEST_SYNC 2
	GUEST_DONE

/* an invalid opcode, reported by the exception handler; the host resumes at ud_resume */
.globl ud
ud:
	ud2
.globl ud_resume
ud_resume:
	GUEST_DONE

/* the same at CPL 3 */
.globl user_ud
user_ud:
	ENTER_USER ud

/* a bare VMCALL (KVM's own PV hypercall path without Hyper-V) */
.globl vmcall_bare
vmcall_bare:
	movq $0x50, %rcx
	movq $12, %rax
	vmcall
	GUEST_SYNC 1
	GUEST_DONE

/* never exits on its own: the watchdog must end the run */
.globl spin
spin:
	jmp spin

/* port writes forever: every KVM_RUN returns with one KVM_EXIT_IO (benchmarks) */
.globl pio_loop
pio_loop:
	outb %al, $0x80
	jmp pio_loop
