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
