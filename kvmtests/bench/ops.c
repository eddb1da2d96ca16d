/* The C side of `kvmtests bench`: the same ioctl sequences as the Python layers, timed the same way.
 * usage: ops serve GUEST_IMAGE, then one "OP N" line per batch on stdin, one answer line each (ns per
 * operation; median and p99 for pio), so that C batches interleave with the Python side's in one VM that
 * stays warm, as the Python side's does; or ops vtl_call|protect N GUEST_IMAGE, once. KVM fds cannot be
 * shared across processes, so the guest comes as an image the Python side wrote: memory size (u64),
 * kvm_regs, kvm_sregs, the CPUID entry count (u32) and entries, then guest memory loaded at GPA 0. */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef KVM_SET_MEMORY_ATTRIBUTES
struct kvm_memory_attributes { __u64 address, size, attributes, flags; };
#define KVM_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)
#endif

#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
#define MP_STATE_HV_INACTIVE_VTL 11 /* the series' KVM_MP_STATE_HV_INACTIVE_VTL */

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void read_all(FILE *f, void *buf, size_t len)
{
	if (fread(buf, 1, len, f) != len)
		die("guest image");
}

/* Create vCPU 0 with the registers and CPUID the Python side wrote next in the image. */
static int create_vcpu_from(FILE *f, int vm)
{
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	unsigned int nent;
	read_all(f, &regs, sizeof(regs));
	read_all(f, &sregs, sizeof(sregs));
	read_all(f, &nent, 4);
	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
	cpuid->nent = nent;
	read_all(f, cpuid->entries, nent * sizeof(struct kvm_cpuid_entry2));
	int fd = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (fd < 0 || ioctl(fd, KVM_SET_CPUID2, cpuid) < 0 || ioctl(fd, KVM_SET_SREGS, &sregs) < 0 ||
	    ioctl(fd, KVM_SET_REGS, &regs) < 0)
		die("vCPU setup");
	free(cpuid);
	return fd;
}

/* Build the same VM as the Python side: one memslot at GPA 0, one vCPU with its CPUID and registers. */
static void load_guest(int kvm, const char *image, int *vm, int *vcpu)
{
	FILE *f = fopen(image, "rb");
	unsigned long long size;
	if (!f)
		die(image);
	read_all(f, &size, 8);
	void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	*vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (*vm < 0 || ioctl(*vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0)
		die("KVM_CREATE_VM");
	struct kvm_userspace_memory_region r = { .slot = 0, .memory_size = size, .userspace_addr = (unsigned long)mem };
	if (ioctl(*vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	*vcpu = create_vcpu_from(f, *vm);
	read_all(f, mem, size);
	fclose(f);
}

/* ---- VTL switches: the sequence of kvmtests/machine/vsm.py (one VM per VTL over one memory, VTL1's vCPU on
 * its own thread waiting in state 11, switches in userspace), for `ops vtl_call|protect N IMAGE`; the image holds
 * the memory size, then regs, sregs and CPUID of VTL0's and of VTL1's vCPU, then the shared memory. */
#define CONTROL 0x200000ULL /* vsm.py CONTROL and its fields */
#define ENTRY_REASON (CONTROL + 0x00)
#define RET_RAX (CONTROL + 0x08)
#define RET_RCX (CONTROL + 0x10)
#define MSG_TYPE (CONTROL + 0x20)
#define MSG_GPA (CONTROL + 0x28)
#define MSG_ACCESS (CONTROL + 0x30)
#define GUEST_OS_ID_LINUX (0x8100000000000000ULL | (6 << 16))

struct vcpu {
	int fd;
	struct kvm_run *run;
	pthread_t thread;
};
static int vsm_vm[2];
static struct vcpu vsm_cpu[2];
static unsigned char *vsm_mem;
static struct kvm_regs vsm_shared;
static sem_t vsm_waited, vsm_go, vsm_back;

static void on_kick(int sig)
{
	(void)sig;
}

static void kick(struct vcpu *v)
{
	v->run->immediate_exit = 1;
	pthread_kill(v->thread, SIGUSR1);
}

static void sem_take(sem_t *s)
{
	while (sem_wait(s) < 0)
		if (errno != EINTR)
			die("sem_wait");
}

static void set_mp(struct vcpu *v, unsigned int state)
{
	struct kvm_mp_state mp = { .mp_state = state };
	if (ioctl(v->fd, KVM_SET_MP_STATE, &mp) < 0)
		die("KVM_SET_MP_STATE");
}

static void complete_now(struct vcpu *v)
{
	v->run->immediate_exit = 1;
	if (ioctl(v->fd, KVM_RUN, 0) == 0 || errno != EINTR)
		die("completing a hypercall with immediate_exit");
	v->run->immediate_exit = 0;
}

/* VtlCall/VtlReturn return no status: a status left in hcall.result must not reach RAX (vsm.py, catalog 85). */
static void complete_vtl_switch(struct vcpu *v)
{
	struct kvm_regs before, after;
	if (ioctl(v->fd, KVM_GET_REGS, &before) < 0)
		die("KVM_GET_REGS");
	v->run->hyperv.u.hcall.result = 5;
	complete_now(v);
	if (ioctl(v->fd, KVM_GET_REGS, &after) < 0 || after.rax != before.rax)
		die("completing a VTL switch wrote RAX");
}

static void copy_shared(struct kvm_regs *to, const struct kvm_regs *from)
{
	to->rax = from->rax; to->rbx = from->rbx; to->rcx = from->rcx; to->rdx = from->rdx;
	to->rsi = from->rsi; to->rdi = from->rdi; to->rbp = from->rbp; to->r8 = from->r8;
	to->r9 = from->r9; to->r10 = from->r10; to->r11 = from->r11; to->r12 = from->r12;
	to->r13 = from->r13; to->r14 = from->r14; to->r15 = from->r15;
}

static uint64_t mem64(uint64_t gpa)
{
	uint64_t v;
	memcpy(&v, vsm_mem + gpa, 8);
	return v;
}

/* HvModifyVtlProtectionMask from VTL1: map flags R/W/X -> NR/NW/NX on VTL0's VM, one page per rep. */
static uint64_t modify_protection(uint64_t in, uint64_t reps)
{
	uint32_t flags;
	memcpy(&flags, vsm_mem + in + 8, 4);
	uint64_t attrs = (flags & 1 ? 0 : 1) | (flags & 2 ? 0 : 2) | (flags & 4 ? 0 : 4);
	for (uint64_t i = 0; i < reps; i++) {
		struct kvm_memory_attributes a = { .address = mem64(in + 16 + 8 * i) << 12, .size = 4096,
						   .attributes = attrs };
		if (ioctl(vsm_vm[0], KVM_SET_MEMORY_ATTRIBUTES, &a) < 0)
			die("KVM_SET_MEMORY_ATTRIBUTES");
	}
	return reps << 32;
}

/* VTL1's thread: wait in state 11 until kicked, then run until HvCallVtlReturn serving its hypercalls. */
static void *vtl1_thread(void *arg)
{
	struct vcpu *v = &vsm_cpu[1];
	struct kvm_regs regs;
	(void)arg;
	for (;;) {
		if (ioctl(v->fd, KVM_RUN, 0) == 0 || errno != EINTR)
			die("VTL1 wait in state 11");
		v->run->immediate_exit = 0;
		sem_post(&vsm_waited);
		sem_take(&vsm_go);
		set_mp(v, KVM_MP_STATE_RUNNABLE);
		if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
			die("KVM_GET_REGS");
		copy_shared(&regs, &vsm_shared);
		if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
			die("KVM_SET_REGS");
		for (;;) {
			if (ioctl(v->fd, KVM_RUN, 0) < 0) {
				if (errno == EINTR) {
					v->run->immediate_exit = 0;
					continue;
				}
				die("VTL1 KVM_RUN");
			}
			if (v->run->exit_reason != KVM_EXIT_HYPERV || v->run->hyperv.type != KVM_EXIT_HYPERV_HCALL)
				die("VTL1: not a hypercall exit");
			uint64_t input = v->run->hyperv.u.hcall.input;
			if ((input & 0xffff) == 0x12)
				break;
			if ((input & 0xffff) != 0x0c)
				die("VTL1: not a hypercall the sequence serves");
			v->run->hyperv.u.hcall.result = modify_protection(v->run->hyperv.u.hcall.params[0],
									  (input >> 32) & 0xfff);
		}
		complete_vtl_switch(v);
		if (ioctl(v->fd, KVM_GET_REGS, &vsm_shared) < 0)
			die("KVM_GET_REGS");
		set_mp(v, MP_STATE_HV_INACTIVE_VTL);
		sem_post(&vsm_back);
	}
	return NULL;
}

/* Park VTL0, enter VTL1 with the shared registers, take them back (RAX/RCX from the control page). */
static void switch_to_vtl1(uint32_t reason)
{
	struct vcpu *v = &vsm_cpu[0];
	struct kvm_regs regs;
	if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
		die("KVM_GET_REGS");
	set_mp(v, MP_STATE_HV_INACTIVE_VTL);
	kick(&vsm_cpu[1]);
	sem_take(&vsm_waited);
	memcpy(vsm_mem + ENTRY_REASON, &reason, 4);
	vsm_shared = regs;
	sem_post(&vsm_go);
	sem_take(&vsm_back);
	if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
		die("KVM_GET_REGS");
	copy_shared(&regs, &vsm_shared);
	regs.rax = mem64(RET_RAX);
	regs.rcx = mem64(RET_RCX);
	if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
	set_mp(v, KVM_MP_STATE_RUNNABLE);
}

/* One KVM_RUN of VTL0 and the switch it asks for: a VtlCall, or a denied access turned into an intercept. */
static void vtl0_step(void)
{
	struct vcpu *v = &vsm_cpu[0];
	struct kvm_run *run = v->run;
	int r = ioctl(v->fd, KVM_RUN, 0);
	if (r == 0 && run->exit_reason == KVM_EXIT_HYPERV && run->hyperv.type == KVM_EXIT_HYPERV_HCALL &&
	    (run->hyperv.u.hcall.input & 0xffff) == 0x11) {
		complete_vtl_switch(v);
		switch_to_vtl1(1);
	} else if (r < 0 && errno == EFAULT && run->exit_reason == KVM_EXIT_MEMORY_FAULT) {
		uint64_t flags, gpa, msg[3];
		memcpy(&flags, (char *)run + 32, 8);
		memcpy(&gpa, (char *)run + 40, 8);
		msg[0] = 0x80000001; /* HvMessageTypeGpaIntercept */
		msg[1] = gpa;
		msg[2] = flags & 2 ? 1 : flags & 4 ? 2 : 0;
		memcpy(vsm_mem + MSG_TYPE, msg, sizeof(msg));
		switch_to_vtl1(2);
	} else {
		die("VTL0: neither a VtlCall nor a memory-fault exit");
	}
}

static void load_vcpu(FILE *f, int vm, struct vcpu *v, long size)
{
	struct {
		struct kvm_msrs hdr;
		struct kvm_msr_entry e;
	} msr = { .hdr.nmsrs = 1, .e = { .index = 0x40000000, .data = GUEST_OS_ID_LINUX } };
	v->fd = create_vcpu_from(f, vm);
	if (ioctl(v->fd, KVM_SET_MSRS, &msr) != 1)
		die("VSM vCPU setup");
	v->run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (v->run == MAP_FAILED)
		die("mmap");
}

static int by_value(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static void print_median_p99(double *t, long n)
{
	qsort(t, n, sizeof(*t), by_value);
	printf("%.1f %.1f\n", t[n / 2], t[(n * 99) / 100 < n ? (n * 99) / 100 : n - 1]);
}

/* VTL call/return round trips (1 step each) or protected-page round trips (2 steps): median and p99 in ns. */
static int vsm_op(int kvm, const char *op, long n, const char *image)
{
	FILE *f = fopen(image, "rb");
	unsigned long long size;
	long mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct sigaction sa = { .sa_handler = on_kick };
	if (!f)
		die(image);
	sigaction(SIGUSR1, &sa, NULL);
	read_all(f, &size, 8);
	vsm_mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	for (int i = 0; i < 2; i++) {
		vsm_vm[i] = ioctl(kvm, KVM_CREATE_VM, 0);
		struct kvm_userspace_memory_region r = { .slot = 0, .memory_size = size,
							 .userspace_addr = (unsigned long)vsm_mem };
		if (vsm_vm[i] < 0 || ioctl(vsm_vm[i], KVM_CREATE_IRQCHIP, 0) < 0 ||
		    ioctl(vsm_vm[i], KVM_SET_TSS_ADDR, 0xfffbd000) < 0 ||
		    ioctl(vsm_vm[i], KVM_SET_USER_MEMORY_REGION, &r) < 0)
			die("VSM VM setup");
		load_vcpu(f, vsm_vm[i], &vsm_cpu[i], mmap_size);
	}
	read_all(f, vsm_mem, size);
	fclose(f);
	sem_init(&vsm_waited, 0, 0);
	sem_init(&vsm_go, 0, 0);
	sem_init(&vsm_back, 0, 0);
	vsm_cpu[0].thread = pthread_self();
	set_mp(&vsm_cpu[1], MP_STATE_HV_INACTIVE_VTL);
	if (pthread_create(&vsm_cpu[1].thread, NULL, vtl1_thread, NULL))
		die("pthread_create");
	int steps = !strcmp(op, "protect") ? 2 : 1;
	double *t = calloc(n, sizeof(*t));
	for (long i = 0; i < n / 10 + 1; i++) /* warm-up, as the Python side */
		for (int s = 0; s < steps; s++)
			vtl0_step();
	for (long i = 0; i < n; i++) {
		double t0 = now_ns();
		for (int s = 0; s < steps; s++)
			vtl0_step();
		t[i] = now_ns() - t0;
	}
	print_median_p99(t, n);
	return 0; /* the VTL1 thread ends with the process */
}

/* Plain port-I/O exits, timed one by one like the VTL switches: median and p99 in ns. */
static void pio_op(int vcpu, struct kvm_run *run, long n)
{
	double *t = calloc(n, sizeof(*t));
	for (long i = 0; i < n / 10 + 1; i++) /* warm-up, as the Python side */
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			die("KVM_RUN");
	for (long i = 0; i < n; i++) {
		double t0 = now_ns();
		if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_IO)
			die("KVM_RUN");
		t[i] = now_ns() - t0;
	}
	print_median_p99(t, n);
	free(t);
}

/* The memslot batch's slot, as bench/__init__.py MEMSLOT: slot 1 at 1 GiB, 2 MiB of its own untouched mapping. */
#define SLOT_ID 1
#define SLOT_GPA (1ULL << 30)
#define SLOT_SIZE (2ULL << 20)

/* One batch of n operations in the served VM: ns per operation. */
static double batch(const char *op, long n, int kvm, int vm, int vcpu, struct kvm_run *run, void *slot_mem)
{
	double t0 = now_ns();
	if (!strcmp(op, "vm")) {
		for (long i = 0; i < n; i++) {
			int fd = ioctl(kvm, KVM_CREATE_VM, 0);
			if (fd < 0)
				die("KVM_CREATE_VM");
			close(fd);
		}
	} else if (!strcmp(op, "vcpu")) { /* fresh ids need a fresh VM, made and closed outside the timing */
		long size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
		int fd = ioctl(kvm, KVM_CREATE_VM, 0);
		if (fd < 0)
			die("KVM_CREATE_VM");
		t0 = now_ns();
		for (long i = 0; i < n; i++) {
			int v = ioctl(fd, KVM_CREATE_VCPU, i);
			if (v < 0)
				die("KVM_CREATE_VCPU");
			void *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, v, 0);
			if (map == MAP_FAILED)
				die("mmap");
			munmap(map, size);
			close(v);
		}
		double t = now_ns() - t0;
		close(fd);
		return t / n;
	} else if (!strcmp(op, "memslot")) {
		struct kvm_userspace_memory_region r = { .slot = SLOT_ID, .guest_phys_addr = SLOT_GPA,
							 .userspace_addr = (unsigned long)slot_mem };
		for (long i = 0; i < n; i++) {
			r.memory_size = SLOT_SIZE;
			if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
				die("add slot");
			r.memory_size = 0;
			if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
				die("remove slot");
		}
	} else if (!strcmp(op, "run")) {
		for (long i = 0; i < n; i++)
			if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_IO)
				die("KVM_RUN");
	} else if (!strcmp(op, "regs")) {
		struct kvm_regs regs;
		for (long i = 0; i < n; i++)
			if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0 || ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
				die("KVM_GET/SET_REGS");
	} else if (!strcmp(op, "attrs")) {
		struct kvm_memory_attributes a = { .address = 0x200000, .size = 0x1000 };
		for (long i = 0; i < n; i++)
			if (ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, &a) < 0)
				die("KVM_SET_MEMORY_ATTRIBUTES");
	} else {
		fprintf(stderr, "unknown operation %s\n", op);
		exit(2);
	}
	return (now_ns() - t0) / n;
}

/* Answer "OP N" lines until stdin closes; each batch is bounded by its own alarm. */
static int serve(int kvm, const char *image)
{
	int vm, vcpu;
	char op[16];
	long n;
	load_guest(kvm, image, &vm, &vcpu);
	long size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	void *slot_mem = mmap(NULL, SLOT_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
			      -1, 0);
	if (run == MAP_FAILED || slot_mem == MAP_FAILED)
		die("mmap");
	while (scanf("%15s %ld", op, &n) == 2 && n > 0) {
		alarm(120); /* a hung KVM_RUN ends the process instead of the benchmark */
		if (!strcmp(op, "pio"))
			pio_op(vcpu, run, n);
		else
			printf("%.1f\n", batch(op, n, kvm, vm, vcpu, run, slot_mem));
		alarm(0);
		fflush(stdout);
	}
	return 0;
}

int main(int argc, char **argv)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	if (argc == 3 && !strcmp(argv[1], "serve"))
		return serve(kvm, argv[2]);
	if (argc != 4 || (strcmp(argv[1], "vtl_call") && strcmp(argv[1], "protect")))
		return 2;
	alarm(120);
	return vsm_op(kvm, argv[1], atol(argv[2]), argv[3]);
}
