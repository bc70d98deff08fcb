/**
 * Gives class `cls` the name `name` whatever the build did to it: the bundles are minified
 * (scripts/bundle.mjs), which renames classes, and an error's `name` (the first word of its
 * message in a stack trace) comes from its class here.
 */
export function keepName<T extends abstract new (...args: never[]) => unknown>(
  cls: T,
  name: string,
): T {
  Object.defineProperty(cls, 'name', { value: name, configurable: true });
  return cls;
}

/** Base class of errors that should reach the user as one clear line. */
export class TypervisorError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}
keepName(TypervisorError, 'TypervisorError');

/** A configuration or argument problem the user can fix. */
export class ConfigError extends TypervisorError {}
keepName(ConfigError, 'ConfigError');

/** The host cannot do what we need (missing /dev/kvm, capability, permission...). */
export class HostError extends TypervisorError {}
keepName(HostError, 'HostError');

/** The guest image (kernel, initrd, disk) is unusable. */
export class ImageError extends TypervisorError {}
keepName(ImageError, 'ImageError');

/** A guest memory access outside guest RAM. */
export class GuestMemoryError extends TypervisorError {}
keepName(GuestMemoryError, 'GuestMemoryError');
