/* The C side of `kvmtests bench`: the same ioctl sequences as the Python layers, timed the same way.
 * usage: ops OP ITERATIONS GUEST_IMAGE; prints nanoseconds per operation. KVM fds cannot be shared
 * across processes, so the guest comes as an image the Python side wrote: memory size (u64), kvm_regs,
 * kvm_sregs, the CPUID entry count (u32) and entries, then guest memory loaded at GPA 0. */
#include <fcntl.h>
#include <linux/kvm.h>
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

/* Build the same VM as the Python side: one memslot at GPA 0, one vCPU with its CPUID and registers. */
static void load_guest(int kvm, const char *image, int *vm, int *vcpu)
{
	FILE *f = fopen(image, "rb");
	unsigned long long size;
	unsigned int nent;
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	if (!f)
		die(image);
	read_all(f, &size, 8);
	read_all(f, &regs, sizeof(regs));
	read_all(f, &sregs, sizeof(sregs));
	read_all(f, &nent, 4);
	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
	cpuid->nent = nent;
	read_all(f, cpuid->entries, nent * sizeof(struct kvm_cpuid_entry2));
	void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	read_all(f, mem, size);
	fclose(f);
	*vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (*vm < 0 || ioctl(*vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0)
		die("KVM_CREATE_VM");
	struct kvm_userspace_memory_region r = { .slot = 0, .memory_size = size, .userspace_addr = (unsigned long)mem };
	if (ioctl(*vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	*vcpu = ioctl(*vm, KVM_CREATE_VCPU, 0);
	if (*vcpu < 0 || ioctl(*vcpu, KVM_SET_CPUID2, cpuid) < 0 || ioctl(*vcpu, KVM_SET_SREGS, &sregs) < 0 ||
	    ioctl(*vcpu, KVM_SET_REGS, &regs) < 0)
		die("vCPU setup");
	free(cpuid);
}

int main(int argc, char **argv)
{
	if (argc < 4)
		return 2;
	const char *op = argv[1];
	long n = atol(argv[2]);
	int vm, vcpu;
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	alarm(120); /* a hung KVM_RUN ends the process instead of the benchmark */
	load_guest(kvm, argv[3], &vm, &vcpu);
	double t0 = now_ns();
	if (!strcmp(op, "vm")) {
		for (long i = 0; i < n; i++) {
			int fd = ioctl(kvm, KVM_CREATE_VM, 0);
			if (fd < 0)
				die("KVM_CREATE_VM");
			close(fd);
		}
	} else if (!strcmp(op, "vcpu")) {
		long size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
		int fd = ioctl(kvm, KVM_CREATE_VM, 0);
		t0 = now_ns();
		for (long i = 0; i < n; i++) {
			int v = ioctl(fd, KVM_CREATE_VCPU, i);
			if (v < 0)
				die("KVM_CREATE_VCPU");
			void *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, v, 0);
			if (run == MAP_FAILED)
				die("mmap");
			munmap(run, size);
			close(v);
		}
		double t = now_ns() - t0;
		close(fd);
		printf("%.1f\n", t / n);
		return 0;
	} else if (!strcmp(op, "memslot")) {
		void *mem = mmap(NULL, 2 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		struct kvm_userspace_memory_region r = { .slot = 1, .guest_phys_addr = 1ULL << 30,
							 .userspace_addr = (unsigned long)mem };
		for (long i = 0; i < n; i++) {
			r.memory_size = 2 << 20;
			if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
				die("add slot");
			r.memory_size = 0;
			if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
				die("remove slot");
		}
	} else if (!strcmp(op, "run")) {
		long size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
		struct kvm_run *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
		if (run == MAP_FAILED)
			die("mmap");
		t0 = now_ns();
		for (long i = 0; i < n; i++)
			if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_IO)
				die("KVM_RUN");
		double t = now_ns() - t0;
		printf("%.1f\n", t / n);
		return 0;
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
		return 2;
	}
	printf("%.1f\n", (now_ns() - t0) / n);
	return 0;
}
