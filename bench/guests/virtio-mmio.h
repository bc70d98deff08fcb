/*
 * What the micro guests' polled virtio-mmio drivers share (blkloop.S, netloop.S): where each
 * VMM puts its transports, the registers (virtio 1.2 §4.2.2), status bits and ring flags, and
 * `findDevice`.
 */
#ifndef VIRTIO_MMIO_H
#define VIRTIO_MMIO_H
/* Where the transports are: Typervisor (src/arch/x86_64/layout.ts), then QEMU microvm. */
#define TYPV_BASE 0xc0001000
#define TYPV_STRIDE 0x1000
#define TYPV_SLOTS 19
#define QEMU_BASE 0xfeb00000
#define QEMU_STRIDE 0x200
#define QEMU_SLOTS 24

/* virtio-mmio registers (§4.2.2). */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_QUEUE_DEVICE_HIGH 0x0a4
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_CONFIG_GENERATION 0x0fc
#define R_CONFIG 0x100 /* the device's configuration space */

#define MAGIC 0x74726976
#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1
#endif
