/*
 * Typervisor's native shim: syscalls with plain types, and nothing else.
 *
 * Every struct is laid out and every policy decided in TypeScript; this file only moves numbers
 * and buffers across the N-API boundary. The whole surface is described in src/kvm/native.ts.
 * Errors: a failing syscall throws an Error with .code (errno name), .errno and .syscall.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <sys/socket.h>
#include <sys/un.h>

#define CHECK(call)                                                            \
  do {                                                                         \
    if ((call) != napi_ok) {                                                   \
      napi_throw_error(env, NULL, "typervisor native: N-API call failed: " #call); \
      return NULL;                                                             \
    }                                                                          \
  } while (0)

static const char *errno_name(int e) {
  switch (e) {
#define E(x) case x: return #x;
    E(EPERM) E(ENOENT) E(ESRCH) E(EINTR) E(EIO) E(ENXIO) E(E2BIG) E(EBADF) E(EAGAIN)
    E(ENOMEM) E(EACCES) E(EFAULT) E(EBUSY) E(EEXIST) E(ENODEV) E(ENOTDIR) E(EISDIR)
    E(EINVAL) E(ENFILE) E(EMFILE) E(ENOTTY) E(EFBIG) E(ENOSPC) E(ESPIPE) E(EROFS)
    E(EPIPE) E(ERANGE) E(ENOSYS) E(EOPNOTSUPP) E(ECONNREFUSED) E(ECONNRESET) E(EINPROGRESS)
    E(ENOTCONN) E(EADDRINUSE) E(ENAMETOOLONG) E(ENOTSOCK) E(EISCONN) E(ECONNABORTED)
#undef E
    default: return "EUNKNOWN";
  }
}

static napi_value throw_errno(napi_env env, const char *syscall, int e) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s failed: %s (%s)", syscall, strerror(e), errno_name(e));
  napi_value m, err, v;
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &m);
  napi_create_error(env, NULL, m, &err);
  napi_create_string_utf8(env, errno_name(e), NAPI_AUTO_LENGTH, &v);
  napi_set_named_property(env, err, "code", v);
  napi_create_int32(env, e, &v);
  napi_set_named_property(env, err, "errno", v);
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &v);
  napi_set_named_property(env, err, "syscall", v);
  napi_throw(env, err);
  return NULL;
}

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "typervisor native: too few arguments");
    return 0;
  }
  return 1;
}

static int64_t arg_i64(napi_env env, napi_value v) {
  napi_valuetype t;
  napi_typeof(env, v, &t);
  if (t == napi_bigint) {
    int64_t r; bool lossless;
    napi_get_value_bigint_int64(env, v, &r, &lossless);
    return r;
  }
  int64_t r = 0;
  napi_get_value_int64(env, v, &r);
  return r;
}

static uint64_t arg_u64(napi_env env, napi_value v) {
  napi_valuetype t;
  napi_typeof(env, v, &t);
  if (t == napi_bigint) {
    uint64_t r; bool lossless;
    napi_get_value_bigint_uint64(env, v, &r, &lossless);
    return r;
  }
  double d = 0;
  napi_get_value_double(env, v, &d);
  return (uint64_t)d;
}

/* A pointer and length from an ArrayBuffer or any ArrayBufferView; 0 when v is neither. */
static int buffer_of(napi_env env, napi_value v, void **data, size_t *len) {
  bool is;
  if (napi_is_arraybuffer(env, v, &is) == napi_ok && is) {
    return napi_get_arraybuffer_info(env, v, data, len) == napi_ok;
  }
  if (napi_is_typedarray(env, v, &is) == napi_ok && is) {
    napi_typedarray_type type; size_t n; napi_value ab; size_t off;
    if (napi_get_typedarray_info(env, v, &type, &n, data, &ab, &off) != napi_ok) return 0;
    size_t es = 1;
    switch (type) {
      case napi_int16_array: case napi_uint16_array: es = 2; break;
      case napi_int32_array: case napi_uint32_array: case napi_float32_array: es = 4; break;
      case napi_float64_array: case napi_bigint64_array: case napi_biguint64_array: es = 8; break;
      default: es = 1;
    }
    *len = n * es;
    return 1;
  }
  if (napi_is_dataview(env, v, &is) == napi_ok && is) {
    napi_value ab; size_t off;
    return napi_get_dataview_info(env, v, len, data, &ab, &off) == napi_ok;
  }
  return 0;
}

static napi_value num(napi_env env, int64_t x) {
  napi_value r;
  napi_create_int64(env, x, &r);
  return r;
}

/* open(path: string, flags: number, mode: number): fd */
static napi_value n_open(napi_env env, napi_callback_info info) {
  napi_value a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  char path[4096]; size_t n;
  CHECK(napi_get_value_string_utf8(env, a[0], path, sizeof path, &n));
  int fd = open(path, (int)arg_i64(env, a[1]) | O_CLOEXEC, (mode_t)arg_i64(env, a[2]));
  if (fd < 0) return throw_errno(env, "open", errno);
  return num(env, fd);
}

/* close(fd) */
static napi_value n_close(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  if (close((int)arg_i64(env, a[0])) < 0) return throw_errno(env, "close", errno);
  return NULL;
}

/* ---- Seccomp and the ioctl length check (issue 14, helper E: r3-seccomp) ----
 * The filters are built and checked in TypeScript (src/sandbox/seccomp/); this block only
 * installs a ready classic-BPF program on the calling thread, and ioctl_length_ok is the
 * shim-side check n_ioctl applies to buffer arguments. */
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>

/*
 * A buffer passed to an _IOR/_IOW/_IOWR request must hold at least the size the request number
 * encodes (_IOC_SIZE): otherwise the kernel reads or writes past the buffer. A longer buffer is
 * accepted: KVM's variable-length structs (kvm_cpuid2, kvm_msrs, kvm_msr_list, kvm_xsave read
 * with KVM_GET_XSAVE2) encode only their fixed header. _IO requests (no direction) carry no size.
 * Integer arguments are not checked here: some _IOW requests take their value by value
 * (TUNSETOFFLOAD), which only the caller knows.
 */
static int ioctl_length_ok(unsigned long req, size_t len) {
  if (_IOC_DIR(req) == _IOC_NONE) return 1;
  return len >= _IOC_SIZE(req);
}

/* ioctlLengthOk(request, length): the check n_ioctl applies, for tests */
static napi_value n_ioctl_length_ok(napi_env env, napi_callback_info info) {
  napi_value a[2], r;
  if (!get_args(env, info, 2, a)) return NULL;
  CHECK(napi_get_boolean(env, ioctl_length_ok((unsigned long)arg_u64(env, a[0]), (size_t)arg_u64(env, a[1])), &r));
  return r;
}

#define SECCOMP_MAX_INSNS 4096 /* BPF_MAXINSNS: the kernel's own bound */

/*
 * seccompInstall(program, flags): prctl(PR_SET_NO_NEW_PRIVS) then seccomp(SECCOMP_SET_MODE_FILTER,
 * flags, program) on the calling thread. `program` is an array of struct sock_filter (8 bytes
 * each). With SECCOMP_FILTER_FLAG_TSYNC a positive result is the id of a thread that could not
 * be synchronised (it already has a filter of its own): that throws, naming the thread.
 */
static napi_value n_seccomp_install(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  void *data; size_t len;
  if (!buffer_of(env, a[0], &data, &len)) { napi_throw_type_error(env, NULL, "not a buffer"); return NULL; }
  if (len == 0 || len % sizeof(struct sock_filter) != 0 || len / sizeof(struct sock_filter) > SECCOMP_MAX_INSNS) {
    napi_throw_range_error(env, NULL, "seccompInstall: program must be 1 to 4096 instructions of 8 bytes");
    return NULL;
  }
  struct sock_fprog prog = { .len = (unsigned short)(len / sizeof(struct sock_filter)), .filter = data };
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return throw_errno(env, "prctl(PR_SET_NO_NEW_PRIVS)", errno);
  long r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, (unsigned)arg_i64(env, a[1]), &prog);
  if (r < 0) return throw_errno(env, "seccomp(SECCOMP_SET_MODE_FILTER)", errno);
  if (r > 0) {
    char msg[160];
    snprintf(msg, sizeof msg, "seccomp: thread %ld has a filter of its own and cannot be synchronised (TSYNC)", r);
    napi_throw_error(env, "ESRCH", msg);
    return NULL;
  }
  return NULL;
}

/* seccompMode(): this thread's seccomp mode from prctl(PR_GET_SECCOMP): 0 off, 2 filter */
static napi_value n_seccomp_mode(napi_env env, napi_callback_info info) {
  (void)info;
  int r = prctl(PR_GET_SECCOMP, 0, 0, 0, 0);
  if (r < 0) return throw_errno(env, "prctl(PR_GET_SECCOMP)", errno);
  return num(env, r);
}
/* setThreadName(name): prctl(PR_SET_NAME) of the calling thread (15 bytes at most), so that
 * ps -T, /proc and the kernel's seccomp audit lines (comm=) tell the thread roles apart */
static napi_value n_set_thread_name(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  char name[16]; size_t n;
  CHECK(napi_get_value_string_utf8(env, a[0], name, sizeof name, &n));
  if (prctl(PR_SET_NAME, name, 0, 0, 0) < 0) return throw_errno(env, "prctl(PR_SET_NAME)", errno);
  return NULL;
}
/* setThpDisable(on): prctl(PR_SET_THP_DISABLE) for the whole process (no transparent huge pages
 * at fault while on; survives fork and exec); returns the setting it replaced. The thread pool's
 * start wraps its pthread_create in it: glibc writes a new thread's descriptor at the top of its
 * 8 MiB stack in the creating thread, and on a THP host that first fault backs a 2 MiB-aligned
 * top with a 2 MiB page */
static napi_value n_set_thp_disable(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  bool on;
  CHECK(napi_get_value_bool(env, a[0], &on));
  int prev = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
  if (prev < 0) return throw_errno(env, "prctl(PR_GET_THP_DISABLE)", errno);
  if (prctl(PR_SET_THP_DISABLE, on ? 1 : 0, 0, 0, 0) < 0) return throw_errno(env, "prctl(PR_SET_THP_DISABLE)", errno);
  napi_value r;
  CHECK(napi_get_boolean(env, prev != 0, &r));
  return r;
}
/* noHugePages(addr, length): madvise(MADV_NOHUGEPAGE) on [addr, addr+length) and nothing else:
 * advice that only keeps transparent huge pages off a range (at fault and from khugepaged),
 * never changes its contents, and fails with ENOMEM on unmapped parts. For the thread pool's
 * 8 MiB stack, whose size libuv fixes: khugepaged (max_ptes_none 511) otherwise collapses its
 * top into a 2 MiB page in an idle VMM (src/sandbox/seccomp/install.ts startThreadPool). */
static napi_value n_no_huge_pages(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  uint64_t addr = arg_u64(env, a[0]), len = arg_u64(env, a[1]);
  if (madvise((void *)(uintptr_t)addr, (size_t)len, MADV_NOHUGEPAGE) < 0)
    return throw_errno(env, "madvise(MADV_NOHUGEPAGE)", errno);
  return NULL;
}
/* ---- end of the seccomp block ---- */

/* ioctl(fd, request, arg: number | bigint | buffer): result; a buffer shorter than the
 * request's encoded size is refused with EINVAL before any syscall (ioctl_length_ok).
 * An ioctl a signal interrupted (EINTR: the vCPU kick, node --cpu-prof's SIGPROF, an embedding
 * program's own signals) is made again, except KVM_RUN, whose EINTR is the kick itself and goes
 * back to JS (issue 17/19 fixes, r7-fixes). */
#define N_IOCTL_KVM_RUN 0xae80UL /* _IO(KVMIO, 0x80) */
static napi_value n_ioctl(napi_env env, napi_callback_info info) {
  napi_value a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  int fd = (int)arg_i64(env, a[0]);
  unsigned long req = (unsigned long)arg_u64(env, a[1]);
  void *data = NULL; size_t len = 0;
  int is_buf = buffer_of(env, a[2], &data, &len);
  unsigned long arg = is_buf ? (unsigned long)data : (unsigned long)arg_u64(env, a[2]);
  if (is_buf && !ioctl_length_ok(req, len)) return throw_errno(env, "ioctl(buffer shorter than the request's size)", EINVAL);
  int r;
  do r = ioctl(fd, req, arg);
  while (r < 0 && errno == EINTR && req != N_IOCTL_KVM_RUN);
  if (r < 0) return throw_errno(env, "ioctl", errno);
  return num(env, r);
}

/* uncounted.cc: an ArrayBuffer over `data` that V8 does not count as external memory. */
napi_value tv_uncounted_arraybuffer(void *data, size_t length);

/* An ArrayBuffer over a new mapping (no finalizer: see munmap), or NULL (thrown) and unmapped. */
static napi_value wrap_mapping(napi_env env, void *p, size_t len) {
  napi_value ab = tv_uncounted_arraybuffer(p, len);
  if (ab == NULL) {
    munmap(p, len);
    napi_throw_error(env, NULL, "typervisor native: cannot wrap mapping in an ArrayBuffer");
    return NULL;
  }
  return ab;
}

/* mmap(length, prot, flags, fd, offset): ArrayBuffer over the mapping (no finalizer: see munmap) */
static napi_value n_mmap(napi_env env, napi_callback_info info) {
  napi_value a[5];
  if (!get_args(env, info, 5, a)) return NULL;
  size_t len = (size_t)arg_u64(env, a[0]);
  void *p = mmap(NULL, len, (int)arg_i64(env, a[1]), (int)arg_i64(env, a[2]), (int)arg_i64(env, a[3]),
                 (off_t)arg_i64(env, a[4]));
  if (p == MAP_FAILED) return throw_errno(env, "mmap", errno);
  return wrap_mapping(env, p, len);
}

/*
 * mmapAligned(length, align, prot, flags, fd, offset): as mmap, at an address that is a multiple
 * of `align` (a power of two, at least a page). A PROT_NONE reservation of length + align is made,
 * the mapping is placed over its aligned part (MAP_FIXED), and the rest of the reservation is
 * unmapped. KVM maps guest memory with 2 MiB entries only where the host address agrees with the
 * guest-physical one modulo 2 MiB, and a kernel before 6.7 places a large anonymous mapping at
 * any page.
 */
static napi_value n_mmap_aligned(napi_env env, napi_callback_info info) {
  napi_value a[6];
  if (!get_args(env, info, 6, a)) return NULL;
  size_t len = (size_t)arg_u64(env, a[0]), align = (size_t)arg_u64(env, a[1]);
  if (len == 0 || align < 4096 || (align & (align - 1)) != 0 || len > SIZE_MAX - align) {
    napi_throw_range_error(env, NULL, "mmapAligned: bad length or alignment");
    return NULL;
  }
  void *r = mmap(NULL, len + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (r == MAP_FAILED) return throw_errno(env, "mmap", errno);
  uintptr_t start = (uintptr_t)r, base = (start + align - 1) & ~(uintptr_t)(align - 1);
  uintptr_t end = base + len, rend = start + len + align;
  void *p = mmap((void *)base, len, (int)arg_i64(env, a[2]), (int)arg_i64(env, a[3]) | MAP_FIXED,
                 (int)arg_i64(env, a[4]), (off_t)arg_i64(env, a[5]));
  if (p == MAP_FAILED) {
    int e = errno;
    munmap(r, len + align);
    return throw_errno(env, "mmap", e);
  }
  if (base > start) munmap(r, base - start);
  if (rend > end) munmap((void *)end, rend - end);
  return wrap_mapping(env, p, len);
}

/* munmap(buffer): detaches the ArrayBuffer first, so a later use throws instead of faulting */
static napi_value n_munmap(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  void *p; size_t len;
  CHECK(napi_get_arraybuffer_info(env, a[0], &p, &len));
  CHECK(napi_detach_arraybuffer(env, a[0]));
  if (munmap(p, len) < 0) return throw_errno(env, "munmap", errno);
  return NULL;
}

/*
 * release(buffer): detaches an ArrayBuffer made by viewAddress without unmapping anything, so a
 * worker can drop its view of memory another thread owns (and a later use throws, not faults).
 */
static napi_value n_release(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  void *p; size_t len;
  CHECK(napi_get_arraybuffer_info(env, a[0], &p, &len));
  CHECK(napi_detach_arraybuffer(env, a[0]));
  return NULL;
}

/* madvise(buffer, offset, length, advice) */
static napi_value n_madvise(napi_env env, napi_callback_info info) {
  napi_value a[4];
  if (!get_args(env, info, 4, a)) return NULL;
  void *p; size_t len;
  CHECK(napi_get_arraybuffer_info(env, a[0], &p, &len));
  size_t off = (size_t)arg_u64(env, a[1]), n = (size_t)arg_u64(env, a[2]);
  if (off > len || n > len - off) { napi_throw_range_error(env, NULL, "madvise range outside buffer"); return NULL; }
  if (madvise((char *)p + off, n, (int)arg_i64(env, a[3])) < 0) return throw_errno(env, "madvise", errno);
  return NULL;
}

/* bufferAddress(buffer): bigint host virtual address of its first byte (for KVM memory slots) */
static napi_value n_buffer_address(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  void *data; size_t len;
  if (!buffer_of(env, a[0], &data, &len)) { napi_throw_type_error(env, NULL, "not a buffer"); return NULL; }
  napi_value r;
  CHECK(napi_create_bigint_uint64(env, (uint64_t)(uintptr_t)data, &r));
  return r;
}

/*
 * viewAddress(addr, length): an ArrayBuffer over memory that is already mapped (by mmap in another
 * thread of this process). No mmap and no finalizer: the owner of the mapping unmaps it, after
 * every view has been dropped with release().
 */
static napi_value n_view_address(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  uint64_t addr = arg_u64(env, a[0]);
  size_t len = (size_t)arg_u64(env, a[1]);
  if (addr == 0 || addr + len < addr) { napi_throw_range_error(env, NULL, "viewAddress: bad address range"); return NULL; }
  napi_value ab = tv_uncounted_arraybuffer((void *)(uintptr_t)addr, len);
  if (ab == NULL) {
    napi_throw_error(env, NULL, "typervisor native: cannot wrap memory in an ArrayBuffer");
    return NULL;
  }
  return ab;
}

/* lseek(fd, offset, whence): the new offset, or -1 on ENXIO (SEEK_DATA/SEEK_HOLE past the last extent) */
static napi_value n_lseek(napi_env env, napi_callback_info info) {
  napi_value a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  off_t r = lseek((int)arg_i64(env, a[0]), (off_t)arg_i64(env, a[1]), (int)arg_i64(env, a[2]));
  if (r < 0) { if (errno == ENXIO) return num(env, -1); return throw_errno(env, "lseek", errno); }
  return num(env, (int64_t)r);
}

/*
 * userfaultfd(flags): fd, always O_CLOEXEC | O_NONBLOCK. For guest RAM do not pass
 * UFFD_USER_MODE_ONLY: KVM touches guest memory from the kernel, and those faults must reach
 * the handler too (Firecracker builds its uffd with user_mode_only(false)).
 */
static napi_value n_userfaultfd(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  int fd = (int)syscall(SYS_userfaultfd, (int)arg_i64(env, a[0]) | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return throw_errno(env, "userfaultfd", errno);
  return num(env, fd);
}

/* memfdCreate(name, flags): fd */
static napi_value n_memfd_create(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  char name[256]; size_t n;
  CHECK(napi_get_value_string_utf8(env, a[0], name, sizeof name, &n));
  int fd = memfd_create(name, (unsigned)arg_i64(env, a[1]) | MFD_CLOEXEC);
  if (fd < 0) return throw_errno(env, "memfd_create", errno);
  return num(env, fd);
}

/* eventfd(initval, flags): fd (always close-on-exec) */
static napi_value n_eventfd(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  int fd = eventfd((unsigned)arg_i64(env, a[0]), (int)arg_i64(env, a[1]) | EFD_CLOEXEC);
  if (fd < 0) return throw_errno(env, "eventfd", errno);
  return num(env, fd);
}

/* eventfdRead(fd): bigint counter, or -1n when it would block */
static napi_value n_eventfd_read(napi_env env, napi_callback_info info) {
  napi_value a[1], r;
  if (!get_args(env, info, 1, a)) return NULL;
  uint64_t v;
  ssize_t n = read((int)arg_i64(env, a[0]), &v, sizeof v);
  if (n < 0) {
    if (errno == EAGAIN) { CHECK(napi_create_bigint_int64(env, -1, &r)); return r; }
    return throw_errno(env, "read(eventfd)", errno);
  }
  CHECK(napi_create_bigint_uint64(env, v, &r));
  return r;
}

/* eventfdWrite(fd, value) */
static napi_value n_eventfd_write(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  uint64_t v = arg_u64(env, a[1]);
  if (write((int)arg_i64(env, a[0]), &v, sizeof v) < 0 && errno != EAGAIN) return throw_errno(env, "write(eventfd)", errno);
  return NULL;
}

/* read(fd, buffer): bytes read, or -1 when it would block */
static napi_value n_read(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  void *data; size_t len;
  if (!buffer_of(env, a[1], &data, &len)) { napi_throw_type_error(env, NULL, "not a buffer"); return NULL; }
  ssize_t n = read((int)arg_i64(env, a[0]), data, len);
  if (n < 0) { if (errno == EAGAIN) return num(env, -1); return throw_errno(env, "read", errno); }
  return num(env, n);
}

/* readv/writev(fd, buffers[]): bytes, or -1 when it would block (scatter-gather for TAP);
 * preadv/pwritev(fd, buffers[], offset): the same at a file offset (virtio-blk's Sync engine) */
static napi_value rw_vec(napi_env env, napi_callback_info info, int is_write, int at_offset) {
  napi_value a[3];
  if (!get_args(env, info, at_offset ? 3 : 2, a)) return NULL;
  int64_t off = 0;
  if (at_offset) {
    off = arg_i64(env, a[2]);
    if (off < 0) { napi_throw_range_error(env, NULL, "negative file offset"); return NULL; }
  }
  uint32_t cnt;
  CHECK(napi_get_array_length(env, a[1], &cnt));
  if (cnt > 1024) { napi_throw_range_error(env, NULL, "too many iovecs"); return NULL; }
  struct iovec iov[1024];
  for (uint32_t i = 0; i < cnt; i++) {
    napi_value e;
    CHECK(napi_get_element(env, a[1], i, &e));
    if (!buffer_of(env, e, &iov[i].iov_base, &iov[i].iov_len)) { napi_throw_type_error(env, NULL, "not a buffer"); return NULL; }
  }
  int fd = (int)arg_i64(env, a[0]);
  ssize_t n;
  if (at_offset) n = is_write ? pwritev(fd, iov, (int)cnt, (off_t)off) : preadv(fd, iov, (int)cnt, (off_t)off);
  else n = is_write ? writev(fd, iov, (int)cnt) : readv(fd, iov, (int)cnt);
  if (n < 0) {
    if (errno == EAGAIN) return num(env, -1);
    return throw_errno(env, at_offset ? (is_write ? "pwritev" : "preadv") : (is_write ? "writev" : "readv"), errno);
  }
  return num(env, n);
}
static napi_value n_readv(napi_env env, napi_callback_info info) { return rw_vec(env, info, 0, 0); }
static napi_value n_writev(napi_env env, napi_callback_info info) { return rw_vec(env, info, 1, 0); }
static napi_value n_preadv(napi_env env, napi_callback_info info) { return rw_vec(env, info, 0, 1); }
static napi_value n_pwritev(napi_env env, napi_callback_info info) { return rw_vec(env, info, 1, 1); }

/* epollCreate(): fd */
static napi_value n_epoll_create(napi_env env, napi_callback_info info) {
  (void)info;
  int fd = epoll_create1(EPOLL_CLOEXEC);
  if (fd < 0) return throw_errno(env, "epoll_create1", errno);
  return num(env, fd);
}

/* epollCtl(epfd, op, fd, events, tag: u32) */
static napi_value n_epoll_ctl(napi_env env, napi_callback_info info) {
  napi_value a[5];
  if (!get_args(env, info, 5, a)) return NULL;
  struct epoll_event ev = {0};
  ev.events = (uint32_t)arg_i64(env, a[3]);
  ev.data.u64 = (uint32_t)arg_i64(env, a[4]);
  if (epoll_ctl((int)arg_i64(env, a[0]), (int)arg_i64(env, a[1]), (int)arg_i64(env, a[2]), &ev) < 0)
    return throw_errno(env, "epoll_ctl", errno);
  return NULL;
}

/* epollWait(epfd, out: Uint32Array of [events, tag] pairs, timeoutMs): count (0 on EINTR) */
static napi_value n_epoll_wait(napi_env env, napi_callback_info info) {
  napi_value a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  void *data; size_t len;
  if (!buffer_of(env, a[1], &data, &len)) { napi_throw_type_error(env, NULL, "not a buffer"); return NULL; }
  int max = (int)(len / 8);
  if (max > 256) max = 256;
  if (max < 1) { napi_throw_range_error(env, NULL, "event buffer too small"); return NULL; }
  struct epoll_event evs[256];
  int n = epoll_wait((int)arg_i64(env, a[0]), evs, max, (int)arg_i64(env, a[2]));
  if (n < 0) { if (errno == EINTR) return num(env, 0); return throw_errno(env, "epoll_wait", errno); }
  uint32_t *out = data;
  for (int i = 0; i < n; i++) { out[2 * i] = evs[i].events; out[2 * i + 1] = (uint32_t)evs[i].data.u64; }
  return num(env, n);
}

/* The vCPU kick: a real-time signal whose handler does nothing, so that a blocking KVM_RUN
 * returns EINTR. Installed without SA_RESTART. */
static void kick_handler(int sig) { (void)sig; }

/* installKickHandler(): signal number used for kicks */
static napi_value n_install_kick_handler(napi_env env, napi_callback_info info) {
  (void)info;
  int sig = SIGRTMIN + 1;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = kick_handler;
  sigemptyset(&sa.sa_mask);
  if (sigaction(sig, &sa, NULL) < 0) return throw_errno(env, "sigaction", errno);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, sig);
  pthread_sigmask(SIG_UNBLOCK, &set, NULL);
  return num(env, sig);
}

/* threadSelf(): bigint id of the calling thread, for kick() */
static napi_value n_thread_self(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value r;
  CHECK(napi_create_bigint_uint64(env, (uint64_t)pthread_self(), &r));
  return r;
}

/* processCpuUs(): the process's CPU time (all threads) in us: clock_gettime(CLOCK_PROCESS_CPUTIME_ID),
 * which every thread's filter allows (getrusage, what process.cpuUsage() calls, a vCPU's does not) */
static napi_value n_process_cpu_us(napi_env env, napi_callback_info info) {
  (void)info;
  struct timespec ts;
  if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts) != 0) return throw_errno(env, "clock_gettime", errno);
  napi_value r;
  CHECK(napi_create_double(env, (double)ts.tv_sec * 1e6 + (double)(ts.tv_nsec / 1000), &r));
  return r;
}

/* kick(thread, signal) */
static napi_value n_kick(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  int e = pthread_kill((pthread_t)arg_u64(env, a[0]), (int)arg_i64(env, a[1]));
  if (e != 0) return throw_errno(env, "pthread_kill", e);
  return NULL;
}

/* tapOpen(name, flags): fd of /dev/net/tun attached to interface `name` */
static napi_value n_tap_open(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  char name[64]; size_t n;
  CHECK(napi_get_value_string_utf8(env, a[0], name, sizeof name, &n));
  if (n >= IFNAMSIZ) { napi_throw_range_error(env, NULL, "TAP name too long"); return NULL; }
  int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return throw_errno(env, "open(/dev/net/tun)", errno);
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  memcpy(ifr.ifr_name, name, n);
  ifr.ifr_flags = (short)arg_i64(env, a[1]);
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) { int e = errno; close(fd); return throw_errno(env, "ioctl(TUNSETIFF)", e); }
  return num(env, fd);
}

/* Unix stream sockets for the vsock backend (non-blocking, close-on-exec). */
static int sun_of(napi_env env, napi_value v, struct sockaddr_un *sa) {
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  size_t n;
  if (napi_get_value_string_utf8(env, v, sa->sun_path, sizeof sa->sun_path, &n) != napi_ok) return 0;
  if (n >= sizeof sa->sun_path - 1) { napi_throw_range_error(env, NULL, "Unix socket path too long"); return 0; }
  return 1;
}

/* unixSocket(): fd of a non-blocking AF_UNIX SOCK_STREAM socket */
static napi_value n_unix_socket(napi_env env, napi_callback_info info) {
  (void)info;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return throw_errno(env, "socket", errno);
  return num(env, fd);
}

/* bindListen(fd, path, backlog) */
static napi_value n_bind_listen(napi_env env, napi_callback_info info) {
  napi_value a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  struct sockaddr_un sa;
  if (!sun_of(env, a[1], &sa)) return NULL;
  int fd = (int)arg_i64(env, a[0]);
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) return throw_errno(env, "bind", errno);
  if (listen(fd, (int)arg_i64(env, a[2])) < 0) return throw_errno(env, "listen", errno);
  return NULL;
}

/* accept(fd): new non-blocking fd, or -1 when none is pending */
static napi_value n_accept(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  int fd = accept4((int)arg_i64(env, a[0]), NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) { if (errno == EAGAIN || errno == ECONNABORTED) return num(env, -1); return throw_errno(env, "accept4", errno); }
  return num(env, fd);
}

/* connect(fd, path): 0 when connected, -1 when in progress (EINPROGRESS/EAGAIN) */
static napi_value n_connect(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  struct sockaddr_un sa;
  if (!sun_of(env, a[1], &sa)) return NULL;
  if (connect((int)arg_i64(env, a[0]), (struct sockaddr *)&sa, sizeof sa) < 0) {
    if (errno == EINPROGRESS || errno == EAGAIN) return num(env, -1);
    return throw_errno(env, "connect", errno);
  }
  return num(env, 0);
}

/* sendv(fd, buffers[]): sendmsg with MSG_NOSIGNAL|MSG_DONTWAIT; bytes, or -1 when it would block */
static napi_value n_sendv(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  uint32_t cnt;
  CHECK(napi_get_array_length(env, a[1], &cnt));
  if (cnt > 1024) { napi_throw_range_error(env, NULL, "too many iovecs"); return NULL; }
  struct iovec iov[1024];
  for (uint32_t i = 0; i < cnt; i++) {
    napi_value e;
    CHECK(napi_get_element(env, a[1], i, &e));
    if (!buffer_of(env, e, &iov[i].iov_base, &iov[i].iov_len)) { napi_throw_type_error(env, NULL, "not a buffer"); return NULL; }
  }
  struct msghdr m;
  memset(&m, 0, sizeof m);
  m.msg_iov = iov;
  m.msg_iovlen = cnt;
  ssize_t n = sendmsg((int)arg_i64(env, a[0]), &m, MSG_NOSIGNAL | MSG_DONTWAIT);
  if (n < 0) { if (errno == EAGAIN) return num(env, -1); return throw_errno(env, "sendmsg", errno); }
  return num(env, n);
}

#define MAX_PASSED_FDS 16

/*
 * sendFds(fd, data, fds): one sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT) of `data` (at least one byte:
 * a stream socket carries no ancillary data without) with `fds` attached as SCM_RIGHTS.
 * Bytes sent, or -1 when it would block.
 */
static napi_value n_send_fds(napi_env env, napi_callback_info info) {
  napi_value a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  struct iovec iov;
  if (!buffer_of(env, a[1], &iov.iov_base, &iov.iov_len)) { napi_throw_type_error(env, NULL, "not a buffer"); return NULL; }
  uint32_t cnt;
  CHECK(napi_get_array_length(env, a[2], &cnt));
  if (cnt > MAX_PASSED_FDS) { napi_throw_range_error(env, NULL, "too many fds"); return NULL; }
  if (cnt > 0 && iov.iov_len == 0) { napi_throw_range_error(env, NULL, "sendFds: fds need at least one data byte"); return NULL; }
  int fds[MAX_PASSED_FDS];
  for (uint32_t i = 0; i < cnt; i++) {
    napi_value e;
    CHECK(napi_get_element(env, a[2], i, &e));
    fds[i] = (int)arg_i64(env, e);
  }
  union { char buf[CMSG_SPACE(sizeof(int) * MAX_PASSED_FDS)]; struct cmsghdr align; } u;
  memset(&u, 0, sizeof u);
  struct msghdr m;
  memset(&m, 0, sizeof m);
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  if (cnt > 0) {
    m.msg_control = u.buf;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * cnt);
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * cnt);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * cnt);
  }
  ssize_t n = sendmsg((int)arg_i64(env, a[0]), &m, MSG_NOSIGNAL | MSG_DONTWAIT);
  if (n < 0) { if (errno == EAGAIN) return num(env, -1); return throw_errno(env, "sendmsg", errno); }
  return num(env, n);
}

/*
 * recvFds(fd, data, maxFds): one recvmsg(MSG_DONTWAIT | MSG_CMSG_CLOEXEC) into `data`, taking at
 * most maxFds (<= 16) SCM_RIGHTS fds. { bytes, fds }; bytes -1 when it would block, 0 at EOF.
 * More fds than maxFds: the ones received are closed and it throws (the rest the kernel drops).
 */
static napi_value n_recv_fds(napi_env env, napi_callback_info info) {
  napi_value a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  struct iovec iov;
  if (!buffer_of(env, a[1], &iov.iov_base, &iov.iov_len)) { napi_throw_type_error(env, NULL, "not a buffer"); return NULL; }
  int64_t max = arg_i64(env, a[2]);
  if (max < 0 || max > MAX_PASSED_FDS) { napi_throw_range_error(env, NULL, "maxFds out of range"); return NULL; }
  union { char buf[CMSG_SPACE(sizeof(int) * MAX_PASSED_FDS)]; struct cmsghdr align; } u;
  memset(&u, 0, sizeof u);
  struct msghdr m;
  memset(&m, 0, sizeof m);
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  if (max > 0) {
    m.msg_control = u.buf;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)max);
  }
  ssize_t n = recvmsg((int)arg_i64(env, a[0]), &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (n < 0 && errno != EAGAIN) return throw_errno(env, "recvmsg", errno);
  int fds[MAX_PASSED_FDS];
  uint32_t cnt = 0;
  if (n >= 0 && m.msg_controllen > 0) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < k; i++) {
        int fd;
        memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        if (cnt < MAX_PASSED_FDS) fds[cnt++] = fd; else close(fd);
      }
    }
  }
  if (n >= 0 && (m.msg_flags & MSG_CTRUNC)) {
    for (uint32_t i = 0; i < cnt; i++) close(fds[i]);
    napi_throw_range_error(env, NULL, "recvmsg: more fds than maxFds (all closed)");
    return NULL;
  }
  napi_value r, arr;
  CHECK(napi_create_object(env, &r));
  CHECK(napi_set_named_property(env, r, "bytes", num(env, n < 0 ? -1 : n)));
  CHECK(napi_create_array_with_length(env, cnt, &arr));
  for (uint32_t i = 0; i < cnt; i++) CHECK(napi_set_element(env, arr, i, num(env, fds[i])));
  CHECK(napi_set_named_property(env, r, "fds", arr));
  return r;
}

/* shutdown(fd, how) */
static napi_value n_shutdown(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  if (shutdown((int)arg_i64(env, a[0]), (int)arg_i64(env, a[1])) < 0) return throw_errno(env, "shutdown", errno);
  return NULL;
}

/* ---- jailer (helper F, issue 14): the syscalls typervisor-jailer needs and Node lacks ----
 * Thin wrappers only; the order of the steps and every check live in src/jailer/. Namespace
 * calls (unshare, setns) and pivot_root act on the CALLING THREAD only (Node has other threads):
 * src/jailer/jail.ts makes every jail step from the main JS thread, with synchronous calls. */
#include <sched.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* A C string from a JS string into buf (size 4096); 0 (and a pending exception) when too long
 * or not a string. A null/undefined value gives *out = NULL when allow_null. */
static int path_of(napi_env env, napi_value v, char *buf, const char **out, int allow_null) {
  napi_valuetype t;
  napi_typeof(env, v, &t);
  if (allow_null && (t == napi_null || t == napi_undefined)) { *out = NULL; return 1; }
  size_t n;
  if (t != napi_string || napi_get_value_string_utf8(env, v, NULL, 0, &n) != napi_ok || n >= 4096) {
    napi_throw_type_error(env, NULL, "typervisor native: expected a string shorter than 4096 bytes");
    return 0;
  }
  napi_get_value_string_utf8(env, v, buf, 4096, &n);
  *out = buf;
  return 1;
}

/* A NULL-terminated char*[] from a JS string array (at most 1024 entries, each < 64 KiB);
 * free with free_strv. NULL (and a pending exception) on a bad argument. */
static char **strv_of(napi_env env, napi_value arr) {
  bool is; uint32_t n;
  if (napi_is_array(env, arr, &is) != napi_ok || !is || napi_get_array_length(env, arr, &n) != napi_ok || n > 1024) {
    napi_throw_type_error(env, NULL, "typervisor native: expected an array of at most 1024 strings");
    return NULL;
  }
  char **v = calloc(n + 1, sizeof *v);
  if (!v) { napi_throw_error(env, NULL, "typervisor native: out of memory"); return NULL; }
  for (uint32_t i = 0; i < n; i++) {
    napi_value e; size_t len; napi_valuetype t;
    if (napi_get_element(env, arr, i, &e) != napi_ok || napi_typeof(env, e, &t) != napi_ok || t != napi_string ||
        napi_get_value_string_utf8(env, e, NULL, 0, &len) != napi_ok || len >= 65536 ||
        (v[i] = malloc(len + 1)) == NULL) {
      for (uint32_t j = 0; j < i; j++) free(v[j]);
      free(v);
      napi_throw_type_error(env, NULL, "typervisor native: expected an array of strings (each < 64 KiB)");
      return NULL;
    }
    napi_get_value_string_utf8(env, e, v[i], len + 1, &len);
  }
  return v;
}

static void free_strv(char **v) {
  if (!v) return;
  for (char **p = v; *p; p++) free(*p);
  free(v);
}

/* unshare(flags): this thread only for CLONE_NEWNS/NEWNET; CLONE_NEWPID: this thread's children. */
static napi_value n_unshare(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  if (unshare((int)arg_i64(env, a[0])) < 0) return throw_errno(env, "unshare", errno);
  return NULL;
}

/* mount(source | null, target, fstype | null, flags, data | null) */
static napi_value n_mount(napi_env env, napi_callback_info info) {
  napi_value a[5];
  if (!get_args(env, info, 5, a)) return NULL;
  char sb[4096], tb[4096], fb[4096], db[4096];
  const char *src, *tgt, *fs, *data;
  if (!path_of(env, a[0], sb, &src, 1) || !path_of(env, a[1], tb, &tgt, 0) ||
      !path_of(env, a[2], fb, &fs, 1) || !path_of(env, a[4], db, &data, 1)) return NULL;
  if (mount(src, tgt, fs, (unsigned long)arg_u64(env, a[3]), data) < 0) return throw_errno(env, "mount", errno);
  return NULL;
}

/* umount2(target, flags) */
static napi_value n_umount2(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  char tb[4096]; const char *tgt;
  if (!path_of(env, a[0], tb, &tgt, 0)) return NULL;
  if (umount2(tgt, (int)arg_i64(env, a[1])) < 0) return throw_errno(env, "umount2", errno);
  return NULL;
}

/* pivot_root(newRoot, putOld) */
static napi_value n_pivot_root(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  char nb[4096], ob[4096]; const char *nr, *po;
  if (!path_of(env, a[0], nb, &nr, 0) || !path_of(env, a[1], ob, &po, 0)) return NULL;
  if (syscall(SYS_pivot_root, nr, po) < 0) return throw_errno(env, "pivot_root", errno);
  return NULL;
}

/* chroot(path) and chdir(path): of this thread's fs_struct (unshared by unshare(CLONE_NEWNS)). */
static napi_value n_chroot(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  char pb[4096]; const char *p;
  if (!path_of(env, a[0], pb, &p, 0)) return NULL;
  if (chroot(p) < 0) return throw_errno(env, "chroot", errno);
  return NULL;
}

static napi_value n_chdir(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  char pb[4096]; const char *p;
  if (!path_of(env, a[0], pb, &p, 0)) return NULL;
  if (chdir(p) < 0) return throw_errno(env, "chdir", errno);
  return NULL;
}

/* mknod(path, mode (type and permission bits), major, minor) */
static napi_value n_mknod(napi_env env, napi_callback_info info) {
  napi_value a[4];
  if (!get_args(env, info, 4, a)) return NULL;
  char pb[4096]; const char *p;
  if (!path_of(env, a[0], pb, &p, 0)) return NULL;
  dev_t dev = makedev((unsigned)arg_i64(env, a[2]), (unsigned)arg_i64(env, a[3]));
  if (mknod(p, (mode_t)arg_i64(env, a[1]), dev) < 0) return throw_errno(env, "mknod", errno);
  return NULL;
}

/* setns(fd, nstype): this thread only. */
static napi_value n_setns(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  if (setns((int)arg_i64(env, a[0]), (int)arg_i64(env, a[1])) < 0) return throw_errno(env, "setns", errno);
  return NULL;
}

/* setrlimit(resource, soft, hard): process-wide. -1 is RLIM_INFINITY. */
static napi_value n_setrlimit(napi_env env, napi_callback_info info) {
  napi_value a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  int64_t soft = arg_i64(env, a[1]), hard = arg_i64(env, a[2]);
  struct rlimit r = { soft < 0 ? RLIM_INFINITY : (rlim_t)soft, hard < 0 ? RLIM_INFINITY : (rlim_t)hard };
  if (setrlimit((int)arg_i64(env, a[0]), &r) < 0) return throw_errno(env, "setrlimit", errno);
  return NULL;
}

/* dup2(oldfd, newfd) */
static napi_value n_dup2(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  if (dup2((int)arg_i64(env, a[0]), (int)arg_i64(env, a[1])) < 0) return throw_errno(env, "dup2", errno);
  return NULL;
}

/* close_range(first, ~0U, CLOSE_RANGE_CLOEXEC): every fd >= first closes at the next execve. */
static napi_value n_cloexec_from(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  if (syscall(SYS_close_range, (unsigned)arg_i64(env, a[0]), ~0U, CLOSE_RANGE_CLOEXEC) < 0)
    return throw_errno(env, "close_range", errno);
  return NULL;
}

/* fcntl(fd, F_SETFD, 0): fd stays open across execve (Node marks its stdio close-on-exec). */
static napi_value n_set_inheritable(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  if (fcntl((int)arg_i64(env, a[0]), F_SETFD, 0) < 0) return throw_errno(env, "fcntl", errno);
  return NULL;
}

/* setNonBlocking(fd, on): sets or clears O_NONBLOCK (fcntl F_GETFL/F_SETFL); returns whether it
 * was set before. For the console's stdin pipe, read on readiness without ever blocking. */
static napi_value n_set_non_blocking(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  int fd = (int)arg_i64(env, a[0]);
  bool on = false;
  CHECK(napi_get_value_bool(env, a[1], &on));
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) return throw_errno(env, "fcntl(F_GETFL)", errno);
  int want = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
  if (want != fl && fcntl(fd, F_SETFL, want) < 0) return throw_errno(env, "fcntl(F_SETFL)", errno);
  napi_value r;
  CHECK(napi_get_boolean(env, (fl & O_NONBLOCK) != 0, &r));
  return r;
}

/* execve(path, argv, envp): returns only by throwing. Replaces every thread of the process. */
static napi_value n_execve(napi_env env, napi_callback_info info) {
  napi_value a[3];
  if (!get_args(env, info, 3, a)) return NULL;
  char pb[4096]; const char *p;
  if (!path_of(env, a[0], pb, &p, 0)) return NULL;
  char **argv = strv_of(env, a[1]);
  if (!argv) return NULL;
  char **envp = strv_of(env, a[2]);
  if (!envp) { free_strv(argv); return NULL; }
  execve(p, argv, envp);
  int e = errno;
  free_strv(argv); free_strv(envp);
  return throw_errno(env, "execve", e);
}

/* posix_spawn(path, argv, envp) from this thread (its namespaces, root and credentials), with
 * POSIX_SPAWN_SETSID when newSession: the child's pid. */
static napi_value n_spawn(napi_env env, napi_callback_info info) {
  napi_value a[4];
  if (!get_args(env, info, 4, a)) return NULL;
  char pb[4096]; const char *p;
  if (!path_of(env, a[0], pb, &p, 0)) return NULL;
  bool new_session = false;
  napi_get_value_bool(env, a[3], &new_session);
  char **argv = strv_of(env, a[1]);
  if (!argv) return NULL;
  char **envp = strv_of(env, a[2]);
  if (!envp) { free_strv(argv); return NULL; }
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  if (new_session) posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID);
  pid_t pid;
  int e = posix_spawn(&pid, p, NULL, &attr, argv, envp);
  posix_spawnattr_destroy(&attr);
  free_strv(argv); free_strv(envp);
  if (e != 0) return throw_errno(env, "posix_spawn", e);
  return num(env, pid);
}

#define JAILER_EXPORTS                                                                  \
  EXPORT("unshare", n_unshare), EXPORT("mount", n_mount), EXPORT("umount2", n_umount2), \
  EXPORT("pivotRoot", n_pivot_root), EXPORT("chroot", n_chroot), EXPORT("chdir", n_chdir), \
  EXPORT("mknod", n_mknod), EXPORT("setns", n_setns), EXPORT("setrlimit", n_setrlimit),   \
  EXPORT("dup2", n_dup2), EXPORT("cloexecFrom", n_cloexec_from), EXPORT("execve", n_execve), \
  EXPORT("spawn", n_spawn), EXPORT("setInheritable", n_set_inheritable),                 \
  EXPORT("setNonBlocking", n_set_non_blocking),
/* ---- end of jailer ---- */

/* ---- issue 18 part B (r5-vcpu): vCPU runner threads ----
 * A runner is a pthread that only loops on ioctl(vcpu_fd, KVM_RUN): no VMM logic. It shares
 * three int32 words with JavaScript (an Int32Array over a SharedArrayBuffer):
 *   word[0] state: IDLE 0 (JS owns the vCPU), RUN 1 (JS asks for one KVM_RUN), EXITED 2 (KVM_RUN
 *           returned: JS owns the vCPU and its kvm_run), QUIT 3 (JS asks the thread to end),
 *           DEAD 4 (the thread is ending: join it);
 *   word[1] errno of the last KVM_RUN (0: a real exit to handle);
 *   word[2] KVM_RUN calls made (wraps).
 * After each KVM_RUN it stores EXITED (unless QUIT was set meanwhile) and writes 1 to an eventfd
 * the JS side blocks on (V8's Atomics.wait does not sleep on the futex of the address, so a
 * native FUTEX_WAKE could not wake it). It then waits a bounded moment (the `spin` given at
 * start, in pause instructions; 0: none) for the answer, which usually comes that fast, and then
 * sleeps in FUTEX_WAIT until the word changes: a wake-up of a sleeping thread on an idle CPU
 * costs far more than that on a shared (virtual) machine (~70 us measured), twice per exit. Kicks are the existing kick signal (installKickHandler) with kvm_run's
 * immediate_exit set by JS. A seccomp program given at start is installed by the thread itself,
 * stacked on the process filter, before it runs anything else. */
#include <linux/futex.h>
#define VR_MAX 1024
#define VR_IDLE 0
#define VR_RUN 1
#define VR_EXITED 2
#define VR_QUIT 3
#define VR_DEAD 4
#define VR_KVM_RUN 0xae80 /* _IO(KVMIO, 0x80) */
#define VR_STACK (64 * 1024)
#define VR_SPIN_MAX 100000

struct vrunner {
  int used;
  uint32_t gen;
  pthread_t tid;
  int kickable; /* under vr_lock: the thread exists and is not joined */
  int vcpu_fd, efd, sig;
  int32_t *word;
  napi_env env;
  napi_ref ref; /* keeps the Int32Array (and its SharedArrayBuffer) alive */
  struct sock_filter *prog;
  unsigned short prog_len;
  char name[16];
  pthread_mutex_t m;
  pthread_cond_t c;
  int ready, setup_err;
  int spin; /* pause instructions to wait for the answer to an exit before sleeping */
};
static struct vrunner vr_table[VR_MAX];
static pthread_mutex_t vr_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t vr_gen = 0;

static void vr_wake(int32_t *w) { syscall(SYS_futex, w, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0); }
static void vr_ring(int efd) {
  uint64_t one = 1;
  while (write(efd, &one, sizeof one) < 0 && errno == EINTR) {}
}

static void *vr_main(void *p) {
  struct vrunner *r = p;
  sigset_t set;
  sigfillset(&set);
  sigdelset(&set, r->sig);
  pthread_sigmask(SIG_SETMASK, &set, NULL);
  prctl(PR_SET_NAME, r->name, 0, 0, 0);
  int err = 0;
  if (r->prog) {
    struct sock_fprog fp = { .len = r->prog_len, .filter = r->prog };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fp) < 0)
      err = errno ? errno : EINVAL;
  }
  pthread_mutex_lock(&r->m);
  r->ready = 1;
  r->setup_err = err;
  pthread_cond_signal(&r->c);
  pthread_mutex_unlock(&r->m);
  if (err) return NULL;
  int32_t *w = r->word;
  for (;;) {
    int32_t s = __atomic_load_n(&w[0], __ATOMIC_SEQ_CST);
    if (s == VR_QUIT) break;
    if (s != VR_RUN) {
      /* sleeps until JS changes the word (a kick just returns EINTR: look again) */
      syscall(SYS_futex, &w[0], FUTEX_WAIT_PRIVATE, s, NULL, NULL, 0);
      continue;
    }
    int rc = ioctl(r->vcpu_fd, VR_KVM_RUN, 0);
    __atomic_store_n(&w[1], rc < 0 ? errno : 0, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&w[2], 1, __ATOMIC_SEQ_CST);
    int32_t expected = VR_RUN;
    __atomic_compare_exchange_n(&w[0], &expected, VR_EXITED, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    vr_ring(r->efd);
    /* A short bounded wait before sleeping: the answer to an exit usually comes within
     * microseconds, and a sleeping thread on an idle CPU takes far longer to wake. */
    for (int i = 0; i < r->spin && __atomic_load_n(&w[0], __ATOMIC_ACQUIRE) == VR_EXITED; i++)
      __builtin_ia32_pause();
  }
  __atomic_store_n(&w[0], VR_DEAD, __ATOMIC_SEQ_CST);
  vr_ring(r->efd);
  return NULL;
}

/* The runner of a handle (gen << 10 | slot), or NULL; call under vr_lock. */
static struct vrunner *vr_find(int64_t h) {
  if (h < 0) return NULL;
  int64_t i = h & (VR_MAX - 1);
  struct vrunner *r = &vr_table[i];
  if (!r->used || (int64_t)r->gen != (h >> 10)) return NULL;
  return r;
}

static void vr_free(struct vrunner *r) {
  free(r->prog);
  r->prog = NULL;
  pthread_mutex_destroy(&r->m);
  pthread_cond_destroy(&r->c);
  r->used = 0;
}

/* Joins a runner; called with the runner quitting. Blocks only as long as it takes the thread to
 * leave KVM_RUN (it is kicked every 10 ms, up to ~5 s; then it is detached and leaked). */
static void vr_stop_and_join(struct vrunner *r) {
  __atomic_store_n(&r->word[0], VR_QUIT, __ATOMIC_SEQ_CST);
  vr_wake(&r->word[0]);
  for (int i = 0; i < 500; i++) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 10 * 1000 * 1000;
    if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
    if (pthread_timedjoin_np(r->tid, NULL, &ts) == 0) return;
    pthread_kill(r->tid, r->sig);
  }
  pthread_detach(r->tid);
}

/* The worker that owns a runner is ending (or terminated) before joining it: no runner may
 * outlive the memory of its words. One hook per runner (Node refuses the same hook twice). */
static void vr_env_cleanup(void *arg) {
  struct vrunner *r = arg;
  pthread_mutex_lock(&vr_lock);
  int mine = r->used && r->kickable;
  if (mine) r->kickable = 0;
  pthread_mutex_unlock(&vr_lock);
  if (!mine) return;
  vr_stop_and_join(r);
  napi_delete_reference(r->env, r->ref);
  pthread_mutex_lock(&vr_lock);
  vr_free(r);
  pthread_mutex_unlock(&vr_lock);
}

/*
 * vcpuRunnerStart(vcpuFd, words: Int32Array, index, eventFd, kickSignal, name, program | null,
 * spin = 0): handle. words[index..index+2] are the runner's words (word[0] must be IDLE); program is a
 * seccomp program (1 to 4096 struct sock_filter) the thread installs on itself first; the call
 * returns once it has (and throws if it could not, the thread gone).
 */
static napi_value n_vcpu_runner_start(napi_env env, napi_callback_info info) {
  napi_value a[8];
  size_t argc = 8;
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok || argc < 7) {
    napi_throw_type_error(env, NULL, "typervisor native: too few arguments");
    return NULL;
  }
  /* optional: the pause instructions to wait for an answer before sleeping (0: sleep at once) */
  int64_t spin = 0;
  if (argc >= 8) {
    napi_valuetype st;
    napi_typeof(env, a[7], &st);
    if (st != napi_undefined) spin = arg_i64(env, a[7]);
  }
  if (spin < 0 || spin > VR_SPIN_MAX) {
    napi_throw_range_error(env, NULL, "vcpuRunnerStart: spin must be 0 to 100000 pause instructions");
    return NULL;
  }
  int vcpu_fd = (int)arg_i64(env, a[0]);
  int64_t index = arg_i64(env, a[2]);
  int efd = (int)arg_i64(env, a[3]);
  int sig = (int)arg_i64(env, a[4]);
  if (vcpu_fd < 0 || fcntl(vcpu_fd, F_GETFD) < 0) return throw_errno(env, "vcpuRunnerStart(vcpu fd)", EBADF);
  if (efd < 0 || fcntl(efd, F_GETFD) < 0) return throw_errno(env, "vcpuRunnerStart(eventfd)", EBADF);
  if (sig < SIGRTMIN || sig > SIGRTMAX) {
    napi_throw_range_error(env, NULL, "vcpuRunnerStart: the kick signal must be a real-time signal");
    return NULL;
  }
  bool is;
  napi_typedarray_type type; size_t n; void *data; napi_value ab; size_t off;
  if (napi_is_typedarray(env, a[1], &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, a[1], &type, &n, &data, &ab, &off) != napi_ok || type != napi_int32_array) {
    napi_throw_type_error(env, NULL, "vcpuRunnerStart: words must be an Int32Array (over a SharedArrayBuffer)");
    return NULL;
  }
  if (index < 0 || (uint64_t)index + 3 > n) {
    napi_throw_range_error(env, NULL, "vcpuRunnerStart: index out of the words' range");
    return NULL;
  }
  int32_t *word = (int32_t *)data + index;
  if (__atomic_load_n(&word[0], __ATOMIC_SEQ_CST) != VR_IDLE) {
    napi_throw_range_error(env, NULL, "vcpuRunnerStart: the runner's state word is not IDLE (0)");
    return NULL;
  }
  char name[16];
  size_t nl;
  CHECK(napi_get_value_string_utf8(env, a[5], name, sizeof name, &nl));
  napi_valuetype pt;
  napi_typeof(env, a[6], &pt);
  struct sock_filter *prog = NULL;
  size_t plen = 0;
  if (pt != napi_null && pt != napi_undefined) {
    void *pd; size_t pl;
    if (!buffer_of(env, a[6], &pd, &pl) || pl == 0 || pl % sizeof(struct sock_filter) != 0 ||
        pl / sizeof(struct sock_filter) > SECCOMP_MAX_INSNS) {
      napi_throw_range_error(env, NULL, "vcpuRunnerStart: program must be 1 to 4096 instructions of 8 bytes");
      return NULL;
    }
    prog = malloc(pl);
    if (!prog) return throw_errno(env, "malloc", ENOMEM);
    memcpy(prog, pd, pl);
    plen = pl / sizeof(struct sock_filter);
  }
  pthread_mutex_lock(&vr_lock);
  int slot = -1;
  for (int i = 0; i < VR_MAX; i++) if (!vr_table[i].used) { slot = i; break; }
  if (slot < 0) {
    pthread_mutex_unlock(&vr_lock);
    free(prog);
    return throw_errno(env, "vcpuRunnerStart (1024 runners at most)", EAGAIN);
  }
  struct vrunner *r = &vr_table[slot];
  memset(r, 0, sizeof *r);
  r->used = 1;
  r->gen = ++vr_gen & 0xfffff;
  if (r->gen == 0) r->gen = vr_gen = 1;
  pthread_mutex_unlock(&vr_lock);
  r->vcpu_fd = vcpu_fd; r->efd = efd; r->sig = sig; r->word = word; r->env = env;
  r->prog = prog; r->prog_len = (unsigned short)plen; r->spin = (int)spin;
  memcpy(r->name, name, sizeof name);
  pthread_mutex_init(&r->m, NULL);
  pthread_cond_init(&r->c, NULL);
  if (napi_create_reference(env, a[1], 1, &r->ref) != napi_ok) {
    pthread_mutex_lock(&vr_lock); vr_free(r); pthread_mutex_unlock(&vr_lock);
    napi_throw_error(env, NULL, "vcpuRunnerStart: napi_create_reference failed");
    return NULL;
  }
  napi_add_env_cleanup_hook(env, vr_env_cleanup, r);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, VR_STACK);
  int e = pthread_create(&r->tid, &attr, vr_main, r);
  pthread_attr_destroy(&attr);
  if (e != 0) {
    napi_remove_env_cleanup_hook(env, vr_env_cleanup, r);
    napi_delete_reference(env, r->ref);
    pthread_mutex_lock(&vr_lock); vr_free(r); pthread_mutex_unlock(&vr_lock);
    return throw_errno(env, "pthread_create", e);
  }
  pthread_mutex_lock(&r->m);
  while (!r->ready) pthread_cond_wait(&r->c, &r->m);
  int setup_err = r->setup_err;
  pthread_mutex_unlock(&r->m);
  if (setup_err) {
    pthread_join(r->tid, NULL);
    napi_remove_env_cleanup_hook(env, vr_env_cleanup, r);
    napi_delete_reference(env, r->ref);
    pthread_mutex_lock(&vr_lock); vr_free(r); pthread_mutex_unlock(&vr_lock);
    return throw_errno(env, "vcpuRunnerStart (the runner's seccomp filter)", setup_err);
  }
  pthread_mutex_lock(&vr_lock);
  r->kickable = 1;
  int64_t handle = ((int64_t)r->gen << 10) | slot;
  pthread_mutex_unlock(&vr_lock);
  return num(env, handle);
}

/* vcpuRunnerGo(handle): word[0] = RUN and wake the runner (from IDLE or EXITED only) */
static napi_value n_vcpu_runner_go(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  int64_t h = arg_i64(env, a[0]);
  pthread_mutex_lock(&vr_lock);
  struct vrunner *r = vr_find(h);
  int32_t *w = r && r->kickable ? r->word : NULL;
  pthread_mutex_unlock(&vr_lock);
  if (!w) return throw_errno(env, "vcpuRunnerGo (no such runner)", ESRCH);
  int32_t s = __atomic_load_n(&w[0], __ATOMIC_SEQ_CST);
  if (s != VR_IDLE && s != VR_EXITED) return throw_errno(env, "vcpuRunnerGo (the runner is not waiting)", EBUSY);
  __atomic_store_n(&w[0], VR_RUN, __ATOMIC_SEQ_CST);
  vr_wake(&w[0]);
  return NULL;
}

/* vcpuRunnerQuit(handle): word[0] = QUIT and wake it; a runner inside KVM_RUN needs a kick too */
static napi_value n_vcpu_runner_quit(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  int64_t h = arg_i64(env, a[0]);
  pthread_mutex_lock(&vr_lock);
  struct vrunner *r = vr_find(h);
  int32_t *w = r && r->kickable ? r->word : NULL;
  pthread_mutex_unlock(&vr_lock);
  if (!w) return throw_errno(env, "vcpuRunnerQuit (no such runner)", ESRCH);
  if (__atomic_load_n(&w[0], __ATOMIC_SEQ_CST) != VR_DEAD) {
    __atomic_store_n(&w[0], VR_QUIT, __ATOMIC_SEQ_CST);
    vr_wake(&w[0]);
  }
  return NULL;
}

/* vcpuRunnerKick(handle): the kick signal to the runner's thread; false when it is gone (any
 * thread may call this: the handle is checked under a lock, never a stale pthread_t) */
static napi_value n_vcpu_runner_kick(napi_env env, napi_callback_info info) {
  napi_value a[1], res;
  if (!get_args(env, info, 1, a)) return NULL;
  int64_t h = arg_i64(env, a[0]);
  pthread_mutex_lock(&vr_lock);
  struct vrunner *r = vr_find(h);
  int ok = r && r->kickable && pthread_kill(r->tid, r->sig) == 0;
  pthread_mutex_unlock(&vr_lock);
  CHECK(napi_get_boolean(env, ok, &res));
  return res;
}

/* vcpuRunnerJoin(handle): joins a runner that has ended (word[0] DEAD; EBUSY otherwise) and
 * frees its slot; from the thread (env) that started it */
static napi_value n_vcpu_runner_join(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  int64_t h = arg_i64(env, a[0]);
  pthread_mutex_lock(&vr_lock);
  struct vrunner *r = vr_find(h);
  if (!r || !r->kickable || r->env != env) {
    pthread_mutex_unlock(&vr_lock);
    return throw_errno(env, "vcpuRunnerJoin (no such runner of this thread)", ESRCH);
  }
  if (__atomic_load_n(&r->word[0], __ATOMIC_SEQ_CST) != VR_DEAD) {
    pthread_mutex_unlock(&vr_lock);
    return throw_errno(env, "vcpuRunnerJoin (the runner has not ended)", EBUSY);
  }
  r->kickable = 0;
  pthread_mutex_unlock(&vr_lock);
  pthread_join(r->tid, NULL);
  napi_remove_env_cleanup_hook(env, vr_env_cleanup, r);
  napi_delete_reference(env, r->ref);
  pthread_mutex_lock(&vr_lock);
  vr_free(r);
  pthread_mutex_unlock(&vr_lock);
  return NULL;
}

#define VCPU_RUNNER_EXPORTS                                                             \
  EXPORT("vcpuRunnerStart", n_vcpu_runner_start), EXPORT("vcpuRunnerGo", n_vcpu_runner_go), \
  EXPORT("vcpuRunnerQuit", n_vcpu_runner_quit), EXPORT("vcpuRunnerKick", n_vcpu_runner_kick), \
  EXPORT("vcpuRunnerJoin", n_vcpu_runner_join),
/* ---- end of vCPU runner threads ---- */

/* ---- issue 18 (r10-mainhub): an fd watched on the calling thread's own event loop ----
 * fdWatch(fd, callback): handle. libuv polls `fd` for readability (level-triggered) on the loop
 * of the thread that called (the main thread's, or a worker's) and calls `callback(status)`
 * there, each time, until fdUnwatch(handle); the callback drains the fd. A poll error is
 * reported once (status < 0, a libuv error code) and the polling stops. Meant for an eventfd other
 * threads write (the vCPU runners): they wake this thread's loop directly, with no libuv pool
 * thread in between. No VMM logic: a poll handle and a call. The fd must stay open while it is
 * watched (unwatch first, then close). */
#include <uv.h>
#define FW_MAX 256

struct fdwatch {
  uv_poll_t poll; /* first: the handle's memory is this struct's, freed by the close callback */
  napi_env env;
  napi_ref cb;
  napi_async_context ctx;
  int slot;
};
static struct fdwatch *fw_table[FW_MAX];
static uint32_t fw_gens[FW_MAX];
static pthread_mutex_t fw_lock = PTHREAD_MUTEX_INITIALIZER;

static void fw_on_poll(uv_poll_t *p, int status, int events) {
  (void)events;
  struct fdwatch *w = p->data;
  napi_env env = w->env;
  /* An error (status < 0) would be reported again at once: stop polling, say it once. */
  if (status < 0) uv_poll_stop(p);
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb, recv, arg, result;
  if (napi_get_reference_value(env, w->cb, &cb) == napi_ok && cb != NULL &&
      napi_get_global(env, &recv) == napi_ok && napi_create_int32(env, status, &arg) == napi_ok) {
    napi_status s = napi_make_callback(env, w->ctx, recv, cb, 1, &arg, &result);
    bool pending = false;
    if (s != napi_ok && napi_is_exception_pending(env, &pending) == napi_ok && pending) {
      napi_value e;
      if (napi_get_and_clear_last_exception(env, &e) == napi_ok) napi_fatal_exception(env, e);
    }
  }
  napi_close_handle_scope(env, scope);
}

static void fw_closed(uv_handle_t *h) { free(h); /* the fdwatch (poll is its first member) */ }

/* Stops and closes a watch taken out of the table (its thread, its env). */
static void fw_end(struct fdwatch *w) {
  uv_poll_stop(&w->poll);
  napi_delete_reference(w->env, w->cb);
  napi_async_destroy(w->env, w->ctx);
  uv_close((uv_handle_t *)&w->poll, fw_closed);
}

static void fw_env_cleanup(void *arg) {
  struct fdwatch *w = arg;
  pthread_mutex_lock(&fw_lock);
  int mine = fw_table[w->slot] == w;
  if (mine) fw_table[w->slot] = NULL;
  pthread_mutex_unlock(&fw_lock);
  if (mine) fw_end(w);
}

static napi_value n_fd_watch(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  int fd = (int)arg_i64(env, a[0]);
  napi_valuetype t;
  napi_typeof(env, a[1], &t);
  if (t != napi_function) {
    napi_throw_type_error(env, NULL, "fdWatch: the callback must be a function");
    return NULL;
  }
  if (fd < 0 || fcntl(fd, F_GETFD) < 0) return throw_errno(env, "fdWatch(fd)", EBADF);
  uv_loop_t *loop;
  CHECK(napi_get_uv_event_loop(env, &loop));
  struct fdwatch *w = calloc(1, sizeof *w);
  if (!w) return throw_errno(env, "fdWatch", ENOMEM);
  w->env = env;
  int e = uv_poll_init(loop, &w->poll, fd);
  if (e != 0) {
    free(w);
    return throw_errno(env, "fdWatch (uv_poll_init)", -e);
  }
  w->poll.data = w;
  napi_value name;
  if (napi_create_string_utf8(env, "typervisor.fdWatch", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_async_init(env, NULL, name, &w->ctx) != napi_ok) {
    uv_close((uv_handle_t *)&w->poll, fw_closed);
    napi_throw_error(env, NULL, "fdWatch: napi_async_init failed");
    return NULL;
  }
  if (napi_create_reference(env, a[1], 1, &w->cb) != napi_ok) {
    napi_async_destroy(env, w->ctx);
    uv_close((uv_handle_t *)&w->poll, fw_closed);
    napi_throw_error(env, NULL, "fdWatch: napi_create_reference failed");
    return NULL;
  }
  pthread_mutex_lock(&fw_lock);
  int slot = -1;
  for (int i = 0; i < FW_MAX; i++)
    if (!fw_table[i]) { slot = i; break; }
  if (slot >= 0) {
    fw_table[slot] = w;
    w->slot = slot;
    fw_gens[slot] = (fw_gens[slot] + 1) & 0xfffff;
  }
  uint32_t gen = slot >= 0 ? fw_gens[slot] : 0;
  pthread_mutex_unlock(&fw_lock);
  if (slot < 0) {
    napi_delete_reference(env, w->cb);
    napi_async_destroy(env, w->ctx);
    uv_close((uv_handle_t *)&w->poll, fw_closed);
    return throw_errno(env, "fdWatch (256 watches at most)", EAGAIN);
  }
  e = uv_poll_start(&w->poll, UV_READABLE, fw_on_poll);
  if (e != 0) {
    pthread_mutex_lock(&fw_lock);
    fw_table[slot] = NULL;
    pthread_mutex_unlock(&fw_lock);
    fw_end(w);
    return throw_errno(env, "fdWatch (uv_poll_start)", -e);
  }
  napi_add_env_cleanup_hook(env, fw_env_cleanup, w);
  return num(env, ((int64_t)gen << 8) | slot);
}

/* fdUnwatch(handle): stops the watch (from the thread that made it); a stale handle is ignored */
static napi_value n_fd_unwatch(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  int64_t h = arg_i64(env, a[0]);
  if (h < 0) return NULL;
  int slot = (int)(h & (FW_MAX - 1));
  pthread_mutex_lock(&fw_lock);
  struct fdwatch *w = fw_table[slot];
  int mine = w && (int64_t)fw_gens[slot] == (h >> 8) && w->env == env;
  if (mine) fw_table[slot] = NULL;
  pthread_mutex_unlock(&fw_lock);
  if (!mine) return NULL;
  napi_remove_env_cleanup_hook(env, fw_env_cleanup, w);
  fw_end(w);
  return NULL;
}

#define FD_WATCH_EXPORTS EXPORT("fdWatch", n_fd_watch), EXPORT("fdUnwatch", n_fd_unwatch),
/* ---- end of fd watch ---- */

/* ---- issue 18 (r11-loopvcpu): a vCPU run by the calling thread while its event loop is idle ----
 * The worker-mode shape (the thread that calls KVM_RUN handles the exit itself, no hand-off per
 * exit) without a worker: the main thread runs the vCPU. A uv_prepare_t on the caller's loop
 * runs, just before libuv would block in epoll_wait, ioctl(KVM_RUN) for as long as the loop has
 * nothing due (uv_backend_timeout() != 0) and JS keeps saying RUN; after each KVM_RUN it stores
 * the result in the same three words as a runner thread (state, errno, runs) and calls the JS
 * callback, which handles the exit and may say RUN again. A watcher pthread (no VMM logic)
 * stands in for the epoll_wait the loop skips: while armed it polls the loop's backend fd with
 * the loop's timeout, and when the loop has work (an fd ready, a timer due) it sets kvm_run's
 * immediate_exit and sends the kick signal to the caller if it is inside KVM_RUN; the prepare
 * then returns and the loop runs. One at a time per process (it holds its thread's loop). */
#include <time.h>
#define LR_IDLE 0
#define LR_ARMED 1
#define LR_FIRED 2
#define LR_QUIT 3

static struct lrunner {
  int used, active;
  uint32_t gen;
  napi_env env;
  uv_loop_t *loop;
  uv_prepare_t *prep;
  napi_ref words_ref, run_ref, cb;
  napi_async_context ctx;
  int32_t *word;
  struct kvm_run_head { uint8_t request_interrupt_window; uint8_t immediate_exit; } *run;
  int vcpu_fd, sig, wefd;
  int ep_idle, ep_armed; /* epoll sets: {wefd}; {wefd, the loop's backend fd} */
  pthread_t owner, wtid;
  int wthread;
  struct sock_filter *prog;
  unsigned short prog_len;
  pthread_mutex_t m;
  pthread_cond_t c;
  int wready, werr;
  /* shared with the watcher */
  int32_t wstate;   /* LR_*: under m */
  uint32_t wgen;    /* under m: bumped at each arm */
  int64_t deadline; /* ms on lr_clock (libuv's loop clock), -1 none: under m */
  int32_t ready;    /* atomic: the watcher found the loop with work since the last arm */
  int32_t in_run;   /* atomic: the owner is inside (or entering) KVM_RUN */
  /* the owner's own */
  int armed;        /* the watcher is armed by this prepare (disarmed when it returns) */
  int in_cb;        /* inside the JS callback: loopRunnerStep may run the vCPU */
} lr;
static uint32_t lr_gen = 0;
/* The clock of libuv's loop time (uv_now): its "fast" clock, CLOCK_MONOTONIC_COARSE where that
 * ticks at 1 ms or finer, else CLOCK_MONOTONIC. The watcher reads the same one, so that a
 * deadline taken from the loop's cached time (uv_now + uv_backend_timeout: a timer's due time)
 * fires neither early nor late. Set by loopRunnerStart. */
static clockid_t lr_clock = CLOCK_MONOTONIC;

static int64_t lr_now_ms(void) {
  struct timespec ts;
  clock_gettime(lr_clock, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void lr_poke(void) {
  uint64_t one = 1;
  while (write(lr.wefd, &one, sizeof one) < 0 && errno == EINTR) {}
}

static void *lr_watch_main(void *p) {
  (void)p;
  sigset_t set;
  sigfillset(&set);
  pthread_sigmask(SIG_SETMASK, &set, NULL);
  prctl(PR_SET_NAME, "tv-vloopwatch", 0, 0, 0);
  int err = 0;
  if (lr.prog) {
    struct sock_fprog fp = { .len = lr.prog_len, .filter = lr.prog };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fp) < 0)
      err = errno ? errno : EINVAL;
  }
  pthread_mutex_lock(&lr.m);
  lr.wready = 1;
  lr.werr = err;
  pthread_cond_signal(&lr.c);
  if (err) {
    pthread_mutex_unlock(&lr.m);
    return NULL;
  }
  for (;;) {
    int32_t st = lr.wstate;
    if (st == LR_QUIT) break;
    uint32_t gen = lr.wgen;
    int64_t dl = lr.deadline;
    pthread_mutex_unlock(&lr.m);
    /* Armed: the loop's fd and our eventfd, until the deadline. Otherwise only our eventfd.
     * (epoll, not poll: the process filter this thread inherits allows epoll_wait.) */
    int armed = st == LR_ARMED;
    int timeout = -1;
    if (armed && dl >= 0) {
      int64_t left = dl - lr_now_ms();
      timeout = left < 0 ? 0 : left > 0x7fffffff ? 0x7fffffff : (int)left;
    }
    struct epoll_event ev[2];
    int rc = epoll_wait(armed ? lr.ep_armed : lr.ep_idle, ev, 2, timeout);
    int loop_ready = 0;
    for (int i = 0; i < rc; i++) {
      if (ev[i].data.u32 == 1) loop_ready = 1;
      else {
        uint64_t v;
        while (read(lr.wefd, &v, sizeof v) < 0 && errno == EINTR) {}
      }
    }
    int fire = armed && (rc == 0 || loop_ready || (rc < 0 && errno != EINTR));
    pthread_mutex_lock(&lr.m);
    if (fire && lr.wstate == LR_ARMED && lr.wgen == gen) {
      lr.wstate = LR_FIRED;
      __atomic_store_n(&lr.ready, 1, __ATOMIC_SEQ_CST);
      __atomic_store_n(&lr.run->immediate_exit, 1, __ATOMIC_SEQ_CST);
      if (__atomic_load_n(&lr.in_run, __ATOMIC_SEQ_CST)) pthread_kill(lr.owner, lr.sig);
    }
  }
  pthread_mutex_unlock(&lr.m);
  return NULL;
}

/* Arms the watcher with a deadline (ms, -1: none), or moves an armed one's deadline earlier. */
static void lr_arm(int64_t dl) {
  pthread_mutex_lock(&lr.m);
  int poke = 1;
  if (lr.wstate == LR_ARMED) {
    if (dl < 0 || (lr.deadline >= 0 && lr.deadline <= dl)) poke = 0; /* no earlier: as is */
    else lr.deadline = dl;
  } else {
    lr.wstate = LR_ARMED;
    lr.wgen++;
    lr.deadline = dl;
    __atomic_store_n(&lr.ready, 0, __ATOMIC_SEQ_CST);
  }
  pthread_mutex_unlock(&lr.m);
  if (poke) lr_poke();
}

static void lr_disarm(void) {
  pthread_mutex_lock(&lr.m);
  int was = lr.wstate;
  if (was == LR_ARMED || was == LR_FIRED) lr.wstate = LR_IDLE;
  pthread_mutex_unlock(&lr.m);
  if (was == LR_ARMED) lr_poke(); /* it polls the loop's fd: stop that */
}

static void lr_call(void) {
  napi_env env = lr.env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb, recv, arg, result;
  if (napi_get_reference_value(env, lr.cb, &cb) == napi_ok && cb != NULL &&
      napi_get_global(env, &recv) == napi_ok && napi_create_int32(env, 0, &arg) == napi_ok) {
    napi_status s = napi_make_callback(env, lr.ctx, recv, cb, 1, &arg, &result);
    bool pending = false;
    if (s != napi_ok && napi_is_exception_pending(env, &pending) == napi_ok && pending) {
      napi_value e;
      if (napi_get_and_clear_last_exception(env, &e) == napi_ok) napi_fatal_exception(env, e);
    }
  }
  napi_close_handle_scope(env, scope);
}

/* One step of the loop's vCPU: KVM_RUN once, its result in the words (1); or 0 without running
 * when JS did not say RUN or the loop has work (an fd ready, a timer due, an immediate). */
static int lr_step(void) {
  int32_t *w = lr.word;
  if (!lr.active || __atomic_load_n(&w[0], __ATOMIC_SEQ_CST) != VR_RUN) return 0;
  if (lr.armed && __atomic_load_n(&lr.ready, __ATOMIC_SEQ_CST)) return 0; /* the loop has work */
  int t = uv_backend_timeout(lr.loop);
  if (t == 0) return 0;
  /* The loop's time is fresh (see lr_on_prepare): this deadline is a timer's due time itself. */
  lr_arm(t < 0 ? -1 : (int64_t)uv_now(lr.loop) + t);
  lr.armed = 1;
  if (__atomic_load_n(&lr.ready, __ATOMIC_SEQ_CST)) return 0;
  __atomic_store_n(&lr.in_run, 1, __ATOMIC_SEQ_CST);
  int rc = ioctl(lr.vcpu_fd, VR_KVM_RUN, 0);
  int e = rc < 0 ? errno : 0;
  __atomic_store_n(&lr.in_run, 0, __ATOMIC_SEQ_CST);
  /* The loop's time as of this exit: timers the exit's handler starts count from now (Node's
   * setTimeout takes uv_now), and the next step's deadline is taken from it. */
  uv_update_time(lr.loop);
  __atomic_store_n(&w[1], e, __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&w[2], 1, __ATOMIC_SEQ_CST);
  int32_t expected = VR_RUN;
  __atomic_compare_exchange_n(&w[0], &expected, VR_EXITED, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return 1;
}

static void lr_on_prepare(uv_prepare_t *p) {
  (void)p;
  /* The loop's time is read here and after each KVM_RUN (lr_step), once per exit: a deadline
   * taken from it (uv_now + uv_backend_timeout) is a timer's due time itself, so the watcher
   * (which reads the same clock) fires neither early nor late, with no second clock read (in
   * the lab, whose clock source is the HPET, a read costs ~2.7 us). */
  uv_update_time(lr.loop);
  /* JS handles each exit (the hub's pass), and may run further steps itself (loopRunnerStep);
   * it may end the runner (lr.active 0, and lr.used 0 once joined). */
  while (lr_step()) {
    lr.in_cb = 1;
    lr_call();
    lr.in_cb = 0;
  }
  if (lr.armed) {
    lr.armed = 0;
    if (lr.used) lr_disarm();
  }
}

static void lr_prep_closed(uv_handle_t *h) { free(h); }

/* Ends the runner (the watcher joined, the prepare closed); from its thread. */
static void lr_end(void) {
  lr.active = 0;
  pthread_mutex_lock(&lr.m);
  lr.wstate = LR_QUIT;
  pthread_mutex_unlock(&lr.m);
  if (lr.wthread) {
    lr_poke();
    pthread_join(lr.wtid, NULL);
    lr.wthread = 0;
  }
  if (lr.prep) {
    uv_prepare_stop(lr.prep);
    uv_close((uv_handle_t *)lr.prep, lr_prep_closed);
    lr.prep = NULL;
  }
  if (lr.wefd >= 0) close(lr.wefd);
  if (lr.ep_idle >= 0) close(lr.ep_idle);
  if (lr.ep_armed >= 0) close(lr.ep_armed);
  lr.wefd = lr.ep_idle = lr.ep_armed = -1;
  napi_delete_reference(lr.env, lr.words_ref);
  napi_delete_reference(lr.env, lr.run_ref);
  napi_delete_reference(lr.env, lr.cb);
  napi_async_destroy(lr.env, lr.ctx);
  free(lr.prog);
  lr.prog = NULL;
  pthread_mutex_destroy(&lr.m);
  pthread_cond_destroy(&lr.c);
  lr.used = 0;
}

static void lr_env_cleanup(void *arg) {
  (void)arg;
  if (lr.used) lr_end();
}

static int lr_handle_ok(napi_env env, napi_value v) {
  return lr.used && lr.env == env && arg_i64(env, v) == (int64_t)lr.gen;
}

/*
 * loopRunnerStart(vcpuFd, run: ArrayBuffer (the vCPU's kvm_run mapping), words: Int32Array, index,
 * kickSignal, callback, program | null): handle. From the thread whose loop runs the vCPU; the
 * words are as a runner's (word[0] IDLE); callback(0) after each KVM_RUN; program: the watcher's
 * seccomp filter, installed by it before it runs anything else (throws if it could not).
 */
static napi_value n_loop_runner_start(napi_env env, napi_callback_info info) {
  napi_value a[7];
  if (!get_args(env, info, 7, a)) return NULL;
  if (lr.used) return throw_errno(env, "loopRunnerStart (one per process)", EBUSY);
  int vcpu_fd = (int)arg_i64(env, a[0]);
  if (vcpu_fd < 0 || fcntl(vcpu_fd, F_GETFD) < 0) return throw_errno(env, "loopRunnerStart(vcpu fd)", EBADF);
  void *run; size_t run_len;
  bool isab = false;
  if (napi_is_arraybuffer(env, a[1], &isab) != napi_ok || !isab ||
      napi_get_arraybuffer_info(env, a[1], &run, &run_len) != napi_ok || run_len < 4096) {
    napi_throw_type_error(env, NULL, "loopRunnerStart: run must be the kvm_run mapping (an ArrayBuffer)");
    return NULL;
  }
  bool is;
  napi_typedarray_type type; size_t n; void *data; napi_value ab; size_t off;
  if (napi_is_typedarray(env, a[2], &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, a[2], &type, &n, &data, &ab, &off) != napi_ok || type != napi_int32_array) {
    napi_throw_type_error(env, NULL, "loopRunnerStart: words must be an Int32Array");
    return NULL;
  }
  int64_t index = arg_i64(env, a[3]);
  if (index < 0 || (uint64_t)index + 3 > n) {
    napi_throw_range_error(env, NULL, "loopRunnerStart: index out of the words' range");
    return NULL;
  }
  int32_t *word = (int32_t *)data + index;
  if (__atomic_load_n(&word[0], __ATOMIC_SEQ_CST) != VR_IDLE) {
    napi_throw_range_error(env, NULL, "loopRunnerStart: the state word is not IDLE (0)");
    return NULL;
  }
  int sig = (int)arg_i64(env, a[4]);
  if (sig < SIGRTMIN || sig > SIGRTMAX) {
    napi_throw_range_error(env, NULL, "loopRunnerStart: the kick signal must be a real-time signal");
    return NULL;
  }
  napi_valuetype t;
  napi_typeof(env, a[5], &t);
  if (t != napi_function) {
    napi_throw_type_error(env, NULL, "loopRunnerStart: the callback must be a function");
    return NULL;
  }
  struct sock_filter *prog = NULL;
  size_t plen = 0;
  napi_valuetype pt;
  napi_typeof(env, a[6], &pt);
  if (pt != napi_null && pt != napi_undefined) {
    void *pd; size_t pl;
    if (!buffer_of(env, a[6], &pd, &pl) || pl == 0 || pl % sizeof(struct sock_filter) != 0 ||
        pl / sizeof(struct sock_filter) > SECCOMP_MAX_INSNS) {
      napi_throw_range_error(env, NULL, "loopRunnerStart: program must be 1 to 4096 instructions of 8 bytes");
      return NULL;
    }
    prog = malloc(pl);
    if (!prog) return throw_errno(env, "malloc", ENOMEM);
    memcpy(prog, pd, pl);
    plen = pl / sizeof(struct sock_filter);
  }
  uv_loop_t *loop;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) {
    free(prog);
    napi_throw_error(env, NULL, "loopRunnerStart: no event loop");
    return NULL;
  }
  int wefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wefd < 0) { int e = errno; free(prog); return throw_errno(env, "eventfd", e); }
  int ep_idle = epoll_create1(EPOLL_CLOEXEC), ep_armed = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event ee = { .events = EPOLLIN, .data.u32 = 0 };
  int eperr = ep_idle < 0 || ep_armed < 0 ? errno : 0;
  if (!eperr && (epoll_ctl(ep_idle, EPOLL_CTL_ADD, wefd, &ee) < 0 || epoll_ctl(ep_armed, EPOLL_CTL_ADD, wefd, &ee) < 0))
    eperr = errno;
  ee.data.u32 = 1;
  if (!eperr && epoll_ctl(ep_armed, EPOLL_CTL_ADD, uv_backend_fd(loop), &ee) < 0) eperr = errno;
  uv_prepare_t *prep = eperr ? NULL : malloc(sizeof *prep);
  if (!prep) {
    if (ep_idle >= 0) close(ep_idle);
    if (ep_armed >= 0) close(ep_armed);
    close(wefd);
    free(prog);
    return throw_errno(env, "loopRunnerStart (epoll)", eperr ? eperr : ENOMEM);
  }
  struct timespec res;
  lr_clock = clock_getres(CLOCK_MONOTONIC_COARSE, &res) == 0 && res.tv_sec == 0 && res.tv_nsec <= 1000000
                 ? CLOCK_MONOTONIC_COARSE
                 : CLOCK_MONOTONIC;
  memset(&lr, 0, sizeof lr);
  lr.used = 1;
  lr.gen = ++lr_gen & 0x3fffffff;
  lr.env = env; lr.loop = loop; lr.word = word; lr.run = run; lr.vcpu_fd = vcpu_fd; lr.sig = sig;
  lr.wefd = wefd; lr.ep_idle = ep_idle; lr.ep_armed = ep_armed; lr.owner = pthread_self(); lr.prog = prog; lr.prog_len = (unsigned short)plen;
  lr.deadline = -1;
  pthread_mutex_init(&lr.m, NULL);
  pthread_cond_init(&lr.c, NULL);
  napi_value name;
  if (napi_create_reference(env, a[2], 1, &lr.words_ref) != napi_ok ||
      napi_create_reference(env, a[1], 1, &lr.run_ref) != napi_ok ||
      napi_create_reference(env, a[5], 1, &lr.cb) != napi_ok ||
      napi_create_string_utf8(env, "typervisor.loopRunner", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_async_init(env, NULL, name, &lr.ctx) != napi_ok) {
    free(prep);
    lr_end();
    napi_throw_error(env, NULL, "loopRunnerStart: napi setup failed");
    return NULL;
  }
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, VR_STACK);
  int e = pthread_create(&lr.wtid, &attr, lr_watch_main, NULL);
  pthread_attr_destroy(&attr);
  if (e != 0) {
    free(prep);
    lr_end();
    return throw_errno(env, "pthread_create", e);
  }
  lr.wthread = 1;
  pthread_mutex_lock(&lr.m);
  while (!lr.wready) pthread_cond_wait(&lr.c, &lr.m);
  int werr = lr.werr;
  pthread_mutex_unlock(&lr.m);
  if (werr) {
    pthread_join(lr.wtid, NULL);
    lr.wthread = 0;
    free(prep);
    lr_end();
    return throw_errno(env, "loopRunnerStart (the watcher's seccomp filter)", werr);
  }
  uv_prepare_init(loop, prep);
  uv_prepare_start(prep, lr_on_prepare);
  uv_unref((uv_handle_t *)prep);
  lr.prep = prep;
  lr.active = 1;
  napi_add_env_cleanup_hook(env, lr_env_cleanup, NULL);
  return num(env, lr.gen);
}

/* loopRunnerGo(handle): word[0] = RUN (from IDLE or EXITED); the loop's next prepare runs it */
static napi_value n_loop_runner_go(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  if (!lr_handle_ok(env, a[0]) || !lr.active) return throw_errno(env, "loopRunnerGo (no such runner)", ESRCH);
  int32_t s = __atomic_load_n(&lr.word[0], __ATOMIC_SEQ_CST);
  if (s != VR_IDLE && s != VR_EXITED) return throw_errno(env, "loopRunnerGo (the runner is not waiting)", EBUSY);
  __atomic_store_n(&lr.word[0], VR_RUN, __ATOMIC_SEQ_CST);
  return NULL;
}

/* loopRunnerStep(handle): from the runner's callback only. Runs the vCPU once more, as the loop
 * would after the callback returns, so that JS can serve a run of exits in a loop of its own
 * (a JS -> native call per exit, not a C++ -> JS entry with its callback scope): 1 when it ran
 * KVM_RUN (the result is in the words, as before a callback), 0 when it did not (JS did not say
 * RUN, or the loop has work: return to it). */
static napi_value n_loop_runner_step(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  if (!lr_handle_ok(env, a[0]) || !lr.active) return throw_errno(env, "loopRunnerStep (no such runner)", ESRCH);
  if (!lr.in_cb) return throw_errno(env, "loopRunnerStep (only from the runner's callback)", EPERM);
  return num(env, lr_step());
}

/* loopRunnerQuit(handle): word[0] = DEAD at once (JS on this thread runs only outside KVM_RUN) */
static napi_value n_loop_runner_quit(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  if (!lr_handle_ok(env, a[0]) || !lr.active) return throw_errno(env, "loopRunnerQuit (no such runner)", ESRCH);
  __atomic_store_n(&lr.word[0], VR_DEAD, __ATOMIC_SEQ_CST);
  return NULL;
}

/* loopRunnerJoin(handle): ends a quit runner: joins the watcher, closes the prepare */
static napi_value n_loop_runner_join(napi_env env, napi_callback_info info) {
  napi_value a[1];
  if (!get_args(env, info, 1, a)) return NULL;
  if (!lr_handle_ok(env, a[0])) return throw_errno(env, "loopRunnerJoin (no such runner of this thread)", ESRCH);
  if (__atomic_load_n(&lr.word[0], __ATOMIC_SEQ_CST) != VR_DEAD)
    return throw_errno(env, "loopRunnerJoin (the runner has not ended)", EBUSY);
  napi_remove_env_cleanup_hook(env, lr_env_cleanup, NULL);
  lr_end();
  return NULL;
}

#define LOOP_RUNNER_EXPORTS                                                               \
  EXPORT("loopRunnerStart", n_loop_runner_start), EXPORT("loopRunnerGo", n_loop_runner_go), \
  EXPORT("loopRunnerQuit", n_loop_runner_quit), EXPORT("loopRunnerJoin", n_loop_runner_join), \
  EXPORT("loopRunnerStep", n_loop_runner_step),
/* ---- end of loop runner ---- */

/* ---- io_uring (helper U, issue 17 part B): the three syscalls, nothing else ----
 * The rings are mapped with mmap() above (IORING_OFF_SQ_RING / _CQ_RING / _SQES as the offset);
 * every ring index, SQE and CQE is read and written in TypeScript (src/devices/virtio/block/
 * io-uring.ts). glibc has no wrappers: raw syscall(2). */
#include <linux/io_uring.h>

/* ioUringSetup(entries, params): the ring fd; `params` (struct io_uring_params, 120 bytes) is
 * passed in (flags) and filled by the kernel (sizes, features, ring offsets) */
static napi_value n_io_uring_setup(napi_env env, napi_callback_info info) {
  napi_value a[2];
  if (!get_args(env, info, 2, a)) return NULL;
  void *p; size_t len;
  if (!buffer_of(env, a[1], &p, &len) || len < sizeof(struct io_uring_params))
    return throw_errno(env, "io_uring_setup(params buffer too small)", EINVAL);
  long fd = syscall(__NR_io_uring_setup, (unsigned)arg_u64(env, a[0]), p);
  if (fd < 0) return throw_errno(env, "io_uring_setup", errno);
  return num(env, fd);
}

/* ioUringEnter(fd, toSubmit, minComplete, flags): SQEs consumed */
static napi_value n_io_uring_enter(napi_env env, napi_callback_info info) {
  napi_value a[4];
  if (!get_args(env, info, 4, a)) return NULL;
  long r = syscall(__NR_io_uring_enter, (int)arg_i64(env, a[0]), (unsigned)arg_u64(env, a[1]),
                   (unsigned)arg_u64(env, a[2]), (unsigned)arg_u64(env, a[3]), NULL, (size_t)0);
  if (r < 0) return throw_errno(env, "io_uring_enter", errno);
  return num(env, r);
}

/* ioUringRegister(fd, opcode, arg: buffer | null, nrArgs): the syscall's result */
static napi_value n_io_uring_register(napi_env env, napi_callback_info info) {
  napi_value a[4];
  if (!get_args(env, info, 4, a)) return NULL;
  void *p = NULL; size_t len = 0;
  napi_valuetype t;
  napi_typeof(env, a[2], &t);
  if (t != napi_null && !buffer_of(env, a[2], &p, &len)) {
    napi_throw_type_error(env, NULL, "ioUringRegister: arg is not a buffer or null");
    return NULL;
  }
  long r = syscall(__NR_io_uring_register, (int)arg_i64(env, a[0]), (unsigned)arg_u64(env, a[1]), p,
                   (unsigned)arg_u64(env, a[3]));
  if (r < 0) return throw_errno(env, "io_uring_register", errno);
  return num(env, r);
}

#define IO_URING_EXPORTS                                                                \
  EXPORT("ioUringSetup", n_io_uring_setup), EXPORT("ioUringEnter", n_io_uring_enter),   \
  EXPORT("ioUringRegister", n_io_uring_register),
/* ---- end of io_uring ---- */

/* ---- malloc_trim (issue 19, r9-trim): glibc's own call, nothing else ----
 * A shared-mode daemon calls it from its main thread once VMs have ended and it is idle
 * (src/daemon/trim.ts): free memory at the top of the main arena goes back with brk, free
 * pages inside every arena with madvise(MADV_DONTNEED) (glibc >= 2.8). Under strace a call made
 * brk and madvise only (and futex for the arena locks): all in every role's list (NODE_THREAD). */
#include <malloc.h>

/* mallocTrim(): malloc_trim(0): 1 when memory went back to the system, 0 otherwise */
static napi_value n_malloc_trim(napi_env env, napi_callback_info info) {
  (void)info;
  return num(env, malloc_trim(0));
}

#define MALLOC_TRIM_EXPORTS EXPORT("mallocTrim", n_malloc_trim),
/* ---- end of malloc_trim ---- */

/* getpid-free helpers are in Node already; this is the whole surface. */
#define EXPORT(name, fn) { name, NULL, fn, NULL, NULL, NULL, napi_default, NULL }

NAPI_MODULE_INIT() {
  napi_property_descriptor props[] = {
    EXPORT("open", n_open), EXPORT("close", n_close), EXPORT("ioctl", n_ioctl),
    EXPORT("mmap", n_mmap), EXPORT("mmapAligned", n_mmap_aligned), EXPORT("munmap", n_munmap), EXPORT("madvise", n_madvise),
    EXPORT("bufferAddress", n_buffer_address), EXPORT("viewAddress", n_view_address),
    EXPORT("release", n_release), EXPORT("lseek", n_lseek), EXPORT("memfdCreate", n_memfd_create),
    EXPORT("eventfd", n_eventfd), EXPORT("eventfdRead", n_eventfd_read),
    EXPORT("eventfdWrite", n_eventfd_write), EXPORT("read", n_read),
    EXPORT("readv", n_readv), EXPORT("writev", n_writev),
    EXPORT("preadv", n_preadv), EXPORT("pwritev", n_pwritev),
    EXPORT("epollCreate", n_epoll_create), EXPORT("epollCtl", n_epoll_ctl),
    EXPORT("epollWait", n_epoll_wait), EXPORT("installKickHandler", n_install_kick_handler),
    EXPORT("threadSelf", n_thread_self), EXPORT("processCpuUs", n_process_cpu_us), EXPORT("kick", n_kick), EXPORT("tapOpen", n_tap_open),
    EXPORT("unixSocket", n_unix_socket), EXPORT("bindListen", n_bind_listen), EXPORT("accept", n_accept),
    EXPORT("connect", n_connect), EXPORT("sendv", n_sendv), EXPORT("sendFds", n_send_fds),
    EXPORT("recvFds", n_recv_fds), EXPORT("userfaultfd", n_userfaultfd), EXPORT("shutdown", n_shutdown),
    JAILER_EXPORTS
    /* issue 14 (r3-seccomp) */
    EXPORT("seccompInstall", n_seccomp_install), EXPORT("seccompMode", n_seccomp_mode),
    EXPORT("ioctlLengthOk", n_ioctl_length_ok), EXPORT("setThreadName", n_set_thread_name),
    EXPORT("setThpDisable", n_set_thp_disable), EXPORT("noHugePages", n_no_huge_pages),
    VCPU_RUNNER_EXPORTS
    IO_URING_EXPORTS
    MALLOC_TRIM_EXPORTS
    FD_WATCH_EXPORTS
    LOOP_RUNNER_EXPORTS
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) return NULL;
  return exports;
}
