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
 *   MODE_PIOSPIN   writes to port 0x3f1 (unclaimed) forever (pause tests that watch exit counts)
 *   MODE_MMIO      reads and writes an unclaimed MMIO address, prints what it read, poweroff
 *   MODE_ECHO      sets MCR.OUT2 and enables the UART receive interrupt (IER.RDI: the
 *                  console's "port open" signal), polls LSR.DR and echoes every byte until '\n', then poweroff
 *   MODE_RTC       reads the CMOS RTC (B, century, year, month, day, hours, minutes, seconds)
 *                  and prints "rtc BB CC YY-MM-DD HH:MM:SS" (raw register bytes in hex), poweroff
 *   MODE_I8042     prints "kbd SS CC TT": the i8042 status, the command byte (command 0x20)
 *                  and the self-test answer (command 0xaa), poweroff
 *   MODE_CONSOLEFLOOD  a hostile console: writes 64-byte lines (63 bytes '0'..'n', then '\n') to
 *                  COM1 forever; every 256 bytes it reads the i8042 status, and a byte waiting
 *                  there (the VMM's Ctrl-Alt-Del) makes it reset through the i8042
 *   MODE_CONSOLEBURST  the same lines, BURST_BYTES bytes in all (256 KiB), then poweroff
 *   MODE_COUNT     counts forever in %esi: each step increments it, prints it as 8 hex digits and
 *                  '\n', then spins COUNT_SPIN `pause` iterations (a line every few ms, not a
 *                  flood). For snapshot tests: a restored copy continues the sequence, and the
 *                  saved rsi is the last number printed (or the next, if paused mid-line)
 *   MODE_COUNTMEM  the same, but the count lives in guest RAM at COUNT_ADDR (incremented there,
 *                  then printed): a restore whose memory file lacks the last writes shows a gap
 *                  (Diff snapshot tests)
 *   MODE_CPUID     runs CPUID for each (leaf, subleaf) of cpuid_leaves and prints a line
 *                  "cpuid LEAF SUBLEAF EAX EBX ECX EDX" (8 hex digits each), then poweroff
 *                  (CPU template and SMT tests: what the guest sees)
 */
#define COM1 0x3f8
#define MARKER_PORT 0x3f0
#define SLEEP_CTL 0xfeb00100
#define S5_VALUE ((5 << 2) | (1 << 5))
#ifndef LOOP_COUNT
#define LOOP_COUNT 100000
#endif
#ifndef COUNT_ADDR
#define COUNT_ADDR 0x200000
#endif
#ifndef COUNT_SPIN
#define COUNT_SPIN 0x10000
#endif
#ifndef BURST_BYTES
#define BURST_BYTES (256 * 1024)
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
#elif defined(MODE_PIOSPIN)
	mov	$0x3f1, %dx
3:	out	%al, %dx
	jmp	3b
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
#elif defined(MODE_ECHO)
	mov	$COM1+4, %dx		/* MCR = OUT2|RTS|DTR, as Linux's 8250 startup leaves it */
	mov	$0x0b, %al
	out	%al, %dx
	mov	$COM1+1, %dx		/* IER = RDI: the port is open, the VMM sends input */
	mov	$1, %al
	out	%al, %dx
3:	mov	$COM1+5, %dx		/* LSR */
	in	%dx, %al
	test	$1, %al			/* DR */
	jz	3b
	mov	$COM1, %dx
	in	%dx, %al		/* RBR */
	out	%al, %dx		/* THR: echo */
	cmp	$'\n', %al
	jne	3b
	jmp	poweroff
#elif defined(MODE_RTC)
	lea	rtc_msg, %esi
	call	puts
	lea	rtc_regs, %esi
3:	lodsb				/* register index; 0xff ends */
	cmp	$0xff, %al
	je	poweroff
	mov	$0x70, %dx
	out	%al, %dx
	mov	$0x71, %dx
	in	%dx, %al
	call	puthex
	lodsb				/* separator */
	mov	$COM1, %dx
	out	%al, %dx
	jmp	3b
#elif defined(MODE_I8042)
	lea	kbd_msg, %esi
	call	puts
	in	$0x64, %al		/* status */
	call	puthex
	call	space
	mov	$0x20, %al		/* read command byte */
	out	%al, $0x64
	in	$0x60, %al
	call	puthex
	call	space
	mov	$0xaa, %al		/* controller self-test: 0x55 */
	out	%al, $0x64
	in	$0x60, %al
	call	puthex
	mov	$'\n', %al
	mov	$COM1, %dx
	out	%al, %dx
	jmp	poweroff
#elif defined(MODE_CONSOLEFLOOD) || defined(MODE_CONSOLEBURST)
	xor	%ecx, %ecx
3:	mov	%cl, %al
	and	$0x3f, %al
	cmp	$0x3f, %al
	jne	4f
	mov	$0xda, %al		/* '\n' - '0' (mod 256): the line's last byte */
4:	add	$'0', %al
	mov	$COM1, %dx
	out	%al, %dx
	inc	%ecx
#if defined(MODE_CONSOLEBURST)
	cmp	$BURST_BYTES, %ecx
	je	poweroff
#endif
	test	$0xff, %cl
	jnz	3b
	in	$0x64, %al		/* i8042 status: OBF set means Ctrl-Alt-Del was sent */
	test	$1, %al
	jz	3b
	mov	$0xfe, %al		/* reset */
	out	%al, $0x64
5:	jmp	5b
#elif defined(MODE_COUNT) || defined(MODE_COUNTMEM)
	xor	%esi, %esi
3:
#if defined(MODE_COUNTMEM)
	incl	COUNT_ADDR		/* the count lives in guest RAM: a restore needs that page */
	mov	COUNT_ADDR, %esi
#else
	inc	%esi
#endif
	mov	%esi, %ebx
	mov	$4, %ecx
4:	rol	$8, %ebx		/* most significant byte first */
	mov	%bl, %al
	call	puthex
	dec	%ecx
	jnz	4b
	mov	$'\n', %al
	mov	$COM1, %dx
	out	%al, %dx
	mov	$COUNT_SPIN, %ecx
5:	pause
	dec	%ecx
	jnz	5b
	jmp	3b
#elif defined(MODE_CPUID)
	lea	cpuid_leaves, %edi
3:	mov	(%edi), %eax
	cmp	$0xffffffff, %eax
	je	poweroff
	mov	4(%edi), %ecx
	cpuid
	push	%edx
	push	%ecx
	push	%ebx
	push	%eax
	lea	cpuid_msg, %esi
	call	puts
	mov	(%edi), %ebx
	call	put32
	mov	4(%edi), %ebx
	call	put32
	mov	$4, %esi
4:	pop	%ebx			/* eax, ebx, ecx, edx */
	call	put32
	dec	%esi
	jnz	4b
	mov	$'\n', %al
	mov	$COM1, %dx
	out	%al, %dx
	add	$8, %edi
	jmp	3b
#else
#error "pick a MODE_"
#endif

poweroff:
	mov	$S5_VALUE, %al
	mov	%al, SLEEP_CTL
5:	hlt
	jmp	5b

/* puts: prints the NUL-terminated string at %esi. Clobbers %eax, %edx, %esi. */
puts:
	mov	$COM1, %dx
1:	lodsb
	test	%al, %al
	jz	2f
	out	%al, %dx
	jmp	1b
2:	ret

/* puthex: prints %al as two hex digits. Clobbers %eax, %edx. */
puthex:
	mov	$COM1, %dx
	push	%eax
	shr	$4, %al
	call	1f
	pop	%eax
1:	and	$0xf, %al
	add	$'0', %al
	cmp	$'9', %al
	jbe	2f
	add	$'a'-'9'-1, %al
2:	out	%al, %dx
	ret

/* put32: prints a space and %ebx as 8 hex digits. Clobbers %eax, %ebx, %ecx, %edx. */
put32:
	call	space
	mov	$4, %ecx
1:	rol	$8, %ebx		/* most significant byte first */
	mov	%bl, %al
	call	puthex
	dec	%ecx
	jnz	1b
	ret

space:
	mov	$' ', %al
	mov	$COM1, %dx
	out	%al, %dx
	ret

	.section .rodata
msg:	.asciz "tiny guest up\n"
rtc_msg: .asciz "rtc "
kbd_msg: .asciz "kbd "
cpuid_msg: .asciz "cpuid"
	/* (leaf, subleaf) pairs for MODE_CPUID, then 0xffffffff */
	.align 4
cpuid_leaves:
	.long 0x0, 0, 0x1, 0, 0x7, 0, 0xb, 0, 0xb, 1, 0x80000001, 0, 0x80000008, 0, 0x8000001e, 0
	.long 0xffffffff
	/* (register, separator after it) pairs for MODE_RTC, then 0xff */
rtc_regs: .byte 0x0b, ' ', 0x32, ' ', 0x09, '-', 0x08, '-', 0x07, ' ', 0x04, ':', 0x02, ':', 0x00, '\n', 0xff
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
