/**
 * virtio 1.2 numbers shared by the transport, the queues and the devices.
 * Sections cited are of the virtio 1.2 specification (OASIS, 2022).
 */

/** Device status bits (§2.1). */
export const STATUS_ACKNOWLEDGE = 0x01;
export const STATUS_DRIVER = 0x02;
export const STATUS_DRIVER_OK = 0x04;
export const STATUS_FEATURES_OK = 0x08;
export const STATUS_DEVICE_NEEDS_RESET = 0x40;
export const STATUS_FAILED = 0x80;

/** Reserved feature bits (§6). */
export const VIRTIO_F_RING_INDIRECT_DESC = 28;
/** Offered on every device (mmio-state.ts createState); queue.ts implements it. */
export const VIRTIO_F_RING_EVENT_IDX = 29;
export const VIRTIO_F_VERSION_1 = 32;

/** InterruptStatus bits (§4.2.2). */
export const INT_USED_BUFFER = 0x1;
export const INT_CONFIG_CHANGE = 0x2;

/** Device IDs (§5). */
export const DEVICE_ID_BLOCK = 2;
export const DEVICE_ID_RNG = 4;
export const DEVICE_ID_NET = 1;
export const DEVICE_ID_VSOCK = 19;
export const DEVICE_ID_MEM = 24;
export const DEVICE_ID_PMEM = 27;

/** VendorID register: the bytes "TYPV" read as a little-endian u32 (QEMU's is "QEMU"). */
export const VENDOR_ID = 0x5650_5954;

/** Limits of the virtio-mmio register file (mmio-state.ts). */
export const MAX_QUEUES = 8;
export const CONFIG_SPACE_MAX = 256;

/** Queue size we offer (QueueNumMax) for every queue. */
export const QUEUE_SIZE_MAX = 256;

/**
 * The work one queue may do in one turn of the device worker's loop (VirtioDevice.onKick): at
 * most this many chains, and it stops once the chains it served add up to this many bytes of
 * buffers (so one turn does at most the byte budget plus one request). Then the queue yields:
 * its next turn is a timer of the loop, after every other ready queue, device and host socket
 * had theirs (round-robin). Counted as queue_budget_yields.
 */
export const QUEUE_BUDGET_CHAINS = 64;
export const QUEUE_BUDGET_BYTES = 16 * 1024 * 1024;

export const bit = (n: number): bigint => 1n << BigInt(n);
