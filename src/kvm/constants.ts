/** KVM ioctl numbers, capabilities and exit reasons (linux/kvm.h, x86_64). */
const KVMIO = 0xae;
const io = (nr: number) => (KVMIO << 8) | nr;
const ioc = (dir: number, nr: number, size: number) =>
  ((dir << 30) | (size << 16) | (KVMIO << 8) | nr) >>> 0;
const iow = (nr: number, size: number) => ioc(1, nr, size);
const ior = (nr: number, size: number) => ioc(2, nr, size);
const iowr = (nr: number, size: number) => ioc(3, nr, size);

export const KVM_API_VERSION = 12;

export const KVM_GET_API_VERSION = io(0x00);
export const KVM_CREATE_VM = io(0x01);
export const KVM_GET_MSR_INDEX_LIST = iowr(0x02, 4);
export const KVM_CHECK_EXTENSION = io(0x03);
export const KVM_GET_VCPU_MMAP_SIZE = io(0x04);
export const KVM_GET_SUPPORTED_CPUID = iowr(0x05, 8);
export const KVM_CREATE_VCPU = io(0x41);
export const KVM_SET_USER_MEMORY_REGION = iow(0x46, 32);
/** struct kvm_dirty_log: slot u32, pad u32, then a u64 user address of the bitmap. */
export const KVM_GET_DIRTY_LOG = iow(0x42, 16);
export const KVM_SET_TSS_ADDR = io(0x47);
export const KVM_SET_IDENTITY_MAP_ADDR = iow(0x48, 8);
export const KVM_CREATE_IRQCHIP = io(0x60);
export const KVM_IRQ_LINE = iow(0x61, 8);
// KVM_SET_IRQCHIP really is _IOR in linux/kvm.h (a historical mistake kept for the ABI).
export const KVM_GET_IRQCHIP = iowr(0x62, 520);
export const KVM_SET_IRQCHIP = ior(0x63, 520);
export const KVM_IRQFD = iow(0x76, 32);
export const KVM_CREATE_PIT2 = iow(0x77, 64);
export const KVM_IOEVENTFD = iow(0x79, 64);
export const KVM_SET_CLOCK = iow(0x7b, 48);
export const KVM_GET_CLOCK = ior(0x7c, 48);
export const KVM_RUN = io(0x80);
export const KVM_GET_REGS = ior(0x81, 144);
export const KVM_SET_REGS = iow(0x82, 144);
export const KVM_GET_SREGS = ior(0x83, 312);
export const KVM_SET_SREGS = iow(0x84, 312);
export const KVM_GET_MSRS = iowr(0x88, 8);
export const KVM_SET_MSRS = iow(0x89, 8);
export const KVM_GET_FPU = ior(0x8c, 416);
export const KVM_SET_FPU = iow(0x8d, 416);
export const KVM_GET_LAPIC = ior(0x8e, 1024);
export const KVM_SET_LAPIC = iow(0x8f, 1024);
export const KVM_SET_CPUID2 = iow(0x90, 8);
export const KVM_GET_CPUID2 = iowr(0x91, 8);
export const KVM_GET_MP_STATE = ior(0x98, 4);
export const KVM_SET_MP_STATE = iow(0x99, 4);
// 0x9f/0xa0 are KVM_GET/SET_PIT2 on a VM fd and KVM_GET/SET_VCPU_EVENTS on a vCPU fd; the
// struct sizes (112 and 64) keep the request numbers distinct anyway.
export const KVM_GET_PIT2 = ior(0x9f, 112);
export const KVM_SET_PIT2 = iow(0xa0, 112);
export const KVM_GET_VCPU_EVENTS = ior(0x9f, 64);
export const KVM_SET_VCPU_EVENTS = iow(0xa0, 64);
export const KVM_GET_DEBUGREGS = ior(0xa1, 128);
export const KVM_SET_DEBUGREGS = iow(0xa2, 128);
export const KVM_SET_TSC_KHZ = io(0xa2);
export const KVM_GET_TSC_KHZ = io(0xa3);
export const KVM_GET_XSAVE = ior(0xa4, 4096);
export const KVM_SET_XSAVE = iow(0xa5, 4096);
export const KVM_GET_XCRS = ior(0xa6, 392);
export const KVM_SET_XCRS = iow(0xa7, 392);
/** Same size field as KVM_GET_XSAVE; the kernel writes KVM_CAP_XSAVE2's size (>= 4096). */
export const KVM_GET_XSAVE2 = ior(0xcf, 4096);
/** Tells KVM the guest was paused (the guest's soft-lockup watchdog then does not fire). */
export const KVM_KVMCLOCK_CTRL = io(0xad);

/** kvm_userspace_memory_region.flags: keep a dirty-page bitmap for the slot. */
export const KVM_MEM_LOG_DIRTY_PAGES = 1;

export const KVM_CAP_IRQCHIP = 0;
export const KVM_CAP_HLT = 1;
export const KVM_CAP_USER_MEMORY = 3;
export const KVM_CAP_SET_TSS_ADDR = 4;
export const KVM_CAP_EXT_CPUID = 7;
export const KVM_CAP_MP_STATE = 14;
export const KVM_CAP_IRQ_ROUTING = 25;
export const KVM_CAP_IRQFD = 32;
export const KVM_CAP_PIT2 = 33;
export const KVM_CAP_PIT_STATE2 = 35;
export const KVM_CAP_IOEVENTFD = 36;
export const KVM_CAP_SET_IDENTITY_MAP_ADDR = 37;
export const KVM_CAP_ADJUST_CLOCK = 39;
export const KVM_CAP_VCPU_EVENTS = 41;
export const KVM_CAP_DEBUGREGS = 50;
export const KVM_CAP_XSAVE = 55;
export const KVM_CAP_XCRS = 56;
export const KVM_CAP_TSC_CONTROL = 60;
export const KVM_CAP_READONLY_MEM = 81;
export const KVM_CAP_GET_TSC_KHZ = 61;
export const KVM_CAP_XSAVE2 = 208;
export const KVM_CAP_IMMEDIATE_EXIT = 136;

export const KVM_EXIT_UNKNOWN = 0;
export const KVM_EXIT_EXCEPTION = 1;
export const KVM_EXIT_IO = 2;
export const KVM_EXIT_HYPERCALL = 3;
export const KVM_EXIT_DEBUG = 4;
export const KVM_EXIT_HLT = 5;
export const KVM_EXIT_MMIO = 6;
export const KVM_EXIT_IRQ_WINDOW_OPEN = 7;
export const KVM_EXIT_SHUTDOWN = 8;
export const KVM_EXIT_FAIL_ENTRY = 9;
export const KVM_EXIT_INTR = 10;
export const KVM_EXIT_INTERNAL_ERROR = 17;
export const KVM_EXIT_SYSTEM_EVENT = 24;

export const KVM_SYSTEM_EVENT_SHUTDOWN = 1;
export const KVM_SYSTEM_EVENT_RESET = 2;
export const KVM_SYSTEM_EVENT_CRASH = 3;

export const KVM_EXIT_IO_IN = 0;
export const KVM_EXIT_IO_OUT = 1;

export const KVM_IOEVENTFD_FLAG_DATAMATCH = 1;
export const KVM_IOEVENTFD_FLAG_PIO = 2;
export const KVM_IOEVENTFD_FLAG_DEASSIGN = 4;
export const KVM_IRQFD_FLAG_DEASSIGN = 1;
export const KVM_PIT_SPEAKER_DUMMY = 1;

/** chip_id of struct kvm_irqchip. */
export const KVM_IRQCHIP_PIC_MASTER = 0;
export const KVM_IRQCHIP_PIC_SLAVE = 1;
export const KVM_IRQCHIP_IOAPIC = 2;

/** struct kvm_mp_state values (x86 uses these). */
export const KVM_MP_STATE_RUNNABLE = 0;
export const KVM_MP_STATE_UNINITIALIZED = 1;
export const KVM_MP_STATE_INIT_RECEIVED = 2;
export const KVM_MP_STATE_HALTED = 3;
export const KVM_MP_STATE_SIPI_RECEIVED = 4;

/** struct kvm_clock_data flags. */
export const KVM_CLOCK_TSC_STABLE = 2;
export const KVM_CLOCK_REALTIME = 1 << 2;
export const KVM_CLOCK_HOST_TSC = 1 << 3;

/** KVM refuses KVM_GET/SET_MSRS with this many entries or more (MAX_IO_MSRS in x86.c). */
export const KVM_MAX_IO_MSRS = 256;

/** Names for exit reasons in messages and metrics. */
export const EXIT_REASON_NAMES: Record<number, string> = {
  0: 'unknown',
  1: 'exception',
  2: 'io',
  3: 'hypercall',
  4: 'debug',
  5: 'hlt',
  6: 'mmio',
  7: 'irq_window_open',
  8: 'shutdown',
  9: 'fail_entry',
  10: 'intr',
  17: 'internal_error',
  24: 'system_event',
};
