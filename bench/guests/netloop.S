/*
 * MODE_NETLOOP of micro.S (included there, after `reset`): a polled virtio-net driver over
 * virtio-mmio version 2 (virtio 1.2 §4.2.3, §3.1.1, §2.7, §5.1.6) that sends NET_COUNT ICMP
 * echo requests to the host, one at a time, and waits for each echo reply: a ping's device
 * path (the TX kick, the VMM's TAP write, the host's answer, the VMM's TAP read and the RX used
 * entry) with no interrupt and no guest kernel, so that Typervisor's and QEMU's figures on a
 * host differ only by the VMM (bench/net-micro.ts).
 *
 * The harness sets up the host's side: a TAP with the MAC 06:00:0a:c8:00:01 and the address
 * 10.200.0.1/24, and a permanent neighbour entry for 10.200.0.2 at 06:00:0a:c8:00:02 (the
 * guest's MAC, given to the VMM). The request (below) goes from 10.200.0.2 to 10.200.0.1 with
 * those MACs, the same bytes every time: the host answers each one.
 *
 * Prints "S\n" when the timed round trips start and "D\n" when they are done, or "E" + a reason
 * letter + "\n" on COM1, then resets:
 *   n no device   v no VERSION_1   f FEATURES_OK refused   q a queue unusable
 *   k DEVICE_NEEDS_RESET   u a used id out of range
 * Frames other than the echo reply (an IPv6 solicitation, say) are given back and not counted.
 *
 * Interrupts stay off (cli, and VIRTQ_AVAIL_F_NO_INTERRUPT on both queues); the driver polls
 * used.idx, and kicks RX after giving a buffer back only when the device has not set
 * VIRTQ_USED_F_NO_NOTIFY (§2.7.10), as Linux's driver does.
 */
#ifndef NET_COUNT
#define NET_COUNT 1000
#endif
#ifndef NET_GAP
#define NET_GAP 0 /* pause instructions after each timed round trip */
#endif
#ifndef NET_SETTLE
#define NET_SETTLE 500 /* untimed round trips first */
#endif

#include "virtio-mmio.h"

#define QSIZE 16
#define RXBUFS 8
#define RXBUF_SIZE 2048 /* the 12-byte header and a 1514-byte frame fit */
#define NET_HDR 12 /* virtio_net_hdr with num_buffers: always 12 bytes with VERSION_1 */
#define FRAME_LEN 98
/* Guest RAM used (zeroed first): queue 0 (RX), queue 1 (TX), the RX buffers. */
#define RX_DESC 0x200000
#define RX_AVAIL 0x201000
#define RX_USED 0x202000
#define TX_DESC 0x204000
#define TX_AVAIL 0x205000
#define TX_USED 0x206000
#define RXSEEN 0x207000 /* RX used entries taken so far (u32) */
#define RXBUF 0x210000

	/* %esi: the device; %edi: TX avail.idx; %ebx: RX avail.idx; %ebp: round trips left */
netloop:
	mov	$1, %edi /* virtio-net */
	call	findDevice
	jnc	1f
	mov	$'n', %al
	jmp	fail
1:
	mov	$RX_DESC, %edx
2:	movl	$0, (%edx)
	add	$4, %edx
	cmp	$(RXSEEN + 4), %edx
	jb	2b

	call	negotiate /* §3.1.1 up to FEATURES_OK: VERSION_1 and nothing else */

	/* Queues 0 and 1 (§4.2.3.2). */
	xor	%ecx, %ecx
	mov	$RX_DESC, %edx
	call	setupQueue
	mov	$1, %ecx
	mov	$TX_DESC, %edx
	call	setupQueue

	/* RXBUFS device-writable buffers, descriptor i -> buffer i, all made available. */
	xor	%ecx, %ecx
4:	mov	%ecx, %eax
	shl	$11, %eax /* * RXBUF_SIZE */
	add	$RXBUF, %eax
	mov	%ecx, %edx
	shl	$4, %edx /* a descriptor is 16 bytes */
	mov	%eax, RX_DESC(%edx)
	movl	$RXBUF_SIZE, RX_DESC + 8(%edx)
	movw	$DESC_F_WRITE, RX_DESC + 12(%edx)
	movw	%cx, RX_AVAIL + 4(, %ecx, 2)
	inc	%ecx
	cmp	$RXBUFS, %ecx
	jb	4b
	mov	$RXBUFS, %ebx
	mov	%bx, RX_AVAIL + 2
	movw	$AVAIL_F_NO_INTERRUPT, RX_AVAIL
	/* TX: one descriptor, the header and the frame (request, below), reused every round. */
	movl	$request, TX_DESC
	movl	$(NET_HDR + FRAME_LEN), TX_DESC + 8
	movw	$AVAIL_F_NO_INTERRUPT, TX_AVAIL

	movl	$(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), R_STATUS(%esi)
	mov	$'k', %al
	testl	$S_NEEDS_RESET, R_STATUS(%esi)
	jnz	fail
	movl	$0, R_QUEUE_NOTIFY(%esi) /* RX has buffers */

	/*
	 * NET_SETTLE round trips first, unmeasured: Typervisor's device worker plays its own net
	 * warm-up (src/vmm/net-warmup.ts) in slices between the first frames, which would be timed
	 * otherwise. Then "S\n" (and a write to the marker port, an exit that ends the UART's held
	 * burst at once), NET_COUNT timed round trips, each followed by NET_GAP pauses, and "D\n".
	 */
	xor	%edi, %edi
	mov	$NET_SETTLE, %ebp
11:	call	roundTrip
	dec	%ebp
	jnz	11b
	mov	$COM1, %dx
	mov	$'S', %al
	out	%al, %dx
	mov	$'\n', %al
	out	%al, %dx
	mov	$MARKER_PORT, %dx
	out	%al, %dx
	mov	$NET_COUNT, %ebp
round:
	call	roundTrip
#if NET_GAP
	mov	$NET_GAP, %ecx
10:	pause
	dec	%ecx
	jnz	10b
#endif
	dec	%ebp
	jnz	round

	mov	$COM1, %dx
	mov	$'D', %al
	out	%al, %dx
	mov	$'\n', %al
	out	%al, %dx
	jmp	reset

	/* One echo request and its reply; %edi: TX avail.idx (kept), %ecx %edx %eax clobbered. */
roundTrip:
	/* The request: TX head 0 in the ring, avail.idx, the kick. */
	mov	%edi, %eax
	and	$(QSIZE - 1), %eax
	movw	$0, TX_AVAIL + 4(, %eax, 2)
	inc	%edi
	mov	%di, TX_AVAIL + 2
	movl	$1, R_QUEUE_NOTIFY(%esi)
	/* The next RX used entry: the reply, else given back and waited for again. */
5:	mov	RXSEEN, %ecx
6:	pause
	cmp	%cx, RX_USED + 2
	je	6b
	and	$(QSIZE - 1), %ecx
	mov	RX_USED + 4(, %ecx, 8), %edx /* the buffer's descriptor id */
	incl	RXSEEN
	mov	$'u', %al
	cmp	$RXBUFS, %edx
	jae	fail
	mov	%edx, %eax
	shl	$11, %eax
	add	$RXBUF, %eax
	/* An echo reply for us: IPv4 (0x0800), ICMP (1), type 0, our identifier. */
	cmpw	$0x0008, NET_HDR + 12(%eax)
	jne	7f
	cmpb	$1, NET_HDR + 14 + 9(%eax)
	jne	7f
	cmpb	$0, NET_HDR + 14 + 20(%eax)
	jne	7f
	cmpw	$0x7674, NET_HDR + 14 + 24(%eax)
	jne	7f
	call	giveBack
	/* The request's own used entry (before or after the reply's), so head 0 is free again. */
8:	pause
	cmp	%di, TX_USED + 2
	jne	8b
	ret
7:	call	giveBack /* not the reply: wait on */
	jmp	5b

	/* RX buffer %edx made available again; RX kicked unless the device said not to. */
giveBack:
	mov	%ebx, %eax
	and	$(QSIZE - 1), %eax
	mov	%dx, RX_AVAIL + 4(, %eax, 2)
	inc	%ebx
	mov	%bx, RX_AVAIL + 2
	testw	$USED_F_NO_NOTIFY, RX_USED
	jnz	9f
	movl	$0, R_QUEUE_NOTIFY(%esi)
9:	ret


	/*
	 * The request as TX's one buffer: a zero virtio_net_hdr (no offloads), then Ethernet
	 * (06:00:0a:c8:00:01 <- 06:00:0a:c8:00:02, IPv4), IPv4 (10.200.0.2 -> 10.200.0.1, ICMP,
	 * DF, TTL 64, its checksum) and an ICMP echo request (identifier 0x7476, sequence 1, 56
	 * bytes 0x00-0x37, its checksum): 98 bytes, as ping sends.
	 */
	.section .rodata
	.align 16
request:
	.fill NET_HDR, 1, 0
	.byte 0x06, 0x00, 0x0a, 0xc8, 0x00, 0x01, 0x06, 0x00, 0x0a, 0xc8, 0x00, 0x02, 0x08, 0x00
	.byte 0x45, 0x00, 0x00, 0x54, 0x00, 0x00, 0x40, 0x00, 0x40, 0x01, 0x25, 0x17, 0x0a, 0xc8
	.byte 0x00, 0x02, 0x0a, 0xc8, 0x00, 0x01, 0x08, 0x00, 0x8c, 0x75, 0x74, 0x76, 0x00, 0x01
	.byte 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d
	.byte 0x0e, 0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b
	.byte 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29
	.byte 0x2a, 0x2b, 0x2c, 0x2d, 0x2e, 0x2f, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37
	.text
