/**
 * The whole contract with the native shim (native/typervisor.c): syscalls with plain types.
 * Each failing syscall throws a SyscallError naming the call and the errno.
 */
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { HostError } from '../util/errors.js';

export type Buf = ArrayBuffer | ArrayBufferView;

export interface NativeShim {
  open(path: string, flags: number, mode: number): number;
  close(fd: number): void;
  /**
   * arg: an integer, or a buffer whose address is passed. Returns the ioctl's result. A buffer
   * shorter than the size an _IOR/_IOW/_IOWR request encodes is refused (EINVAL, no syscall).
   * An ioctl interrupted by a signal is made again in the shim, except KVM_RUN, whose EINTR
   * (a kick) is thrown as any other error.
   */
  ioctl(fd: number, request: number, arg: number | bigint | Buf): number;
  /** An ArrayBuffer over the new mapping; release only with munmap (it detaches the buffer). */
  mmap(length: number, prot: number, flags: number, fd: number, offset: number): ArrayBuffer;
  /** As mmap, at an address that is a multiple of `align` (a power of two, >= 4096). */
  mmapAligned(
    length: number,
    align: number,
    prot: number,
    flags: number,
    fd: number,
    offset: number,
  ): ArrayBuffer;
  munmap(buffer: ArrayBuffer): void;
  madvise(buffer: ArrayBuffer, offset: number, length: number, advice: number): void;
  /** Host virtual address of a buffer's first byte. */
  bufferAddress(buffer: Buf): bigint;
  /**
   * An ArrayBuffer over `length` bytes at `addr`, memory this process has already mapped (in
   * another thread): no mmap, no finalizer. Drop it with release(), never munmap.
   */
  viewAddress(addr: bigint, length: number): ArrayBuffer;
  /** Detaches a viewAddress buffer without unmapping (a later use throws instead of faulting). */
  release(buffer: ArrayBuffer): void;
  /** lseek(2); -1 on ENXIO (no data or hole at or after `offset`, with SEEK_DATA/SEEK_HOLE). */
  lseek(fd: number, offset: number, whence: number): number;
  memfdCreate(name: string, flags: number): number;
  eventfd(initval: number, flags: number): number;
  /** The counter, or -1n when the eventfd is non-blocking and empty. */
  eventfdRead(fd: number): bigint;
  eventfdWrite(fd: number, value: number | bigint): void;
  /** Bytes read, or -1 when it would block. */
  read(fd: number, buffer: Buf): number;
  readv(fd: number, buffers: Buf[]): number;
  writev(fd: number, buffers: Buf[]): number;
  /** preadv(2)/pwritev(2) at a file offset (at most 1024 buffers): bytes moved. */
  preadv(fd: number, buffers: Buf[], offset: number): number;
  pwritev(fd: number, buffers: Buf[], offset: number): number;
  epollCreate(): number;
  epollCtl(epfd: number, op: number, fd: number, events: number, tag: number): void;
  /** Fills `out` with [events, tag] pairs; returns how many (0 on timeout or EINTR). */
  epollWait(epfd: number, out: Uint32Array, timeoutMs: number): number;
  /** Installs the no-op handler of the vCPU kick signal in this process; returns its number. */
  installKickHandler(): number;
  threadSelf(): bigint;
  /** The process's CPU time, all threads, in us (CLOCK_PROCESS_CPUTIME_ID). */
  processCpuUs(): number;
  kick(thread: bigint, signal: number): void;
  /** fd of /dev/net/tun (non-blocking) attached with TUNSETIFF to interface `name`. */
  tapOpen(name: string, flags: number): number;
  /** A non-blocking AF_UNIX stream socket. */
  unixSocket(): number;
  bindListen(fd: number, path: string, backlog: number): void;
  /** A new non-blocking connection, or -1 when none is pending. */
  accept(fd: number): number;
  /** 0 when connected, -1 when the connection is in progress (wait for EPOLLOUT). */
  connect(fd: number, path: string): number;
  /** sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT): bytes sent, or -1 when it would block. */
  sendv(fd: number, buffers: Buf[]): number;
  shutdown(fd: number, how: number): void;
  /**
   * One sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT) of `data` (at least one byte when fds are sent)
   * with `fds` (at most 16) attached as SCM_RIGHTS: bytes sent, or -1 when it would block.
   */
  sendFds(fd: number, data: Buf, fds: number[]): number;
  /**
   * One recvmsg(MSG_DONTWAIT | MSG_CMSG_CLOEXEC) into `data`, taking at most maxFds (<= 16)
   * SCM_RIGHTS fds: bytes -1 when it would block, 0 at end of stream. More fds than maxFds
   * throws (after closing the ones received).
   */
  recvFds(fd: number, data: Buf, maxFds: number): { bytes: number; fds: number[] };
  /**
   * userfaultfd(2), always O_CLOEXEC | O_NONBLOCK. Not UFFD_USER_MODE_ONLY for guest RAM: KVM's
   * accesses fault in kernel mode and must reach the handler too.
   */
  userfaultfd(flags: number): number;

  // ---- jailer (issue 14): used only by src/jailer/. unshare(CLONE_NEWNS), setns, chroot, chdir
  // and pivot_root act on the calling thread only: call them all from one thread, then exec.
  unshare(flags: number): void;
  /** mount(2); null for an absent source, fstype or data. */
  mount(
    source: string | null,
    target: string,
    fstype: string | null,
    flags: number,
    data: string | null,
  ): void;
  umount2(target: string, flags: number): void;
  pivotRoot(newRoot: string, putOld: string): void;
  chroot(path: string): void;
  chdir(path: string): void;
  /** mknod(2) with makedev(major, minor); mode holds the file type (S_IFCHR) and permissions. */
  mknod(path: string, mode: number, major: number, minor: number): void;
  setns(fd: number, nstype: number): void;
  /** Process-wide; -1 is RLIM_INFINITY. */
  setrlimit(resource: number, soft: number, hard: number): void;
  dup2(oldFd: number, newFd: number): void;
  /** close_range(first, ~0, CLOSE_RANGE_CLOEXEC): every fd >= first closes at the next exec. */
  cloexecFrom(first: number): void;
  /** fcntl(fd, F_SETFD, 0): keeps fd open across exec (Node marks its stdio close-on-exec). */
  setInheritable(fd: number): void;
  /** Sets or clears O_NONBLOCK on fd (fcntl F_SETFL); returns whether it was set before. */
  setNonBlocking(fd: number, on: boolean): boolean;
  /** execve(2): replaces the whole process (all threads); returns only by throwing. */
  execve(path: string, argv: string[], envp: string[]): never;
  /** posix_spawn(3) from the calling thread (POSIX_SPAWN_SETSID when newSession): the pid. */
  spawn(path: string, argv: string[], envp: string[], newSession: boolean): number;
  // Issue 14 (seccomp; native block "Seccomp and the ioctl length check").
  /**
   * prctl(PR_SET_NO_NEW_PRIVS) then seccomp(SECCOMP_SET_MODE_FILTER, flags, program) on the
   * calling thread; `program` is 1 to 4096 struct sock_filter (8 bytes each). With TSYNC,
   * throws when another thread has a filter of its own.
   */
  seccompInstall(program: Buf, flags: number): void;
  /** prctl(PR_GET_SECCOMP) of the calling thread: 0 none, 2 filter. */
  seccompMode(): number;
  /**
   * The check ioctl() applies to a buffer argument: true when the request has no direction
   * (_IO) or the buffer holds at least the size the request encodes (_IOC_SIZE). ioctl() throws
   * EINVAL (before any syscall) when this is false.
   */
  ioctlLengthOk(request: number, length: number): boolean;
  /** prctl(PR_SET_NAME) of the calling thread (truncated to 15 bytes): shows in ps -T, /proc. */
  setThreadName(name: string): void;
  /**
   * prctl(PR_SET_THP_DISABLE, on): while on, no fault anywhere in the process gets a transparent
   * huge page (src/sandbox/seccomp/install.ts startThreadPool). Returns the setting it replaced.
   */
  setThpDisable(on: boolean): boolean;
  /**
   * madvise(addr, length, MADV_NOHUGEPAGE): no transparent huge pages in that range, at fault or
   * from khugepaged (the thread pool's stack: src/sandbox/seccomp/install.ts startThreadPool).
   * Advice only; throws with ENOMEM where part of it is not mapped.
   */
  noHugePages(addr: bigint, length: bigint): void;
  // Issue 18 part B (native block "vCPU runner threads"): a pthread per vCPU that only loops on
  // KVM_RUN; src/vmm/vcpu-threads.ts drives it. Its three words: see RunnerWord there.
  /**
   * Starts a runner for `vcpuFd`; `words[index..index+2]` (an Int32Array over a
   * SharedArrayBuffer, word 0 IDLE) are its state, errno and run count. After each KVM_RUN it
   * publishes EXITED and writes 1 to `eventFd`; it sleeps (futex) otherwise. `program` (a seccomp
   * program, or null) is installed by the thread on itself first: throws if that fails. Returns a
   * handle. `kickSignal` is installKickHandler()'s; the thread blocks every other signal.
   * `spin` (0 to 100,000, default 0): pause instructions the runner waits for the answer to an
   * exit before it sleeps (a sleeping thread is slow to wake on an idle CPU).
   */
  vcpuRunnerStart(
    vcpuFd: number,
    words: Int32Array,
    index: number,
    eventFd: number,
    kickSignal: number,
    name: string,
    program: Buf | null,
    spin?: number,
  ): number;
  /** One more KVM_RUN (the state word must be IDLE or EXITED: EBUSY otherwise). */
  vcpuRunnerGo(handle: number): void;
  /** Asks the runner to end (a runner inside KVM_RUN ends after it returns: kick it). */
  vcpuRunnerQuit(handle: number): void;
  /** The kick signal to the runner's thread (any thread); false when it is gone. */
  vcpuRunnerKick(handle: number): boolean;
  /** Joins an ended runner (state DEAD; EBUSY otherwise) from the thread that started it. */
  vcpuRunnerJoin(handle: number): void;
  // Issue 18 (native block "loop runner"): one vCPU run by the calling thread while its event
  // loop has nothing due; src/vmm/vcpu-threads.ts drives it with the runner's three words.
  /**
   * Runs the vCPU `vcpuFd` on this thread: before each time the loop would block, KVM_RUN for as
   * long as the loop has nothing due and word 0 says RUN; after each KVM_RUN the words are set as
   * a runner's and `callback(0)` is called. A watcher thread (with `program` as its seccomp
   * filter) ends a KVM_RUN when the loop has work (`run`'s immediate_exit and the kick signal).
   * One per process (EBUSY). Returns a handle.
   */
  loopRunnerStart(
    vcpuFd: number,
    run: ArrayBuffer,
    words: Int32Array,
    index: number,
    kickSignal: number,
    callback: (status: number) => void,
    program: Buf | null,
  ): number;
  /** One more KVM_RUN at the loop's next turn (word 0 must be IDLE or EXITED: EBUSY otherwise). */
  loopRunnerGo(handle: number): void;
  /**
   * From its callback only (EPERM otherwise): KVM_RUN once more now, as the loop would after the
   * callback, so that JS serves a run of exits in a loop of its own. 1: it ran (the words are
   * set as before a callback); 0: it did not (word 0 is not RUN, or the loop has work).
   */
  loopRunnerStep(handle: number): number;
  /** Ends it at once (word 0 DEAD): JS on its thread runs only outside KVM_RUN. */
  loopRunnerQuit(handle: number): void;
  /** Releases an ended one (the watcher joined, the loop's hook closed). */
  loopRunnerJoin(handle: number): void;
  // Issue 17 part B (native block "io_uring"): the three syscalls; the rings are mapped with
  // mmap() and driven from TypeScript (src/devices/virtio/block/io-uring.ts).
  /** io_uring_setup(2): the ring fd; `params` (struct io_uring_params, >= 120 bytes) in and out. */
  ioUringSetup(entries: number, params: Buf): number;
  /** io_uring_enter(2) without a signal mask: how many SQEs the kernel consumed. */
  ioUringEnter(fd: number, toSubmit: number, minComplete: number, flags: number): number;
  /** io_uring_register(2): `arg` is passed by address (null: none). */
  ioUringRegister(fd: number, opcode: number, arg: Buf | null, nrArgs: number): number;
  // Issue 19 (native block "malloc_trim"): the shared-mode daemon's idle trim
  // (src/vmm/malloc-trim.ts, src/daemon/trim.ts).
  /**
   * glibc's malloc_trim(0): the free top of the main arena back with brk, free pages inside
   * every arena with madvise(MADV_DONTNEED). 1 when memory went back to the system, else 0.
   */
  mallocTrim(): number;
  // Issue 18 (native block "fd watch"): the vCPU hub on the main thread (vcpu-threads.ts).
  /**
   * Watches `fd` for readability on this thread's own event loop (level-triggered) and calls
   * `callback` there each time until fdUnwatch: the callback must drain the fd. Other threads
   * writing an eventfd wake this thread directly (no libuv pool thread in between). The fd must
   * stay open while watched. Returns a handle; the watch keeps the loop alive. A poll error
   * is reported once (`status` < 0, a libuv error code) and the watch stops polling.
   */
  fdWatch(fd: number, callback: (status: number) => void): number;
  /** Stops a watch (from the thread that made it); a stale handle is ignored. */
  fdUnwatch(handle: number): void;
}

/** A failed syscall, with its errno name in `code` (EINTR, EAGAIN, ...). */
export interface SyscallError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

export function isSyscallError(e: unknown, code?: string): e is SyscallError {
  return (
    e instanceof Error &&
    typeof (e as Partial<SyscallError>).syscall === 'string' &&
    (code === undefined || (e as SyscallError).code === code)
  );
}

let shim: NativeShim | undefined;

/** The shim, loaded on first use (so pure-TypeScript code and tests never need it). */
export function native(): NativeShim {
  if (shim) return shim;
  const here = dirname(fileURLToPath(import.meta.url));
  // dist/src/kvm -> repository root
  const root = join(here, '..', '..', '..');
  const path = join(root, 'native', 'build', 'Release', 'typervisor_native.node');
  if (!existsSync(path)) {
    throw new HostError(`native shim not built (${path} missing): run \`npm install\``);
  }
  // RTLD_DEEPBIND: the shim's libc symbols are found in libc before node's own symbol table
  // (~75,000 V8, N-API and libuv names) is searched for them, so that loading it faults in
  // fewer of the node binary's pages (+128 KiB at load against +320; docs/architecture.md
  // "Start-up"). RTLD_LAZY as require() would: a function is bound on its first call.
  const mod = { exports: {} as NativeShim };
  process.dlopen(mod, path, RTLD_LAZY | RTLD_DEEPBIND);
  shim = mod.exports;
  return shim;
}

/** dlopen(3) flags (Linux; os.constants.dlopen without loading node:os). */
const RTLD_LAZY = 1;
const RTLD_DEEPBIND = 8;

// Flags the TypeScript side passes through (Linux x86_64 values).
export const O_RDONLY = 0;
export const O_RDWR = 2;
export const O_NONBLOCK = 0o4000;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 1;
export const MAP_PRIVATE = 2;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
export const MADV_DONTFORK = 10;
export const MADV_HUGEPAGE = 14;
export const MADV_NOHUGEPAGE = 15;
export const EFD_NONBLOCK = 0o4000;
export const EPOLLIN = 1;
/** Edge-triggered (1 << 31, as a non-negative number: the shim passes it on as a u32). */
export const EPOLLET = 0x8000_0000;
export const EPOLLOUT = 4;
export const EPOLLERR = 8;
export const EPOLLHUP = 0x10;
export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLL_CTL_MOD = 3;
export const EPOLLRDHUP = 0x2000;
export const SHUT_RD = 0;
export const SHUT_WR = 1;
export const SHUT_RDWR = 2;
