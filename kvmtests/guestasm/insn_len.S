/* One labelled memory access per instruction length, 1 to 15 bytes, for reads (rN) and writes
 * (wN). Every access touches INSN_TARGET (guest.py, --defsym); <row>_insn .. <row>_end delimit the
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

.set IMM, 0x12345678

_start:
	GUEST_DONE

.macro ROW name, disp=0
.globl \name
\name:
	movabsq $(INSN_TARGET - \disp), %rbx
	xorl %ecx, %ecx
	movq $INSN_TARGET, %rdi
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

/* One row per length: rN reads with `rd`, wN writes with `wr`; %rbx + disp = INSN_TARGET. */
.macro ROWS n, rdisp, rd, wdisp, wr
ROW r\n, \rdisp
	\rd
END r\n
ROW w\n, \wdisp
	\wr
END w\n
.endm

/* DS segment-override prefixes (3E): ignored in 64-bit mode, each one byte longer */
.macro DS count
	.rept \count
	.byte 0x3e
	.endr
.endm

ROWS 1,  0,      "lodsb",                                          0,      "stosb"
ROWS 2,  0,      "movl (%rbx), %eax",                              0,      "movl %eax, (%rbx)"
ROWS 3,  0,      "movq (%rbx), %rax",                              0,      "movq %rax, (%rbx)"
ROWS 4,  0,      "movq (%rbx,%rcx), %rax",                         0,      "movq %rax, (%rbx,%rcx)"
ROWS 5,  0x10,   "movq 0x10(%rbx,%rcx), %rax",                     0x10,   "movq %rax, 0x10(%rbx,%rcx)"
ROWS 6,  0x1000, "movl 0x1000(%rbx), %eax",                        0x1000, "movl %eax, 0x1000(%rbx)"
ROWS 7,  0,      "movq (_start_common + INSN_TARGET - CODE_GPA)(%rip), %rax", 0, "movq %rax, (_start_common + INSN_TARGET - CODE_GPA)(%rip)"
ROWS 8,  0x100,  "movq 0x100(%rbx,%rcx), %rax",                    0x10,   "movq $IMM, 0x10(%rbx)"
ROWS 9,  0,      "movabsb INSN_TARGET, %al",                            0,      "movabsb %al, INSN_TARGET"
ROWS 10, 0,      "movabsq INSN_TARGET, %rax",                           0,      "movabsq %rax, INSN_TARGET"
ROWS 11, 0x100,  "cmpq $IMM, 0x100(%rbx)",                         0x100,  "movq $IMM, 0x100(%rbx)"
.irp n, 12, 13, 14, 15
ROWS \n, 0x100,  "DS \n-12; cmpq $IMM, 0x100(%rbx,%rcx)",          0x100,  "DS \n-12; movq $IMM, 0x100(%rbx,%rcx)"
.endr
