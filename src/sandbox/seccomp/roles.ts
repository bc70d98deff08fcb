/**
 * The default allow-lists, one per thread role (docs/security.md). Measured under the host-KVM
 * suite with the filters in audit mode (TYPERVISOR_SECCOMP_AUDIT, see install.ts) and `strace -f`.
 *
 * - vcpu: a vCPU worker after its start-up (modules loaded, RAM and kvm_run mapped): KVM_RUN and
 *   the other KVM ioctls, the eventfd writes of virtio notifications, Atomics (futex), and what
 *   a Node worker's V8 heap and libuv loop need.
 * - device: the device worker after its devices are built: file and TAP I/O, vsock's Unix
 *   sockets (AF_UNIX only), epoll, eventfd, TAP/userfaultfd ioctls, two KVM ioctls
 *   (KVM_SET_USER_MEMORY_REGION for virtio-mem, KVM_IRQ_LINE for interrupts), and io_uring_enter
 *   (the Async block engine; its rings are set up before, under the process filter).
 * - main: the main thread (API server, console, building VMs, snapshots) and Node's own threads.
 *   It is installed with TSYNC, so it also covers the threads Node started before (V8 platform
 *   workers, the libuv pool), and every worker inherits it: processFilter() is main's own list
 *   joined with the two worker lists, so that each worker's own filter, stacked on it, is what
 *   decides in that worker.
 */
import { KVM_IRQ_LINE, KVM_SET_USER_MEMORY_REGION } from '../../kvm/constants.js';
import { VHOST, VHOST_VIRTIO } from '../../util/vhost-abi.js';

import type { ArgCondition, Policy, SyscallRule } from './filter.js';

export type Role = 'main' | 'vcpu' | 'device';
export const ROLES: readonly Role[] = ['main', 'vcpu', 'device'];

const KVMIO = 0xae;
const TUN_AND_TTY = 0x54; // 'T': TUNSET*, TCGETS/TCSETS, TIOCGWINSZ, FIONBIO, FIOCLEX
const UFFDIO = 0xaa;
const AF_UNIX = 1;
const O_PATH = 0o10000000;
const CLONE_THREAD = 0x10000;
const ENOSYS = 38;
const EACCES = 13;

/** The vhost requests the device worker makes (vsock/vhost.ts VhostVsockDevice). */
const VHOST_DEVICE_REQUESTS = (
  [
    'SET_FEATURES',
    'SET_MEM_TABLE',
    'SET_VRING_NUM',
    'SET_VRING_BASE',
    'GET_VRING_BASE',
    'SET_VRING_ADDR',
    'SET_VRING_KICK',
    'SET_VRING_CALL',
    'SET_VRING_ERR',
    'VSOCK_SET_RUNNING',
  ] as const
).map((name) => [name, VHOST[name]] as const);

const any = (...names: string[]): SyscallRule[] => names.map((syscall) => ({ syscall }));

/** ioctl(fd, request) with exactly this request. */
const ioctlRequest = (request: number, comment: string): SyscallRule => ({
  syscall: 'ioctl',
  args: [{ index: 1, type: 'qword', op: 'eq', val: BigInt(request), comment }],
});

/** ioctl(fd, request) with request's type byte (bits 8-15) == `type`, and nothing above 32 bits. */
const ioctlOfType = (type: number, comment: string): SyscallRule => ({
  syscall: 'ioctl',
  args: [
    {
      index: 1,
      type: 'qword',
      op: 'masked_eq',
      mask: 0xffffffff0000ff00n,
      val: BigInt(type << 8),
      comment,
    },
  ],
});

const arg = (index: number, val: number, comment: string): ArgCondition => ({
  index,
  type: 'dword',
  op: 'eq',
  val: BigInt(val),
  comment,
});

/** glibc's pthread_create tries clone3 first and falls back to clone on ENOSYS: clone3's flags
 * live in memory a filter cannot read, so it gets ENOSYS and clone is checked instead. */
const CLONE3_ENOSYS: SyscallRule = { syscall: 'clone3', action: { kind: 'errno', errno: ENOSYS } };
/**
 * glibc's malloc, on a thread whose arena is not the main one, opens
 * /proc/sys/vm/overcommit_memory the first time it would shrink that arena's heap (arena.c,
 * check_may_shrink_heap); when the open fails it keeps the heap and goes on. So a worker's own
 * filter answers an open it does not allow with EACCES rather than killing the process. Found in
 * the lab: the device worker was killed (SIGSYS) under a host -> guest stream, and the core's
 * backtrace stopped in open64_nocancel("/proc/sys/vm/overcommit_memory"). Only in the workers'
 * lists: main's list allows openat, and processPolicy leaves this rule out.
 */
const OPEN_REFUSED: SyscallRule = { syscall: 'openat', action: { kind: 'errno', errno: EACCES } };

const CLONE_THREAD_ONLY: SyscallRule = {
  syscall: 'clone',
  args: [
    {
      index: 0,
      type: 'dword',
      op: 'masked_eq',
      mask: BigInt(CLONE_THREAD),
      val: BigInt(CLONE_THREAD),
      comment: 'threads only, no new processes',
    },
  ],
};

/** What any Node thread running JavaScript needs once started (V8 heap, libuv loop, Atomics). */
const NODE_THREAD = any(
  'futex',
  'read',
  'write',
  'epoll_wait',
  'epoll_pwait',
  'epoll_ctl',
  'mmap',
  'munmap',
  'mprotect',
  'madvise',
  // glibc's malloc on any thread: once a process has more threads than malloc arenas (8 per
  // CPU), a thread shares the main arena, which grows with brk; realloc of a large (mmapped)
  // block is mremap. A library test with six VMs at once had a closer thread killed on brk.
  'brk',
  'mremap',
  'close',
  'rt_sigreturn',
  'rt_sigprocmask',
  'sched_yield',
  'getpid',
  'gettid',
  // The vDSO answers these without a syscall only while the clocksource allows it (tsc,
  // kvm-clock); under others (the lab's emulated machine: hpet, acpi_pm) they are real
  // syscalls: gettimeofday was the first call seen there, killing every boot.
  'clock_gettime',
  'clock_getres',
  'gettimeofday',
  'time',
  'clock_nanosleep',
  'nanosleep',
  'getrandom',
  'exit',
  'sigaltstack',
  'set_robust_list',
  'rseq',
  'sched_getaffinity',
  'fstat',
  'newfstatat',
);

const VCPU: Policy = {
  rules: [
    ioctlOfType(KVMIO, 'KVM_RUN and the other KVM ioctls'),
    ...NODE_THREAD,
    // The serial console's output is written from the vCPU thread: writev to a file or FIFO,
    // sendmsg(MSG_DONTWAIT) to a socket (src/vmm/console-output.ts).
    ...any('writev', 'sendmsg'),
    OPEN_REFUSED,
  ],
};

const DEVICE: Policy = {
  rules: [
    ...any('epoll_wait', 'epoll_pwait', 'read', 'write', 'readv', 'writev', 'preadv', 'pwritev'),
    ...any('pread64', 'pwrite64', 'fsync', 'fdatasync', 'lseek', 'fallocate'),
    ...NODE_THREAD,
    ioctlOfType(TUN_AND_TTY, 'TAP offloads'),
    ioctlOfType(UFFDIO, 'userfaultfd'),
    { syscall: 'socket', args: [arg(0, AF_UNIX, 'vsock backends: Unix sockets only')] },
    ...any('connect', 'accept4', 'shutdown', 'sendmsg', 'recvmsg', 'getsockopt'),
    ...any('eventfd2', 'epoll_create1'),
    // A guest's vsock connection to <uds>_<port>: the socket's inode is pinned with
    // open(O_PATH | O_NOFOLLOW) and checked (statx, access of /proc/self/fd/N) before connect
    // (unix-host.ts connectNoFollow). Only O_PATH opens: no file can be read or written this way.
    {
      syscall: 'openat',
      args: [
        {
          index: 2,
          type: 'dword',
          op: 'masked_eq',
          mask: BigInt(O_PATH),
          val: BigInt(O_PATH),
          comment: 'O_PATH only',
        },
      ],
    },
    OPEN_REFUSED, // any other open: EACCES (glibc's malloc, above), not a kill
    ...any('statx', 'access'),
    // io_uring rings (virtio-blk's Async engine, virtio-net's TX batches) are driven from the
    // loop: submissions, the drain before a snapshot. They were set up, restricted to their
    // device's few opcodes and enabled while the devices were built (io-uring.ts IoUring.open),
    // under the process filter (MAIN_OWN below): from here on no new ring can be made and no
    // ring re-registered, so a ring reaches only the io_uring paths its device uses.
    ...any('io_uring_enter'),
    // virtio-mem takes the KVM memory slot of a fully unplugged range out of the guest and puts
    // it back when a block in it is plugged (device-memory.ts kvmSlotControl): this one KVM
    // ioctl, no other.
    ioctlRequest(KVM_SET_USER_MEMORY_REGION, 'KVM_SET_USER_MEMORY_REGION (virtio-mem slots)'),
    // Virtio devices raise their GSI with KVM_IRQ_LINE (device-loop.ts deviceEnvironment): at
    // most an interrupt of the worker's own guest, which it can already cause with its irqfds.
    ioctlRequest(KVM_IRQ_LINE, 'KVM_IRQ_LINE (virtio interrupts)'),
    // virtio-vsock's vhost backend (vsock/vhost.ts) sets up, starts and stops the kernel's
    // queues at DRIVER_OK, reset, pause and save: these requests, no other vhost ioctl (not
    // SET_OWNER, not the CID: the main thread did those).
    ...VHOST_DEVICE_REQUESTS.map(([name, request]) => ioctlRequest(request, `VHOST_${name}`)),
  ],
};

const MAIN_OWN: Policy = {
  rules: [
    ...NODE_THREAD,
    ioctlOfType(KVMIO, 'building and driving VMs'),
    ioctlOfType(TUN_AND_TTY, 'TAP set-up, the console terminal'),
    ioctlOfType(UFFDIO, 'userfaultfd (snapshot load)'),
    ioctlOfType(VHOST_VIRTIO, 'vhost-vsock set-up (the vsock vhost backend)'),
    {
      syscall: 'socket',
      args: [arg(0, AF_UNIX, 'the API socket, vsock, uffd handler: Unix only')],
    },
    CLONE_THREAD_ONLY,
    CLONE3_ENOSYS,
    ...any('openat', 'statx', 'readlink', 'access', 'getcwd', 'pread64', 'pwrite64', 'readv'),
    ...any('writev', 'lseek', 'fsync', 'fdatasync', 'ftruncate', 'fallocate', 'unlink', 'fcntl'),
    ...any('pipe2', 'bind', 'listen', 'accept4', 'connect', 'shutdown', 'sendmsg', 'recvmsg'),
    ...any('getsockopt', 'setsockopt', 'getsockname', 'epoll_create1', 'eventfd2'),
    ...any('memfd_create', 'userfaultfd', 'mremap', 'brk', 'rt_sigaction', 'tgkill', 'prctl'),
    ...any('seccomp', 'capget', 'getuid', 'geteuid', 'getgid', 'getegid', 'uname', 'sysinfo'),
    ...any('prlimit64', 'exit_group', 'rename', 'getrusage'),
    // The device worker builds its devices under this (process) filter, before its own: an
    // io_uring device sets up its ring there and registers its eventfd and restrictions.
    ...any('io_uring_setup', 'io_uring_register'),
    // A terminal on stdin, stdout or stderr (`typervisor run` in a shell): when Node first uses
    // one, libuv reopens the tty and dup3s the new descriptor over the old one. The audits ran
    // with pipes, so this was missed and such a run died of SIGSYS at its first console write.
    ...any('dup3'),
    // Least privilege without the jailer (issue 14): the API socket and the vsock listener are
    // bound in a private 0700 directory beside their path (mkdir, chmod), hard-linked into place
    // (link) and the directory removed (rmdir); umask for the fallback. Measured in audit mode.
    ...any('umask', 'chmod', 'fchmod', 'mkdir', 'rmdir', 'link'),
    // An embedding process's console pipes (vmm/console-pipe.ts: the library, `serve --mode
    // shared`): a FIFO made in a private directory and unlinked at once. FIFOs only: no device
    // node can be made under this filter.
    {
      syscall: 'mknodat',
      args: [
        {
          index: 2,
          type: 'dword',
          op: 'masked_eq',
          mask: 0o170000n,
          val: 0o010000n,
          comment: 'S_IFIFO only (the console pipe)',
        },
      ],
    },
  ],
};

const KVM_RUN = 0xae80; // _IO(KVMIO, 0x80)

/**
 * A vCPU runner thread (issue 18 part B, src/vmm/vcpu-threads.ts): a pthread of the native shim
 * that loops on KVM_RUN and hands each exit to a JS thread. It installs this list on itself (the
 * program is built here and passed to vcpuRunnerStart), stacked on the process filter: KVM_RUN
 * only (no other KVM ioctl: the JS thread does those while the runner sleeps), the futex it
 * sleeps on, write (the eventfd it rings), the kick signal's return, and glibc's thread exit
 * (rt_sigprocmask, madvise of the stack, exit). Not a Role: --seccomp-filter files do not name
 * it; it follows the vcpu role's on/off and the audit setting ('vcpu-runner' or 'all').
 */
export const VCPU_RUNNER: Policy = {
  rules: [
    {
      syscall: 'ioctl',
      args: [{ index: 1, type: 'qword', op: 'eq', val: BigInt(KVM_RUN), comment: 'KVM_RUN only' }],
    },
    ...any('futex', 'write', 'rt_sigreturn', 'rt_sigprocmask', 'madvise', 'exit'),
  ],
};

/**
 * The watcher of a vCPU run on the main thread's loop (issue 18, `--vcpu-threads loop`,
 * native block "loop runner"): a pthread that waits on the loop's epoll fd and its own eventfd,
 * and kicks the main thread (tgkill) when the loop has work. Installed on itself, stacked on
 * the process filter, like VCPU_RUNNER (and following the same settings).
 */
export const LOOP_WATCHER: Policy = {
  rules: [
    ...any('epoll_wait', 'epoll_pwait', 'read', 'futex', 'getpid', 'gettid', 'tgkill'),
    ...any('clock_gettime'),
    ...any('rt_sigreturn', 'rt_sigprocmask', 'madvise', 'exit'),
  ],
};

/** A role's own list. */
export function defaultPolicy(role: Role): Policy {
  switch (role) {
    case 'main':
      return MAIN_OWN;
    case 'vcpu':
      return VCPU;
    case 'device':
      return DEVICE;
  }
}

/**
 * The filter the main thread installs for the whole process (TSYNC): main's list joined with
 * the workers' (a worker inherits it, then stacks its own, so its own list decides there).
 */
export function processPolicy(policies: Record<Role, Policy>): Policy {
  // vCPU rules first: KVM_RUN's ioctl is the hottest call, and each call is compared in order.
  // A worker's errno answers (OPEN_REFUSED) stay in its own filter, which decides there: here
  // they would come before main's rules for the same call and refuse what main may do.
  const own = (p: Policy) => p.rules.filter((r) => (r.action?.kind ?? 'allow') === 'allow');
  return { rules: [...own(policies.vcpu), ...own(policies.device), ...policies.main.rules] };
}
