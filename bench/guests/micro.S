/*
 * The micro benchmark guest: an ELF64 file with a PVH entry note (Xen ELFNOTE 18), entered in
 * 32-bit protected mode with paging off, like test/guests/tiny.S, but it ends the VM in a way
 * that Typervisor, QEMU microvm and the C floor (bench/floor.c) all treat as "exit": the i8042
 * reset (0xfe to port 0x64; QEMU needs `-device i8042 -no-reboot`).
 *
 * It prints "M\n" on the 16550 at 0x3f8 (the harness times the first stdout byte: the same
 * observation for every VMM), writes the boot marker to port 0x3f0 (Typervisor's and the
 * floor's boot timer), then:
 *   MODE_MARK     resets at once (start -> marker, start -> exit, peak RSS, starts/s)
 *   MODE_SPIN     spins forever (RSS sampling while the guest runs)
 *   MODE_IDLE     halts forever with interrupts off (an idle VM: bench/density.ts)
 *   MODE_PIOLOOP  LOOP_COUNT writes to port 0x3f1 (claimed by nobody), then resets (exits/s)
 *   MODE_BLKLOOP  BLK_COUNT virtio-blk reads of BLK_BYTES each, one in flight, then "D\n" and
 *                 the reset (blkloop.S: the driver, the disk pattern it expects, its errors)
 *   MODE_BLKWATCH one read, then waits for the disk to change (PATCH /drives) and reads the new
 *                 disk's last sector (blkloop.S)
 *   MODE_NETLOOP  NET_COUNT ICMP echo round trips with the host over virtio-net, one at a time,
 *                 then "D\n" and the reset (netloop.S)
 */
#define COM1 0x3f8
#define MARKER_PORT 0x3f0
#ifndef LOOP_COUNT
#define LOOP_COUNT 100000
#endif

	.code32
	.section .text
	.globl _start
_start:
	cli
	mov	$0x8ff0, %esp
	mov	$COM1, %dx
	mov	$'M', %al
	out	%al, %dx
	mov	$'\n', %al
	out	%al, %dx
	mov	$MARKER_PORT, %dx
	mov	$1, %al
	out	%al, %dx

#if defined(MODE_MARK)
	jmp	reset
#elif defined(MODE_SPIN)
1:	pause
	jmp	1b
#elif defined(MODE_IDLE)
1:	hlt
	jmp	1b
#elif defined(MODE_PIOLOOP)
	mov	$LOOP_COUNT, %ecx
	mov	$0x3f1, %dx
1:	out	%al, %dx
	dec	%ecx
	jnz	1b
	jmp	reset
#elif defined(MODE_BLKLOOP) || defined(MODE_BLKWATCH)
	jmp	blkloop
#elif defined(MODE_NETLOOP)
	jmp	netloop
#else
#error "pick a MODE_"
#endif

reset:
	mov	$0xfe, %al
	out	%al, $0x64
2:	hlt
	jmp	2b

#if defined(MODE_BLKLOOP) || defined(MODE_BLKWATCH)
#include "blkloop.S"
#include "virtio-mmio.S"
#elif defined(MODE_NETLOOP)
#include "netloop.S"
#include "virtio-mmio.S"
#endif

	/* The PVH entry point, as Linux's arch/x86/platform/pvh/head.S declares it. */
	.section .note.Xen, "a", @note
	.align 4
	.long 4            /* namesz */
	.long 4            /* descsz */
	.long 18           /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long _start
