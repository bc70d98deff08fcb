/** Base class of errors that should reach the user as one clear line. */
export class TypervisorError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** A configuration or argument problem the user can fix. */
export class ConfigError extends TypervisorError {}

/** The host cannot do what we need (missing /dev/kvm, capability, permission...). */
export class HostError extends TypervisorError {}

/** The guest image (kernel, initrd, disk) is unusable. */
export class ImageError extends TypervisorError {}

/** A guest memory access outside guest RAM. */
export class GuestMemoryError extends TypervisorError {}
