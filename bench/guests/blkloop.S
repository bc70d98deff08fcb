/*
 * MODE_BLKLOOP of micro.S (included there, after `reset`): a polled virtio-blk driver over
 * virtio-mmio version 2 (virtio 1.2 §4.2.3, §3.1.1, §2.7, §5.2.6) that reads BLK_COUNT
 * requests of BLK_BYTES each, one in flight, cycling over the disk, and checks every one.
 *
 * The disk must hold the harness's pattern: every 512-byte sector starts with its own sector
 * number (u32, little endian). Each request checks the first word of its first and its last
 * sector, poisoned (0xffffffff) beforehand so that a request that wrote nothing fails too. The
 * guest does a constant, small amount of work per request whatever BLK_BYTES is: on a PVM host
 * KVM runs this 32-bit, paging-off guest through its instruction emulator, so every guest
 * instruction costs about a microsecond there.
 *
 * Prints "D\n" when done, or "E" + a reason letter + "\n" on COM1, then resets:
 *   n no device   v no VERSION_1   f FEATURES_OK refused   c capacity   q queue 0 unusable
 *   k DEVICE_NEEDS_RESET   u used id   l used len   s status byte   d data
 *
 * Interrupts stay off (cli, and VIRTQ_AVAIL_F_NO_INTERRUPT asks the device not to send any): the
 * driver polls used.idx. x86 keeps stores in order and loads in order, so no fences are needed
 * between the ring entry and avail.idx, nor between used.idx and the data (§2.7.13.3).
 */
#ifndef BLK_COUNT
#define BLK_COUNT 1000
#endif
#ifndef BLK_BYTES
#define BLK_BYTES 4096
#endif
#define BLK_SECTORS (BLK_BYTES / 512)
/*
 * BLK_DATA_HIGH (test/host/device-memory-io.test.ts): the data buffer at guest-physical
 * BLK_DATA_HIGH << 32 instead of DATA, above 4 GiB where this paging-off guest cannot reach it
 * (device memory: a pmem file). Only the device touches the buffer: the guest checks the used
 * length and the status byte, not the data (the harness reads the file). With BLK_WRITE_KEY the
 * write pass writes what the harness put in the buffer, and the key is unused.
 */
#if BLK_BYTES % 512 || BLK_BYTES == 0 || BLK_BYTES > 0x1000000
#error "BLK_BYTES: a non-zero multiple of 512, at most 16 MiB"
#endif

#include "virtio-mmio.h"

/* Guest RAM used (zeroed first; 64 MiB guests): the split queue, the request, the buffer. */
#define QSIZE 16
#define DESC 0x200000 /* 16 * QSIZE bytes, 16-aligned */
#define AVAIL 0x201000 /* flags, idx, ring[QSIZE] */
#define USED 0x202000 /* flags, idx, ring[QSIZE] of {id u32, len u32} */
#define HDR 0x203000 /* type u32, reserved u32, sector u64 */
#define STATUSB 0x203010
#define CAPACITY 0x203020 /* the disk's sectors (u32) */
#define GENERATION 0x203024 /* MODE_BLKWATCH: ConfigGeneration before the change */
#define PHASE 0x203028 /* MODE_BLKWATCH: 0 before the change, 1 after */
#define DATA 0x210000

	/* %esi: the device; %ebx: sector; %ebp: requests left; %edi: next avail.idx */
blkloop:
	mov	$2, %edi /* virtio-blk */
	call	findDevice
	jnc	found
	mov	$'n', %al
	jmp	fail

found:
	/* The rings and the request, zeroed (avail.idx and used.idx start at 0). */
	mov	$DESC, %edx
1:	movl	$0, (%edx)
	add	$4, %edx
	cmp	$(HDR + 0x100), %edx
	jb	1b

	call	negotiate /* §3.1.1 up to FEATURES_OK: VERSION_1 and nothing else */

	/* The capacity: below 2^32 sectors, and at least one request long. */
	mov	$'c', %al
	cmpl	$0, R_CONFIG+4(%esi)
	jne	fail
	mov	R_CONFIG(%esi), %ecx
	cmp	$BLK_SECTORS, %ecx
	jb	fail
	mov	%ecx, CAPACITY

	/* Queue 0 (§4.2.3.2): its descriptors at DESC, avail at AVAIL, used at USED. */
	xor	%ecx, %ecx
	mov	$DESC, %edx
	call	setupQueue

	/* One chain, reused: header (device-readable), data and status (device-writable). */
	movl	$HDR, DESC + 0
	movl	$16, DESC + 8
	movw	$DESC_F_NEXT, DESC + 12
	movw	$1, DESC + 14
#ifdef BLK_DATA_HIGH
	movl	$0, DESC + 16
	movl	$BLK_DATA_HIGH, DESC + 20
#else
	movl	$DATA, DESC + 16
#endif
	movl	$BLK_BYTES, DESC + 24
	movw	$(DESC_F_NEXT | DESC_F_WRITE), DESC + 28
	movw	$2, DESC + 30
	movl	$STATUSB, DESC + 32
	movl	$1, DESC + 40
	movw	$DESC_F_WRITE, DESC + 44
#ifndef BLK_ISR
	movw	$AVAIL_F_NO_INTERRUPT, AVAIL + 0
#endif
	/* HDR: type VIRTIO_BLK_T_IN (0), reserved 0: already zero. */

	movl	$(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), R_STATUS(%esi)
	mov	$'k', %al
	testl	$S_NEEDS_RESET, R_STATUS(%esi)
	jnz	fail

	xor	%ebx, %ebx
	xor	%edi, %edi
	mov	$BLK_COUNT, %ebp
#ifdef BLK_WRITE_KEY
	/*
	 * Write pass (test/host/blk-async.test.ts): BLK_COUNT requests of VIRTIO_BLK_T_OUT from
	 * sector 0 (the disk must hold them without wrapping), each with the first word of its first
	 * and last sector = sector ^ BLK_WRITE_KEY; then a VIRTIO_BLK_T_FLUSH; then the read loop
	 * below checks that pattern instead of the disk's own.
	 */
	movl	$1, HDR /* VIRTIO_BLK_T_OUT */
	movw	$DESC_F_NEXT, DESC + 28 /* data: device-readable */
wrequest:
	mov	%ebx, HDR + 8
	movb	$0xff, STATUSB
#ifndef BLK_DATA_HIGH /* else the buffer holds what the harness put there */
	mov	%ebx, %eax
	xor	$BLK_WRITE_KEY, %eax
	mov	%eax, DATA
	lea	BLK_SECTORS - 1(%ebx), %eax
	xor	$BLK_WRITE_KEY, %eax
	mov	%eax, DATA + BLK_BYTES - 512
#endif
	call	submit
	mov	$'l', %al
	cmpl	$1, USED + 8(, %ecx, 8) /* a write: only the status byte written */
	jne	fail
	mov	$'s', %al
	cmpb	$0, STATUSB
	jne	fail
	add	$BLK_SECTORS, %ebx
	dec	%ebp
	jnz	wrequest
	/* The flush: header, then status (descriptor 0 chains to 2). */
	movl	$4, HDR /* VIRTIO_BLK_T_FLUSH */
	movl	$0, HDR + 8
	movw	$2, DESC + 14
	movb	$0xff, STATUSB
	call	submit
	mov	$'l', %al
	cmpl	$1, USED + 8(, %ecx, 8)
	jne	fail
	mov	$'s', %al
	cmpb	$0, STATUSB
	jne	fail
	/* Back to reads. */
	movl	$0, HDR
	movw	$1, DESC + 14
	movw	$(DESC_F_NEXT | DESC_F_WRITE), DESC + 28
	xor	%ebx, %ebx
	mov	$BLK_COUNT, %ebp
	jmp	request

	/* Publishes head 0, kicks queue 0 and polls until it is used; %ecx: its used slot. */
submit:
	mov	%edi, %eax
	and	$(QSIZE - 1), %eax
	movw	$0, AVAIL + 4(, %eax, 2)
	inc	%edi
	mov	%di, AVAIL + 2
	movl	$0, R_QUEUE_NOTIFY(%esi)
1:	pause
	cmp	%di, USED + 2
	jne	1b
	lea	-1(%edi), %ecx
	and	$(QSIZE - 1), %ecx
	mov	$'u', %al
	cmpl	$0, USED + 4(, %ecx, 8)
	jne	fail
	ret
#endif
request:
	mov	%ebx, HDR + 8
	movb	$0xff, STATUSB
#ifndef BLK_DATA_HIGH
	movl	$0xffffffff, DATA
	movl	$0xffffffff, DATA + BLK_BYTES - 512
#endif
	/* Publish head 0 in the ring, then the new avail.idx, then kick queue 0. */
	mov	%edi, %eax
	and	$(QSIZE - 1), %eax
	movw	$0, AVAIL + 4(, %eax, 2)
	inc	%edi
	mov	%di, AVAIL + 2
	movl	$0, R_QUEUE_NOTIFY(%esi)
2:	pause
	cmp	%di, USED + 2
	jne	2b
#ifdef BLK_ISR
	/*
	 * The register accesses of Linux's vm_interrupt, once per request: read InterruptStatus
	 * and acknowledge what it read. Here the device interrupts (no VIRTQ_AVAIL_F_NO_INTERRUPT),
	 * though the guest polls with interrupts off (cli), so the bit is mostly set. The read exits
	 * to the VMM unless it has a register page (vmm/register-pages.ts), the acknowledgement of 1
	 * unless KVM takes it on an eventfd (virtio-plan.ts `ackFd`). The micro suite's `blk4k-isr`.
	 */
	mov	R_INTERRUPT_STATUS(%esi), %eax
	mov	%eax, R_INTERRUPT_ACK(%esi)
#endif

	/* The used element (§2.7.8): head 0, header excluded, data + status written. */
	lea	-1(%edi), %ecx
	and	$(QSIZE - 1), %ecx
	mov	$'u', %al
	cmpl	$0, USED + 4(, %ecx, 8)
	jne	fail
	mov	$'l', %al
	cmpl	$(BLK_BYTES + 1), USED + 8(, %ecx, 8)
	jne	fail
	mov	$'s', %al
	cmpb	$0, STATUSB /* VIRTIO_BLK_S_OK */
	jne	fail
	mov	$'d', %al
#if defined(BLK_DATA_HIGH)
	/* the data is out of reach: the harness checks it */
#elif defined(BLK_WRITE_KEY)
	mov	%ebx, %ecx
	xor	$BLK_WRITE_KEY, %ecx
	cmp	%ecx, DATA
	jne	fail
	lea	BLK_SECTORS - 1(%ebx), %ecx
	xor	$BLK_WRITE_KEY, %ecx
#else
	cmp	%ebx, DATA
	jne	fail
	lea	BLK_SECTORS - 1(%ebx), %ecx
#endif
#ifndef BLK_DATA_HIGH
	cmp	%ecx, DATA + BLK_BYTES - 512
	jne	fail
#endif

	/* The next sector; wrap when the next request would run past the disk. */
	add	$BLK_SECTORS, %ebx
	lea	BLK_SECTORS(%ebx), %eax
	cmp	CAPACITY, %eax
	jbe	4f
	xor	%ebx, %ebx
4:	dec	%ebp
	jnz	request

#ifdef MODE_BLKWATCH
	/*
	 * PATCH /drives (test/host/drive-patch.test.ts): the disk's tag (byte 4 of the sector just
	 * read) is printed; before the change, "R\n" says the guest is watching, and it polls the
	 * capacity until it changes. Then the change must come with the config-change InterruptStatus
	 * bit and a new ConfigGeneration ("Ei", "Eg"), and one read of the new disk's last sector
	 * (past the old capacity) follows: its tag, then "D\n".
	 */
	mov	$COM1, %dx
	mov	DATA + 4, %al
	out	%al, %dx
	cmpl	$0, PHASE
	jne	5f
	movl	$1, PHASE
	mov	$'R', %al
	out	%al, %dx
	mov	$'\n', %al
	out	%al, %dx
	mov	R_CONFIG_GENERATION(%esi), %eax
	mov	%eax, GENERATION
6:	pause
	mov	R_CONFIG(%esi), %eax
	cmp	CAPACITY, %eax
	je	6b
	mov	%eax, CAPACITY
	mov	$'i', %al
	testl	$2, R_INTERRUPT_STATUS(%esi)
	jz	fail
	movl	$2, R_INTERRUPT_ACK(%esi)
	mov	$'g', %al
	mov	R_CONFIG_GENERATION(%esi), %ecx
	cmp	GENERATION, %ecx
	je	fail
	mov	CAPACITY, %ebx
	dec	%ebx
	mov	$1, %ebp
	jmp	request
5:
#endif

	mov	$COM1, %dx
	mov	$'D', %al
	out	%al, %dx
	mov	$'\n', %al
	out	%al, %dx
#ifdef MODE_BLKWATCH
7:	pause /* stays up: the test reads GET /vm/config, then kills the VMM */
	jmp	7b
#endif
	jmp	reset
