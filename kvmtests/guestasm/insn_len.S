/* One labelled memory access per instruction length, 1 to 15 bytes, for reads (rN) and writes
 * (wN). Every access touches TARGET = DATA_GPA + 0x200; <row>_insn .. <row>_end delimit the
 * faulting instruction, so the host knows its exact length. Encodings (AT&T syntax):
 *   1 lodsb / stosb            AC / AA
 *   2 mov (%rbx),%eax          8B 03 / 89 03
 *   3 mov (%rbx),%rax          48 8B 03 / 48 89 03
 *   4 + SIB                    48 8B 04 0B
 *   5 + SIB disp8              48 8B 44 0B 10
 *   6 disp32                   8B 83 d32
 *   7 RIP-relative             48 8B 05 d32 (_start_common sits at CODE_GPA)
 *   8 SIB disp32 / imm32 disp8 48 8B 84 0B d32 / 48 C7 43 10 i32
 *   9 moffs64, 8-bit           A0 m64 / A2 m64
 *  10 moffs64, REX.W           48 A1 m64 / 48 A3 m64
 *  11 cmp/mov imm32, disp32    48 81 BB d32 i32 / 48 C7 83 d32 i32
 *  12 + SIB                    48 81 BC 0B d32 i32 / 48 C7 84 0B d32 i32
 *  13-15 row 12 with 1-3 DS segment-override prefixes (3E), ignored in 64-bit mode */
.include "common.inc"

.set TARGET, DATA_GPA + 0x200
.set IMM, 0x12345678

_start:
	GUEST_DONE

.macro ROW name, disp=0
.globl \name
\name:
	movabsq $(TARGET - \disp), %rbx
	xorl %ecx, %ecx
	movq $TARGET, %rdi
	movq %rdi, %rsi
	movq $0x5a, %rax
	cld
.globl \name\()_insn
\name\()_insn:
.endm

.macro END name
.globl \name\()_end
\name\()_end:
	GUEST_SYNC 1
	GUEST_DONE
.endm

ROW r1
	lodsb
END r1
ROW w1
	stosb
END w1

ROW r2
	movl (%rbx), %eax
END r2
ROW w2
	movl %eax, (%rbx)
END w2

ROW r3
	movq (%rbx), %rax
END r3
ROW w3
	movq %rax, (%rbx)
END w3

ROW r4
	movq (%rbx,%rcx), %rax
END r4
ROW w4
	movq %rax, (%rbx,%rcx)
END w4

ROW r5, 0x10
	movq 0x10(%rbx,%rcx), %rax
END r5
ROW w5, 0x10
	movq %rax, 0x10(%rbx,%rcx)
END w5

ROW r6, 0x1000
	movl 0x1000(%rbx), %eax
END r6
ROW w6, 0x1000
	movl %eax, 0x1000(%rbx)
END w6

ROW r7
	movq (_start_common + TARGET - CODE_GPA)(%rip), %rax
END r7
ROW w7
	movq %rax, (_start_common + TARGET - CODE_GPA)(%rip)
END w7

ROW r8, 0x100
	movq 0x100(%rbx,%rcx), %rax
END r8
ROW w8, 0x10
	movq $IMM, 0x10(%rbx)
END w8

ROW r9
	movabsb TARGET, %al
END r9
ROW w9
	movabsb %al, TARGET
END w9

ROW r10
	movabsq TARGET, %rax
END r10
ROW w10
	movabsq %rax, TARGET
END w10

ROW r11, 0x100
	cmpq $IMM, 0x100(%rbx)
END r11
ROW w11, 0x100
	movq $IMM, 0x100(%rbx)
END w11

.irp n, 12, 13, 14, 15
ROW r\n, 0x100
	.rept \n - 12
	.byte 0x3e
	.endr
	cmpq $IMM, 0x100(%rbx,%rcx)
END r\n
ROW w\n, 0x100
	.rept \n - 12
	.byte 0x3e
	.endr
	movq $IMM, 0x100(%rbx,%rcx)
END w\n
.endr
