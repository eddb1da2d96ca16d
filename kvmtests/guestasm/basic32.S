/* 32-bit protected-mode payloads: a port write and a reported #UD. */
.include "common32.inc"

_start:
	movw $PIO_PORT, %dx
	movl $0xa1b2c3d4, %eax
	outl %eax, %dx
	GUEST_SYNC 1, %esp
	GUEST_DONE

.globl ud
ud:
	ud2
.globl ud_resume
ud_resume:
	GUEST_DONE
