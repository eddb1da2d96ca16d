/* On-demand guest accesses for the memory-attribute tests. The host points RIP at an entry and
 * sets RBX (address) and RAX (value to write); each entry does one access and reports
 * SYNC(kind, rax): 1 read, 2 write, 3 execute (a call into the page, which holds a `ret`), 4 a locked
 * read-modify-write (xchg with memory is implicitly locked: the CPU checks it as a write). ENTRY_end
 * labels give each access instruction's length (the insn_len an Intel CPU reports, catalog 63). */
.include "common.inc"

_start:
	GUEST_DONE

.globl mem_read
mem_read:
	movq (%rbx), %rax
.globl mem_read_end
mem_read_end:
	GUEST_SYNC 1
	GUEST_DONE

.globl mem_write
mem_write:
	movq %rax, (%rbx)
.globl mem_write_end
mem_write_end:
	GUEST_SYNC 2
	GUEST_DONE

.globl mem_exec
mem_exec:
	call *%rbx
.globl mem_exec_end
mem_exec_end:
	GUEST_SYNC 3
	GUEST_DONE

.globl mem_rmw
mem_rmw:
	xchgq %rax, (%rbx)
.globl mem_rmw_end
mem_rmw_end:
	GUEST_SYNC 4
	GUEST_DONE
