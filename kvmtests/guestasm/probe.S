/* Feature probes: one data access to the first test page. */
.include "common.inc"

_start:
	GUEST_DONE

.globl write_data
write_data:
	movq $DATA_GPA, %rbx
.globl write_data_insn
write_data_insn:
	movq %rax, (%rbx)
.globl write_data_end
write_data_end:
	GUEST_DONE

.globl read_data
read_data:
	movq $DATA_GPA, %rbx
.globl read_data_insn
read_data_insn:
	movq (%rbx), %rax
.globl read_data_end
read_data_end:
	GUEST_DONE
