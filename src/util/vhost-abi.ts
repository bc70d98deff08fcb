/**
 * The host kernel's vhost ioctls (<linux/vhost.h>), for virtio-vsock's vhost backend
 * (devices/virtio/vsock/vhost.ts) and the seccomp filters that allow them (sandbox/seccomp).
 */
/** The vhost ioctls' type byte (`VHOST_VIRTIO`): the seccomp filters allow this type only. */
export const VHOST_VIRTIO = 0xaf;

/** <linux/vhost.h> requests (values checked against the header with a C program). */
export const VHOST = {
  GET_FEATURES: 0x8008af00,
  SET_FEATURES: 0x4008af00,
  SET_OWNER: 0xaf01,
  SET_MEM_TABLE: 0x4008af03,
  SET_VRING_NUM: 0x4008af10,
  SET_VRING_ADDR: 0x4028af11,
  SET_VRING_BASE: 0x4008af12,
  GET_VRING_BASE: 0xc008af12,
  SET_VRING_KICK: 0x4008af20,
  SET_VRING_CALL: 0x4008af21,
  SET_VRING_ERR: 0x4008af22,
  VSOCK_SET_GUEST_CID: 0x4008af60,
  VSOCK_SET_RUNNING: 0x4004af61,
} as const;

/** The host's vhost-vsock device node: a misc device (major 10), minor 241. */
export const VHOST_VSOCK_PATH = '/dev/vhost-vsock';
export const VHOST_VSOCK_MAJOR = 10;
export const VHOST_VSOCK_MINOR = 241;

/** Guest CIDs the kernel's vhost-vsock takes: 3 up to 2^32 - 2 (0-2 and 2^32 - 1 are reserved). */
export const MIN_GUEST_CID = 3;
export const MAX_GUEST_CID = 0xffff_fffe;

/** Is `n` a CID a guest may have: a whole number from MIN_GUEST_CID to MAX_GUEST_CID? */
export function isGuestCid(n: number): boolean {
  return Number.isInteger(n) && n >= MIN_GUEST_CID && n <= MAX_GUEST_CID;
}

/** A guest CID written in decimal (at most 10 digits), or undefined when `text` is not one. */
export function parseGuestCid(text: string): number | undefined {
  const n = /^\d{1,10}$/.test(text) ? Number(text) : NaN;
  return isGuestCid(n) ? n : undefined;
}

/**
 * VHOST_VSOCK_SET_GUEST_CID on `fd`. Returns why the kernel refused the CID, in words (another
 * VM on this host has it; a CID it never gives a guest), or undefined once it is ours; any other
 * failure is thrown. Used by the VMM (devices/virtio/vsock/vhost.ts) and the jailer, which
 * claims the CID before the VMM starts (--vhost-vsock-cid).
 */
export function setGuestCid(
  ioctl: (fd: number, request: number, arg: BigUint64Array) => number,
  fd: number,
  cid: number,
): string | undefined {
  try {
    ioctl(fd, VHOST.VSOCK_SET_GUEST_CID, BigUint64Array.of(BigInt(cid)));
    return undefined;
  } catch (e) {
    const code = (e as { code?: string }).code;
    if (code === 'EADDRINUSE')
      return `vsock guest_cid ${cid} is in use on this host (another VM's vhost-vsock has it): choose another CID`;
    if (code === 'EINVAL') return `vsock guest_cid ${cid}: the kernel refuses it as a guest CID`;
    throw e;
  }
}
