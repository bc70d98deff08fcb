/*
 * What micro.S's virtio drivers share (included with blkloop.S or netloop.S): findDevice,
 * negotiate, setupQueue and fail.
 *
 * findDevice: the first version-2 virtio-mmio transport whose DeviceID is %edi, at
 * Typervisor's addresses or QEMU microvm's (virtio-mmio.h). CF clear and %esi at its
 * registers, or CF set; %ecx and %edx clobbered.
 */
findDevice:
	mov	$TYPV_BASE, %esi
	mov	$TYPV_SLOTS, %ecx
	mov	$TYPV_STRIDE, %edx
	call	1f
	jnc	3f
	mov	$QEMU_BASE, %esi
	mov	$QEMU_SLOTS, %ecx
	mov	$QEMU_STRIDE, %edx
1:	cmpl	$MAGIC, R_MAGIC(%esi)
	jne	2f
	cmpl	$2, R_VERSION(%esi)
	jne	2f
	cmp	%edi, R_DEVICE_ID(%esi)
	jne	2f
	clc
	ret
2:	add	%edx, %esi
	dec	%ecx
	jnz	1b
	stc
3:	ret

	/*
	 * negotiate: the device at %esi reset (done once Status reads 0, §2.4.2), then ACKNOWLEDGE,
	 * DRIVER, VERSION_1 as the only feature, FEATURES_OK read back (the device may refuse):
	 * "Ev" without VERSION_1, "Ef" when refused. %al clobbered.
	 */
negotiate:
	movl	$0, R_STATUS(%esi)
1:	cmpl	$0, R_STATUS(%esi)
	jne	1b
	movl	$S_ACKNOWLEDGE, R_STATUS(%esi)
	movl	$(S_ACKNOWLEDGE | S_DRIVER), R_STATUS(%esi)
	movl	$1, R_DEVICE_FEATURES_SEL(%esi)
	mov	$'v', %al
	testl	$1, R_DEVICE_FEATURES(%esi) /* bit 32: VIRTIO_F_VERSION_1 */
	jz	fail
	movl	$0, R_DRIVER_FEATURES_SEL(%esi)
	movl	$0, R_DRIVER_FEATURES(%esi)
	movl	$1, R_DRIVER_FEATURES_SEL(%esi)
	movl	$1, R_DRIVER_FEATURES(%esi)
	movl	$(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK), R_STATUS(%esi)
	mov	$'f', %al
	testl	$S_FEATURES_OK, R_STATUS(%esi)
	jz	fail
	ret

	/*
	 * setupQueue (§4.2.3.2): queue %ecx, not live yet and at least QSIZE (the driver's) long,
	 * with its descriptors at %edx, its avail ring at +0x1000 and its used ring at +0x2000;
	 * "Eq" when it is not usable. %eax clobbered.
	 */
setupQueue:
	mov	$'q', %al
	mov	%ecx, R_QUEUE_SEL(%esi)
	cmpl	$0, R_QUEUE_READY(%esi)
	jne	fail
	cmpl	$QSIZE, R_QUEUE_NUM_MAX(%esi)
	jb	fail
	movl	$QSIZE, R_QUEUE_NUM(%esi)
	mov	%edx, R_QUEUE_DESC_LOW(%esi)
	movl	$0, R_QUEUE_DESC_HIGH(%esi)
	lea	0x1000(%edx), %eax
	mov	%eax, R_QUEUE_DRIVER_LOW(%esi)
	movl	$0, R_QUEUE_DRIVER_HIGH(%esi)
	lea	0x2000(%edx), %eax
	mov	%eax, R_QUEUE_DEVICE_LOW(%esi)
	movl	$0, R_QUEUE_DEVICE_HIGH(%esi)
	movl	$1, R_QUEUE_READY(%esi)
	cmpl	$1, R_QUEUE_READY(%esi)
	jne	fail
	ret

	/* %al: the reason letter. Prints "E<reason>\n" and resets. */
fail:
	mov	%al, %cl
	mov	$COM1, %dx
	mov	$'E', %al
	out	%al, %dx
	mov	%cl, %al
	out	%al, %dx
	mov	$'\n', %al
	out	%al, %dx
	jmp	reset
