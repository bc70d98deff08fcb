/*
 * Hostile tiny guests (issue 12): polled virtio-mmio version 2 drivers in assembly that abuse one
 * device while they check that another (virtio-rng) is still served. Same entry as tiny.S (an
 * ELF64 with a PVH note, 32-bit protected mode, paging off, interrupts off; linked with
 * tiny.ld); built by hostile-build.sh. The driver shape is bench/guests/blkloop.S's.
 *
 * Every variant prints "hostile up\n" on COM1, writes the boot marker to port 0x3f0, sets up
 * its devices (Typervisor's MMIO slots, found by device ID), then:
 *
 *   MODE_VSOCK  a vsock flood with no RX buffers: the TX queue (256 entries, every one the same
 *               44-byte OP_RW packet to a connection that does not exist) is refilled and kicked
 *               again as soon as the device has used it; each packet makes the host queue an RST
 *               for a guest that never posts an RX buffer. Every VSOCK_PROBE_EVERY rounds
 *               (256 packets each) a virtio-rng request: '.' when it was served, 'T' when not
 *               within RNG_POLL_MAX polls. Forever.
 *   MODE_BLK    virtio-blk aliasing: one request whose indirect table holds BLK_SEGS data
 *               descriptors of BLK_SEG_BYTES each, every one the same guest buffer (a read of
 *               BLK_SEGS * BLK_SEG_BYTES bytes from sector 0 into one buffer), made available
 *               BLK_BATCH times per kick; kicked again when all are used. After each round a
 *               virtio-rng request: '.' (served, the blk status was OK), 'x' (served, the blk
 *               request was refused: a cap), 'T' (rng not served in time). Forever.
 *   MODE_STORM  a queue-kick storm with a bystander: the blk ring is kept BLK_BATCH requests
 *               (as MODE_BLK's) ahead of used.idx and kicked; then a virtio-rng request, and
 *               while it is polled (at most RNG_POLL_MAX times) the blk ring is topped up again
 *               and again without a kick: a device that drains its ring until it is empty never
 *               comes back. "S<polls, 8 hex digits>\n" when the rng request was served, "T\n"
 *               when not. Forever.
 *   MODE_NET    a virtio-net RX chain longer than the host can take: one RX chain of NET_SEGS
 *               (1024) device-writable descriptors of 16 bytes (an indirect table; the device
 *               adds its spill buffer: 1025 iovecs). Prints "N\n" once posted, then polls the RX
 *               used ring at most NET_POLL_MAX times: "U<used.len, 8 hex>\n" when the chain came
 *               back, "u\n" when not; then a virtio-rng request ("R\n" served, "T\n" not), then
 *               "H\n" and halts (cli; hlt: the vCPU sleeps, so any CPU the VMM burns after this
 *               is the VMM's own).
 *   MODE_VSOCK_BAD  a vsock TX packet whose buffer lies outside guest RAM (BAD_ADDR): one
 *               descriptor, made available and kicked. Prints "B\n", then polls (at most
 *               NET_POLL_MAX times) until the status register has DEVICE_NEEDS_RESET ("K\n")
 *               or the chain came back used ("k\n"; "k\n" too when neither happened), then
 *               "U<TX used.idx, 8 hex>\n", a virtio-rng request ("R\n" served, "T\n" not), "H\n",
 *               and halts. Our unix backend completes the bad chain (used.len 0) and goes on;
 *               on the vhost backend the host kernel refuses the ring (its vq_err) and the VMM
 *               must turn that into the status bit.
 *
 * Failures print "E<reason>\n" and halt: n no such device, v no VERSION_1, f FEATURES_OK
 * refused, i no indirect descriptors, q queue unusable, k DEVICE_NEEDS_RESET at DRIVER_OK,
 * c disk too small, w a round never completed (WAIT_POLL_MAX polls).
 *
 * Guest RAM used (the guests need 64 MiB; everything below 4 MiB, zero at boot): variables at
 * 0x1f0000, queue areas of 64 KiB from 0x200000 (descriptor table +0, avail ring +0x1000, used
 * ring +0x2000), an indirect table at 0x240000, request headers at 0x250000, data at 0x300000
 * (at most 1 MiB).
 */
#define COM1 0x3f8
#define MARKER_PORT 0x3f0

#define TYPV_BASE 0xc0001000
#define TYPV_STRIDE 0x1000
#define TYPV_SLOTS 19

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
#define R_CONFIG 0x100

#define MAGIC 0x74726976
#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define F_INDIRECT_DESC (1 << 28)

#define ID_NET 1
#define ID_BLOCK 2
#define ID_RNG 4
#define ID_VSOCK 19

/* Variables. */
#define V_RNG 0x1f0000 /* the rng's register window */
#define V_RNG_IDX 0x1f0004 /* its next avail.idx */
#define V_DEV 0x1f0008 /* the abused device's register window */
#define V_FEAT 0x1f000c /* low driver-feature word accepted by dev_begin */
#define V_POLL_TSC 0x1f0010 /* TSC ticks of one poll (POLL_US), from calibrate; 0: none */

/* Queue areas. */
#define Q_RNG 0x200000
#define Q_A 0x210000
#define Q_B 0x220000
#define Q_C 0x230000
#define AVAIL_OFF 0x1000
#define USED_OFF 0x2000
#define ITABLE 0x240000
#define HDR 0x250000
#define STATUSB 0x250010
#define PKT 0x250100
#define RNGBUF 0x250200
#define NETBUF 0x250400
#define DATA 0x300000

#ifndef RNG_POLL_MAX
#define RNG_POLL_MAX 0x200000
#endif
#ifndef WAIT_POLL_MAX
#define WAIT_POLL_MAX 0x40000000
#endif
#ifndef VSOCK_PROBE_EVERY
#define VSOCK_PROBE_EVERY 64
#endif
#ifndef BLK_SEGS
#define BLK_SEGS 1022
#endif
#ifndef BLK_SEG_BYTES
#define BLK_SEG_BYTES 0x100000
#endif
#ifndef BLK_BATCH
#define BLK_BATCH 4
#endif
#ifndef NET_SEGS
#define NET_SEGS 1024
#endif
#ifndef POLL_US
#define POLL_US 15
#endif
/*
 * RNG_POLL_MAX and NET_POLL_MAX are multiplied by this: how many times slower than a KVM host
 * the machine is (the tests' TYPERVISOR_TEST_TIME_SCALE, through hostile-build.sh's EXTRA_CFLAGS).
 */
#ifndef TIME_SCALE
#define TIME_SCALE 1
#endif
#ifndef NET_POLL_MAX
#define NET_POLL_MAX 0x80000
#endif
#if BLK_SEGS + 2 > 1024 || BLK_SEG_BYTES > 0x100000 || BLK_SEG_BYTES % 512 || BLK_BATCH > 256
#error "blk request: at most 1022 segments of at most 1 MiB (a multiple of 512), 256 per batch"
#endif
#define BLK_QSIZE 256

	.code32
	.section .text
	.globl _start
_start:
	cli
	mov	$0x8ff0, %esp
	lea	msg_up, %esi
	call	puts
	mov	$MARKER_PORT, %dx
	mov	$1, %al
	out	%al, %dx
	call	calibrate

	/* The bystander: virtio-rng, queue 0 of 16, one 64-byte device-writable buffer. */
	mov	$ID_RNG, %eax
	call	find_dev
	mov	%ebx, V_RNG
	call	dev_begin
	xor	%ecx, %ecx
	mov	$16, %edx
	mov	$Q_RNG, %edi
	call	queue_init
	call	dev_ok
	movl	$RNGBUF, Q_RNG + 0
	movl	$64, Q_RNG + 8
	movw	$DESC_F_WRITE, Q_RNG + 12
	movw	$AVAIL_F_NO_INTERRUPT, Q_RNG + AVAIL_OFF

#if defined(MODE_VSOCK)
	jmp	vsock_flood
#elif defined(MODE_VSOCK_BAD)
	jmp	vsock_bad
#elif defined(MODE_BLK) || defined(MODE_STORM)
	jmp	blk_storm
#elif defined(MODE_NET)
	jmp	net_long_chain
#else
#error "pick a MODE_"
#endif

/* ---------------------------------------------------------------------------------------- */
#if defined(MODE_VSOCK) || defined(MODE_VSOCK_BAD)
/*
 * vsock_init: the vsock device found (V_DEV, %ebx) and made ready: rx (16 entries, never given
 * a buffer), tx (256, at Q_B) and event (16, empty) queues, DRIVER_OK.
 */
vsock_init:
	mov	$ID_VSOCK, %eax
	call	find_dev
	mov	%ebx, V_DEV
	call	dev_begin
	xor	%ecx, %ecx		/* rx */
	mov	$16, %edx
	mov	$Q_A, %edi
	call	queue_init
	mov	$1, %ecx		/* tx */
	mov	$256, %edx
	mov	$Q_B, %edi
	call	queue_init
	mov	$2, %ecx		/* event */
	mov	$16, %edx
	mov	$Q_C, %edi
	call	queue_init
	call	dev_ok
	ret
#endif

#if defined(MODE_VSOCK)
vsock_flood:
	call	vsock_init

	/* struct virtio_vsock_hdr: our CID -> host CID 2, port 1234 -> 5678, OP_RW, no payload. */
	mov	R_CONFIG(%ebx), %eax
	mov	%eax, PKT + 0
	mov	R_CONFIG + 4(%ebx), %eax
	mov	%eax, PKT + 4
	movl	$2, PKT + 8
	movl	$1234, PKT + 16
	movl	$5678, PKT + 20
	movw	$1, PKT + 28		/* VIRTIO_VSOCK_TYPE_STREAM */
	movw	$5, PKT + 30		/* VIRTIO_VSOCK_OP_RW */
	movl	$PKT, Q_B + 0		/* descriptor 0: the packet, device-readable */
	movl	$44, Q_B + 8
	movw	$AVAIL_F_NO_INTERRUPT, Q_B + AVAIL_OFF
	/* Every avail ring entry is head 0 already (RAM is zero). */
	lea	msg_flood, %esi
	call	puts

	xor	%edi, %edi		/* tx avail.idx */
	xor	%ebp, %ebp		/* rounds */
1:	add	$256, %edi
	mov	%di, Q_B + AVAIL_OFF + 2
	mov	V_DEV, %ebx
	movl	$1, R_QUEUE_NOTIFY(%ebx)
	mov	$(Q_B + USED_OFF + 2), %ebx
	call	wait_used
	inc	%ebp
	cmp	$VSOCK_PROBE_EVERY, %ebp
	jb	1b
	xor	%ebp, %ebp
	call	rng_probe
	mov	$'.', %al
	jnc	2f
	mov	$'T', %al
2:	call	putc
	jmp	1b
#endif

/* ---------------------------------------------------------------------------------------- */
#if defined(MODE_VSOCK_BAD)
#ifndef BAD_ADDR
#define BAD_ADDR 0x3ff00000 /* 1023 MiB: above the guest's 64 MiB, below the MMIO windows */
#endif
vsock_bad:
	call	vsock_init

	movl	$BAD_ADDR, Q_B + 0	/* descriptor 0: 44 bytes nowhere in guest RAM */
	movl	$44, Q_B + 8
	movw	$AVAIL_F_NO_INTERRUPT, Q_B + AVAIL_OFF
	movw	$1, Q_B + AVAIL_OFF + 2	/* ring[0] = head 0 (zero already) */
	mov	V_DEV, %ebx
	movl	$1, R_QUEUE_NOTIFY(%ebx)
	lea	msg_b, %esi
	call	puts

	/* Until the device decides: DEVICE_NEEDS_RESET, or the chain completed (used.idx 1). */
	mov	$(NET_POLL_MAX * TIME_SCALE), %ecx
1:	mov	V_DEV, %ebx
	testl	$S_NEEDS_RESET, R_STATUS(%ebx)
	jnz	2f
	cmpw	$1, Q_B + USED_OFF + 2
	je	6f
	call	poll_delay
	dec	%ecx
	jnz	1b
6:	lea	msg_k_no, %esi
	jmp	3f
2:	lea	msg_k, %esi
3:	call	puts
	mov	$'U', %al
	call	putc
	movzwl	Q_B + USED_OFF + 2, %eax
	call	puthex32
	mov	$'\n', %al
	call	putc
	call	rng_probe
	lea	msg_t, %esi
	jc	4f
	lea	msg_r, %esi
4:	call	puts
	lea	msg_h, %esi
	call	puts
5:	cli
	hlt
	jmp	5b
#endif

/* ---------------------------------------------------------------------------------------- */
#if defined(MODE_BLK) || defined(MODE_STORM)
blk_storm:
	mov	$ID_BLOCK, %eax
	call	find_dev
	mov	%ebx, V_DEV
	call	dev_begin
	mov	$'i', %al
	testl	$F_INDIRECT_DESC, V_FEAT
	jz	fail
	xor	%ecx, %ecx
	mov	$BLK_QSIZE, %edx
	mov	$Q_A, %edi
	call	queue_init
	call	dev_ok
	/* The disk must hold one request (capacity in 512-byte sectors, below 2^32). */
	mov	$'c', %al
	cmpl	$0, R_CONFIG + 4(%ebx)
	jne	1f
	cmpl	$((BLK_SEGS * (BLK_SEG_BYTES / 512))), R_CONFIG(%ebx)
	jb	fail
1:
	/* The indirect table: header, BLK_SEGS times the same buffer, status. */
	mov	$ITABLE, %edx
	movl	$HDR, 0(%edx)
	movl	$16, 8(%edx)
	movw	$DESC_F_NEXT, 12(%edx)
	movw	$1, 14(%edx)
	mov	$1, %ecx
2:	add	$16, %edx
	movl	$DATA, 0(%edx)
	movl	$BLK_SEG_BYTES, 8(%edx)
	movw	$(DESC_F_NEXT | DESC_F_WRITE), 12(%edx)
	lea	1(%ecx), %eax
	mov	%ax, 14(%edx)
	inc	%ecx
	cmp	$BLK_SEGS, %ecx
	jbe	2b
	add	$16, %edx
	movl	$STATUSB, 0(%edx)
	movl	$1, 8(%edx)
	movw	$DESC_F_WRITE, 12(%edx)
	/* Descriptor 0 points at it; every avail entry is head 0; HDR is a read of sector 0. */
	movl	$ITABLE, Q_A + 0
	movl	$(16 * (BLK_SEGS + 2)), Q_A + 8
	movw	$DESC_F_INDIRECT, Q_A + 12
	movw	$AVAIL_F_NO_INTERRUPT, Q_A + AVAIL_OFF
	lea	msg_flood, %esi
	call	puts

#if defined(MODE_STORM)
	/*
	 * Each round: top the blk ring up to BLK_BATCH requests ahead of used.idx and kick it; post
	 * an rng request and kick that; then, while polling the rng, keep topping the blk ring up
	 * (no kick: a device that drains its ring until it is empty never comes back).
	 */
3:	call	blk_top_up
	mov	V_DEV, %ebx
	movl	$0, R_QUEUE_NOTIFY(%ebx)
	call	rng_post
	xor	%ecx, %ecx
4:	cmp	%ax, Q_RNG + USED_OFF + 2
	je	5f
	push	%eax
	call	blk_top_up
	pop	%eax
	call	poll_delay
	inc	%ecx
	cmp	$(RNG_POLL_MAX * TIME_SCALE), %ecx
	jb	4b
	lea	msg_t, %esi
	call	puts
	jmp	3b
5:	push	%ecx
	mov	$'S', %al
	call	putc
	pop	%eax
	call	puthex32
	mov	$'\n', %al
	call	putc
	jmp	3b

/* blk_top_up: blk avail.idx = used.idx + BLK_BATCH (every ring entry is head 0). Clobbers %eax. */
blk_top_up:
	movzwl	Q_A + USED_OFF + 2, %eax
	add	$BLK_BATCH, %eax
	mov	%ax, Q_A + AVAIL_OFF + 2
	ret
#else
	xor	%edi, %edi		/* blk avail.idx */
3:	movb	$0xff, STATUSB
	add	$BLK_BATCH, %edi
	mov	%di, Q_A + AVAIL_OFF + 2
	mov	V_DEV, %ebx
	movl	$0, R_QUEUE_NOTIFY(%ebx)
	mov	$(Q_A + USED_OFF + 2), %ebx
	call	wait_used
	call	rng_probe
	mov	$'T', %al
	jc	4f
	mov	$'.', %al
	cmpb	$0, STATUSB
	je	4f
	mov	$'x', %al
4:	call	putc
	jmp	3b
#endif
#endif

/* ---------------------------------------------------------------------------------------- */
#if defined(MODE_NET)
net_long_chain:
	mov	$ID_NET, %eax
	call	find_dev
	mov	%ebx, V_DEV
	call	dev_begin
	mov	$'i', %al
	testl	$F_INDIRECT_DESC, V_FEAT
	jz	fail
	xor	%ecx, %ecx		/* rx */
	mov	$16, %edx
	mov	$Q_A, %edi
	call	queue_init
	mov	$1, %ecx		/* tx: ready, never used */
	mov	$16, %edx
	mov	$Q_B, %edi
	call	queue_init
	call	dev_ok

	/* NET_SEGS device-writable descriptors of 16 bytes, all the same buffer. */
	mov	$ITABLE, %edx
	mov	$1, %ecx
1:	movl	$NETBUF, 0(%edx)
	movl	$16, 8(%edx)
	movw	$(DESC_F_NEXT | DESC_F_WRITE), 12(%edx)
	mov	%cx, 14(%edx)
	add	$16, %edx
	inc	%ecx
	cmp	$NET_SEGS, %ecx
	jb	1b
	movl	$NETBUF, 0(%edx)
	movl	$16, 8(%edx)
	movw	$DESC_F_WRITE, 12(%edx)
	movl	$ITABLE, Q_A + 0
	movl	$(16 * NET_SEGS), Q_A + 8
	movw	$DESC_F_INDIRECT, Q_A + 12
	movw	$AVAIL_F_NO_INTERRUPT, Q_A + AVAIL_OFF
	movw	$1, Q_A + AVAIL_OFF + 2	/* ring[0] = head 0 (zero already) */
	movl	$0, R_QUEUE_NOTIFY(%ebx)
	lea	msg_n, %esi
	call	puts

	mov	$(NET_POLL_MAX * TIME_SCALE), %ecx
2:	cmpw	$1, Q_A + USED_OFF + 2
	je	3f
	call	poll_delay
	dec	%ecx
	jnz	2b
	lea	msg_u, %esi
	call	puts
	jmp	4f
3:	mov	$'U', %al
	call	putc
	mov	Q_A + USED_OFF + 8, %eax	/* used.ring[0].len */
	call	puthex32
	mov	$'\n', %al
	call	putc
4:	call	rng_probe
	lea	msg_t, %esi
	jc	5f
	lea	msg_r, %esi
5:	call	puts
	lea	msg_h, %esi
	call	puts
6:	cli
	hlt
	jmp	6b
#endif

/* ---------------------------------------------------------------------------------------- */

/* find_dev: %eax = device ID; %ebx = the first virtio-mmio v2 window with it, or fail 'n'. */
find_dev:
	mov	$TYPV_BASE, %ebx
	mov	$TYPV_SLOTS, %ecx
1:	cmpl	$MAGIC, R_MAGIC(%ebx)
	jne	2f
	cmpl	$2, R_VERSION(%ebx)
	jne	2f
	cmp	R_DEVICE_ID(%ebx), %eax
	jne	2f
	ret
2:	add	$TYPV_STRIDE, %ebx
	dec	%ecx
	jnz	1b
	mov	$'n', %al
	jmp	fail

/*
 * dev_begin: %ebx = the window. Reset, ACKNOWLEDGE, DRIVER, features VERSION_1 plus
 * INDIRECT_DESC when offered (the low word accepted goes to V_FEAT), FEATURES_OK.
 */
dev_begin:
	movl	$0, R_STATUS(%ebx)
1:	cmpl	$0, R_STATUS(%ebx)
	jne	1b
	movl	$S_ACKNOWLEDGE, R_STATUS(%ebx)
	movl	$(S_ACKNOWLEDGE | S_DRIVER), R_STATUS(%ebx)
	movl	$1, R_DEVICE_FEATURES_SEL(%ebx)
	mov	$'v', %al
	testl	$1, R_DEVICE_FEATURES(%ebx)
	jz	fail
	movl	$0, R_DEVICE_FEATURES_SEL(%ebx)
	mov	R_DEVICE_FEATURES(%ebx), %eax
	and	$F_INDIRECT_DESC, %eax
	mov	%eax, V_FEAT
	movl	$0, R_DRIVER_FEATURES_SEL(%ebx)
	mov	%eax, R_DRIVER_FEATURES(%ebx)
	movl	$1, R_DRIVER_FEATURES_SEL(%ebx)
	movl	$1, R_DRIVER_FEATURES(%ebx)
	movl	$(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK), R_STATUS(%ebx)
	mov	$'f', %al
	testl	$S_FEATURES_OK, R_STATUS(%ebx)
	jz	fail
	ret

/* queue_init: %ebx window, %ecx queue index, %edx size, %edi area (desc, +avail, +used). */
queue_init:
	mov	$'q', %al
	mov	%ecx, R_QUEUE_SEL(%ebx)
	cmpl	$0, R_QUEUE_READY(%ebx)
	jne	fail
	cmp	R_QUEUE_NUM_MAX(%ebx), %edx
	ja	fail
	mov	%edx, R_QUEUE_NUM(%ebx)
	mov	%edi, R_QUEUE_DESC_LOW(%ebx)
	movl	$0, R_QUEUE_DESC_HIGH(%ebx)
	lea	AVAIL_OFF(%edi), %eax
	mov	%eax, R_QUEUE_DRIVER_LOW(%ebx)
	movl	$0, R_QUEUE_DRIVER_HIGH(%ebx)
	lea	USED_OFF(%edi), %eax
	mov	%eax, R_QUEUE_DEVICE_LOW(%ebx)
	movl	$0, R_QUEUE_DEVICE_HIGH(%ebx)
	movl	$1, R_QUEUE_READY(%ebx)
	mov	$'q', %al
	cmpl	$1, R_QUEUE_READY(%ebx)
	jne	fail
	ret

/* dev_ok: %ebx window: DRIVER_OK, and the device did not ask for a reset. */
dev_ok:
	movl	$(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), R_STATUS(%ebx)
	mov	$'k', %al
	testl	$S_NEEDS_RESET, R_STATUS(%ebx)
	jnz	fail
	ret

/* wait_used: %ebx = &used.idx, %di = the avail.idx it must reach; fail 'w' after WAIT_POLL_MAX. */
wait_used:
	mov	$WAIT_POLL_MAX, %ecx
1:	cmp	%di, (%ebx)
	je	2f
	call	poll_delay
	dec	%ecx
	jnz	1b
	mov	$'w', %al
	jmp	fail
2:	ret

/*
 * rng_probe: one 64-byte virtio-rng request, polled at most RNG_POLL_MAX times. CF clear and
 * %ecx = the polls it took when served; CF set when not (it stays outstanding; the next probe
 * waits for both). Preserves %ebx, %edi, %ebp.
 */
rng_probe:
	push	%ebx
	call	rng_post
	xor	%ecx, %ecx
1:	cmp	%ax, Q_RNG + USED_OFF + 2
	je	2f
	call	poll_delay
	inc	%ecx
	cmp	$(RNG_POLL_MAX * TIME_SCALE), %ecx
	jb	1b
	pop	%ebx
	stc
	ret
2:	pop	%ebx
	clc
	ret

/* rng_post: makes one rng request available and kicks; %ax = the used.idx that means done. */
rng_post:
	mov	V_RNG_IDX, %eax
	mov	%eax, %edx
	and	$15, %edx
	movw	$0, Q_RNG + AVAIL_OFF + 4(, %edx, 2)
	inc	%eax
	mov	%eax, V_RNG_IDX
	mov	%ax, Q_RNG + AVAIL_OFF + 2
	mov	V_RNG, %edx
	movl	$0, R_QUEUE_NOTIFY(%edx)
	ret

/*
 * calibrate: V_POLL_TSC = the TSC ticks of POLL_US microseconds, measured against 10 ms of the
 * PIT's channel 2 (mode 0; its output, port 0x61 bit 5, rises at the end of the count: KVM's
 * in-kernel PIT, as Linux's pit_calibrate_tsc uses it). Every poll loop waits that long per
 * poll (poll_delay), so that a limit of N polls is the same time on any KVM: `pause` alone
 * took ~15 us under PVM but well under 1 us on hardware and in the lab's nested AMD-V, where
 * the limits ran out before a busy device could answer. Without a PIT answer (no output rise
 * within 2^30 TSC ticks) V_POLL_TSC stays 0: a poll is one `pause`, as before.
 */
#define PIT_10MS 11932 /* 1193182 Hz x 10 ms */
calibrate:
	movl	$0, V_POLL_TSC
	in	$0x61, %al
	and	$0xfc, %al		/* speaker off */
	or	$1, %al			/* channel 2's gate on */
	out	%al, $0x61
	mov	$0xb0, %al		/* channel 2, low then high byte, mode 0, binary */
	out	%al, $0x43
	mov	$(PIT_10MS & 0xff), %al
	out	%al, $0x42
	mov	$(PIT_10MS >> 8), %al
	out	%al, $0x42
	rdtsc
	mov	%eax, %ebx
1:	in	$0x61, %al
	test	$0x20, %al
	jnz	2f
	rdtsc
	sub	%ebx, %eax
	cmp	$0x40000000, %eax	/* 2^30 ticks (a quarter of a second or more) and no end */
	jb	1b
	ret
2:	rdtsc
	sub	%ebx, %eax		/* TSC ticks in 10 ms (32 bits: below 429 GHz) */
	mov	$POLL_US, %edx
	mul	%edx
	mov	$10000, %ecx
	div	%ecx
	mov	%eax, V_POLL_TSC
	ret

/* poll_delay: one poll's wait, V_POLL_TSC TSC ticks (at least one `pause`). Preserves all. */
poll_delay:
	push	%eax
	push	%ecx
	push	%edx
	rdtsc
	mov	%eax, %ecx
1:	pause
	rdtsc
	sub	%ecx, %eax
	cmp	V_POLL_TSC, %eax
	jb	1b
	pop	%edx
	pop	%ecx
	pop	%eax
	ret

/* fail: %al = the reason letter: "E<reason>\n", then halt. */
fail:
	mov	%al, %cl
	mov	$'E', %al
	call	putc
	mov	%cl, %al
	call	putc
	mov	$'\n', %al
	call	putc
1:	cli
	hlt
	jmp	1b

/* putc: %al to COM1. Clobbers %edx. */
putc:
	mov	$COM1, %dx
	out	%al, %dx
	ret

/* puts: the NUL-terminated string at %esi. Clobbers %eax, %edx, %esi. */
puts:
	mov	$COM1, %dx
1:	lodsb
	test	%al, %al
	jz	2f
	out	%al, %dx
	jmp	1b
2:	ret

/* puthex32: %eax as 8 hex digits. Clobbers %eax, %ecx, %edx. */
puthex32:
	mov	$8, %ecx
	mov	$COM1, %dx
1:	rol	$4, %eax
	push	%eax
	and	$0xf, %al
	add	$'0', %al
	cmp	$'9', %al
	jbe	2f
	add	$('a' - '9' - 1), %al
2:	out	%al, %dx
	pop	%eax
	dec	%ecx
	jnz	1b
	ret

	.section .rodata
msg_up:	.asciz "hostile up\n"
msg_flood: .asciz "F\n"
msg_t:	.asciz "T\n"
msg_n:	.asciz "N\n"
msg_u:	.asciz "u\n"
msg_r:	.asciz "R\n"
msg_h:	.asciz "H\n"
msg_b:	.asciz "B\n"
msg_k:	.asciz "K\n"
msg_k_no: .asciz "k\n"

	/* The PVH entry point, as Linux's arch/x86/platform/pvh/head.S declares it. */
	.section .note.Xen, "a", @note
	.align 4
	.long 4            /* namesz */
	.long 4            /* descsz */
	.long 18           /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long _start
