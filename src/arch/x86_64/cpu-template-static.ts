/**
 * Firecracker's static CPU templates by name (machine-config `cpu_template`): C3, T2, T2S and
 * T2CL for Intel hosts, T2A for AMD hosts; "None" is no template. Each masks the host's CPUID
 * (and for T2S/T2CL the IA32_ARCH_CAPABILITIES MSR) down to a fixed baseline, so a guest sees the
 * same feature set on every host of the listed models. The modifiers below give, leaf by leaf,
 * the same bits as Firecracker's published templates (docs/cpu_templates/cpu-templates.md and
 * its template files); here each register is written as [filter, value] (see cpu-template.ts).
 *
 * As Firecracker does, a template is refused on a host of another vendor or of a CPU model it
 * was not made for (family/model/stepping from CPUID leaf 1 EAX).
 */
import { ConfigError } from '../../util/errors.js';
import type { CpuidEntry } from '../../kvm/types.js';
import type { CpuTemplate, CpuidRegister } from './cpu-template.js';
import { cpuVendor } from './cpuid.js';

export const STATIC_CPU_TEMPLATES = ['C3', 'T2', 'T2S', 'T2CL', 'T2A'] as const;
export type StaticCpuTemplateName = (typeof STATIC_CPU_TEMPLATES)[number];
/** Every name machine-config's cpu_template takes ("None": no template). */
export const CPU_TEMPLATE_NAMES: readonly string[] = [...STATIC_CPU_TEMPLATES, 'None'];

/** CPUID leaf 1 EAX without the processor-type and reserved bits: family, model, stepping. */
export const CPU_MODEL = {
  SKYLAKE: 0x0005_0654,
  CASCADE_LAKE: 0x0005_0657,
  ICE_LAKE: 0x0006_06a6,
  MILAN: 0x00a0_0f11,
} as const;
const MODEL_MASK = 0x0fff_0fff;
const MSR_IA32_ARCH_CAPABILITIES = 0x10a;

type Regs = Partial<Record<CpuidRegister, [number, number]>>;
type Leaf = [leaf: number, subleaf: number, flags: number, regs: Regs];

interface StaticDef {
  vendor: 'GenuineIntel' | 'AuthenticAMD';
  models: readonly number[];
  cpuid: readonly Leaf[];
  msrs: ReadonlyArray<[addr: number, filter: bigint, value: bigint]>;
}

// The leaves all templates of the T2 family share: leaf 1 (family/model of a Haswell-class part,
// feature flags), leaf 7 (extended features), leaf 0xd (XSAVE state components).
const T2_LEAF1: Leaf = [
  0x1,
  0,
  0,
  { eax: [0x0fff_3fff, 0x0003_06f2], ecx: [0x0004_cdfc, 0], edx: [0xe864_1080, 0x1080] },
];
const T2_LEAF7: Leaf = [
  0x7,
  0,
  1,
  { ebx: [0xffef_da14, 0x200], ecx: [0x4041_5f5e, 0], edx: [0x11c, 0] },
];
const XSAVE_LEAVES: Leaf[] = [
  [0xd, 0, 1, { eax: [0x2f8, 0] }],
  [0xd, 1, 1, { eax: [0xe, 0] }],
];

const DEFS: Record<StaticCpuTemplateName, StaticDef> = {
  C3: {
    vendor: 'GenuineIntel',
    models: [CPU_MODEL.SKYLAKE, CPU_MODEL.CASCADE_LAKE, CPU_MODEL.ICE_LAKE],
    cpuid: [
      [
        0x1,
        0,
        0,
        { eax: [0x0fff_3fff, 0x0003_06e4], ecx: [0x0040_dd3c, 0], edx: [0xa864_1080, 0x1080] },
      ],
      [0x7, 0, 1, { ebx: [0xffaf_dd3c, 0], ecx: [0x4041_481e, 0], edx: [0xc, 0] }],
      ...XSAVE_LEAVES,
      [0x8000_0001, 0, 0, { ecx: [0x120, 0], edx: [0x0400_0000, 0] }],
    ],
    msrs: [],
  },
  T2: {
    vendor: 'GenuineIntel',
    models: [CPU_MODEL.SKYLAKE, CPU_MODEL.CASCADE_LAKE, CPU_MODEL.ICE_LAKE],
    cpuid: [
      T2_LEAF1,
      T2_LEAF7,
      ...XSAVE_LEAVES,
      [0x8000_0001, 0, 0, { ecx: [0x2000_0100, 0], edx: [0x0400_0000, 0] }],
      [0x8000_0008, 0, 0, { ebx: [0x200, 0] }],
    ],
    msrs: [],
  },
  T2S: {
    vendor: 'GenuineIntel',
    models: [CPU_MODEL.SKYLAKE, CPU_MODEL.CASCADE_LAKE],
    cpuid: [
      T2_LEAF1,
      T2_LEAF7,
      ...XSAVE_LEAVES,
      [0x8000_0001, 0, 0, { ecx: [0x2000_0100, 0], edx: [0x0400_0000, 0] }],
      [0x8000_0008, 0, 0, { ebx: [0x200, 0] }],
    ],
    // The whole register: the mitigation bits of a Skylake-era part.
    msrs: [[MSR_IA32_ARCH_CAPABILITIES, 0xffff_ffff_ffff_ffffn, 0x0c0a_0c4cn]],
  },
  T2CL: {
    vendor: 'GenuineIntel',
    models: [CPU_MODEL.CASCADE_LAKE, CPU_MODEL.ICE_LAKE],
    cpuid: [
      T2_LEAF1,
      T2_LEAF7,
      ...XSAVE_LEAVES,
      [0x8000_0001, 0, 0, { ecx: [0x2000_01c0, 0], edx: [0x07c0_0000, 0] }],
      [0x8000_0008, 0, 0, { ebx: [0x200, 0] }],
    ],
    // Clears the high bits and the newer "not affected" bits; the rest pass through.
    msrs: [[MSR_IA32_ARCH_CAPABILITIES, 0xffff_ffff_e2f5_1e00n, 0n]],
  },
  T2A: {
    vendor: 'AuthenticAMD',
    models: [CPU_MODEL.MILAN],
    cpuid: [
      T2_LEAF1,
      T2_LEAF7,
      ...XSAVE_LEAVES,
      [0x8000_0001, 0, 0, { ecx: [0x2000_01c4, 0], edx: [0x0640_0000, 0] }],
      [0x8000_0008, 0, 0, { ebx: [0x001c_0205, 0x001c_0004] }],
    ],
    msrs: [],
  },
};

export function isStaticCpuTemplate(name: string): name is StaticCpuTemplateName {
  return (STATIC_CPU_TEMPLATES as readonly string[]).includes(name);
}

/** The template's modifiers, whatever the host (for tests and documentation). */
export function staticCpuTemplate(name: StaticCpuTemplateName): CpuTemplate {
  const d = DEFS[name];
  return {
    kvm_capabilities: [],
    cpuid_modifiers: d.cpuid.map(([leaf, subleaf, flags, regs]) => ({
      leaf,
      subleaf,
      flags,
      modifiers: (Object.entries(regs) as Array<[CpuidRegister, [number, number]]>).map(
        ([register, [filter, value]]) => ({
          register,
          bitmap: { filter: BigInt(filter >>> 0), value: BigInt(value >>> 0) },
        }),
      ),
    })),
    msr_modifiers: d.msrs.map(([addr, filter, value]) => ({ addr, bitmap: { filter, value } })),
  };
}

const modelName = (eax: number) =>
  `family 0x${(((eax >>> 8) & 0xf) + ((eax >>> 20) & 0xff)).toString(16)} model 0x${((((eax >>> 16) & 0xf) << 4) | ((eax >>> 4) & 0xf)).toString(16)} stepping ${eax & 0xf}`;

/**
 * The static template for this host (its CPUID as KVM reports it), or a ConfigError saying why
 * it does not fit: another vendor, or a CPU model the template was not made for.
 */
export function resolveStaticCpuTemplate(name: string, host: readonly CpuidEntry[]): CpuTemplate {
  if (!isStaticCpuTemplate(name))
    throw new ConfigError(
      `cpu_template: "${name.slice(0, 64)}" is not a CPU template (one of ${CPU_TEMPLATE_NAMES.join(', ')})`,
    );
  const d = DEFS[name];
  const vendor = cpuVendor(host);
  if (vendor !== d.vendor)
    throw new ConfigError(
      `cpu_template ${name} is for ${d.vendor === 'GenuineIntel' ? 'Intel' : 'AMD'} hosts; this host's CPU vendor is ${vendor || 'unknown'}`,
    );
  const eax = (host.find((e) => e.function === 1)?.eax ?? 0) & MODEL_MASK;
  if (!d.models.includes(eax))
    throw new ConfigError(
      `cpu_template ${name} does not support this host's CPU model (${modelName(eax)}); it is made for ${d.models.map(modelName).join(', ')}`,
    );
  return staticCpuTemplate(name);
}

/** A VM's template choice -> the modifiers to apply on this host (undefined: no template). */
export function resolveCpuTemplate(
  choice: { static: string } | { custom: CpuTemplate } | undefined,
  host: readonly CpuidEntry[],
): CpuTemplate | undefined {
  if (choice === undefined) return undefined;
  return 'custom' in choice ? choice.custom : resolveStaticCpuTemplate(choice.static, host);
}
