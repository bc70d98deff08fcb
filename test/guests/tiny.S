/*
 * A tiny guest for host KVM tests and the micro benchmark: an ELF64 file with a PVH entry note
 * (Xen ELFNOTE 18), entered in 32-bit protected mode with paging off, as Linux's vmlinux is.
 * Build variants with -DMODE_xxx (see build.sh). It prints through the 16550 at 0x3f8, writes the
 * boot marker to port 0x3f0, then does one thing:
 *   MODE_POWEROFF  ACPI S5 through the sleep control register (MMIO 0xfeb00100)
 *   MODE_RESET     i8042 reset (0xfe to port 0x64)
 *   MODE_TRIPLE    #UD with an empty IDT: a triple fault
 *   MODE_SPIN      spins forever (for pause and kick tests)
 *   MODE_PIOLOOP   LOOP_COUNT writes to port 0x3f1 (unclaimed), then poweroff (exit-rate bench)
 *   MODE_MMIO      reads and writes an unclaimed MMIO address, prints what it read, poweroff
 */
#define COM1 0x3f8
#define MARKER_PORT 0x3f0
#define SLEEP_CTL 0xfeb00100
#define S5_VALUE ((5 << 2) | (1 << 5))
#ifndef LOOP_COUNT
#define LOOP_COUNT 100000
#endif

	.code32
	.section .text
	.globl _start
_start:
	cli
	mov	$0x8ff0, %esp
	lea	msg, %esi
1:	lodsb
	test	%al, %al
	jz	2f
	mov	$COM1, %dx
	out	%al, %dx
	jmp	1b
2:	mov	$MARKER_PORT, %dx
	mov	$1, %al
	out	%al, %dx

#if defined(MODE_POWEROFF)
	jmp	poweroff
#elif defined(MODE_RESET)
	mov	$0x64, %dx
	mov	$0xfe, %al
	out	%al, %dx
3:	jmp	3b
#elif defined(MODE_TRIPLE)
	lidt	empty_idt
	ud2
#elif defined(MODE_SPIN)
3:	pause
	jmp	3b
#elif defined(MODE_PIOLOOP)
	mov	$LOOP_COUNT, %ecx
	mov	$0x3f1, %dx
3:	out	%al, %dx
	dec	%ecx
	jnz	3b
	jmp	poweroff
#elif defined(MODE_MMIO)
	mov	$0xd0000000, %ebx
	movl	$0x12345678, (%ebx)
	mov	(%ebx), %eax
	cmp	$0xffffffff, %eax
	jne	4f
	mov	$'F', %al
	mov	$COM1, %dx
	out	%al, %dx
4:	jmp	poweroff
#else
#error "pick a MODE_"
#endif

poweroff:
	mov	$S5_VALUE, %al
	mov	%al, SLEEP_CTL
5:	hlt
	jmp	5b

	.section .rodata
msg:	.asciz "tiny guest up\n"
	.align 8
empty_idt:
	.word 0
	.long 0

	/* The PVH entry point, as Linux's arch/x86/platform/pvh/head.S declares it. */
	.section .note.Xen, "a", @note
	.align 4
	.long 4            /* namesz */
	.long 4            /* descsz */
	.long 18           /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long _start
