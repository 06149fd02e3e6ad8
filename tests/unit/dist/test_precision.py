"""`train.precision`: the decision on every kind of GPU and CPU, from injected device facts and real
/proc/cpuinfo excerpts (what each machine's precision must be, not a restatement of the code), and
the one precision a job of mixed devices agrees on."""

import itertools

import pytest

from disttrain.config import ConfigError
from disttrain.dist.precision import agree, choose, cpu_bf16_flags, cpu_facts, gpu_facts

# /proc/cpuinfo lines as these machines print them (flags / Features trimmed to the relevant part
# plus neighbours, in the kernel's order).
EPYC_7B13_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext invpcid_single ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat npt nrip_save umip vaes vpclmulqdq rdpid fsrm
"""
XEON_8280_AVX512_NO_BF16 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8280 CPU @ 2.70GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch invpcid_single ssbd ibrs ibpb stibp fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm mpx avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves arat pku ospke avx512_vnni md_clear arch_capabilities
"""
EPYC_9654_ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf rapl pni pclmulqdq monitor ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext perfctr_core perfctr_nb bpext perfctr_llc mwaitx cpb cat_l3 cdp_l3 invpcid_single hw_pstate ssbd mba perfmon_v2 ibrs ibpb stibp ibrs_enhanced vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid cqm rdt_a avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local avx512_bf16 clzero irperf xsaveerptr rdpru wbnoinvd amd_ppin cppc arat npt lbrv svm_lock nrip_save tsc_scale vmcb_clean flushbyasid decodeassists pausefilter pfthreshold avic v_vmsave_vmload vgif x2avic v_spec_ctrl vnmi avx512vbmi umip pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq la57 rdpid overflow_recov succor smca fsrm flush_l1d
"""
XEON_8480_SAPPHIRE_RAPIDS_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault epb cat_l3 cat_l2 cdp_l3 invpcid_single cdp_l2 ssbd mba ibrs ibpb stibp ibrs_enhanced tpr_shadow flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid cqm rdt_a avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb intel_pt avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local split_lock_detect avx_vnni avx512_bf16 wbnoinvd dtherm ida arat pln pts hfi vnmi avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq la57 rdpid bus_lock_detect cldemote movdiri movdir64b enqcmd fsrm md_clear serialize tsxldtrk pconfig arch_lbr ibt amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities
"""
# an AMX machine whose kernel hides the AVX-512 bf16 flag (amx_bf16 alone)
AMX_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 avx512f amx_bf16 amx_tile amx_int8\n"
GRAVITON2_N1 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0c
"""
GRAVITON3_V1 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd40
"""
# only the SVE form of bf16 listed: not the Advanced SIMD BF16 that oneDNN's kernels use
SVEBF16_ONLY = "processor\t: 0\nFeatures\t: fp asimd sve svebf16\n"

CPUS = [  # (what, cpuinfo, machine, native bf16)
    ("AMD EPYC 7B13 (Zen 3, AVX2 only)", EPYC_7B13_AVX2, "x86_64", False),
    ("Xeon 8280 (Cascade Lake: AVX-512 without bf16)", XEON_8280_AVX512_NO_BF16, "x86_64", False),
    ("AMD EPYC 9654 (Zen 4: avx512_bf16)", EPYC_9654_ZEN4, "x86_64", True),
    ("Xeon 8480+ (Sapphire Rapids: amx_bf16)", XEON_8480_SAPPHIRE_RAPIDS_AMX, "x86_64", True),
    ("amx_bf16 alone", AMX_ONLY, "x86_64", True),
    ("Graviton2 (Neoverse N1)", GRAVITON2_N1, "aarch64", False),
    ("Graviton3 (Neoverse V1: bf16)", GRAVITON3_V1, "aarch64", True),
    ("svebf16 only", SVEBF16_ONLY, "aarch64", False),
]


@pytest.mark.parametrize("what, cpuinfo, machine, native", CPUS, ids=[c[0] for c in CPUS])
def test_cpu_auto_is_bf16_exactly_on_cpus_with_native_bf16(what, cpuinfo, machine, native):
    assert cpu_bf16_flags(cpuinfo, machine) == native
    facts = cpu_facts(cpuinfo, machine, onednn_bf16=True, capability="AVX512" if machine == "x86_64" else "DEFAULT")
    chosen = choose("auto", facts)
    assert chosen.mode == ("bf16" if native else "no"), what
    assert chosen.reason.startswith("auto: ") and chosen.warning is None
    explicit = choose("bf16", facts)
    assert explicit.mode == "bf16" and (explicit.warning is None) == native, what
    assert choose("no", facts).mode == "no"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        choose("fp16", facts)


def test_cpu_flags_without_onednn_bf16_or_unreadable_cpuinfo():
    """oneDNN must be able to use the instructions too; without /proc/cpuinfo its word is taken."""
    assert not cpu_facts(EPYC_9654_ZEN4, "x86_64", onednn_bf16=False, capability="AVX512").native_bf16
    assert cpu_facts(None, "x86_64", onednn_bf16=True, capability="AVX512").native_bf16
    assert not cpu_facts(None, "x86_64", onednn_bf16=False, capability="AVX2").native_bf16
    assert not cpu_bf16_flags(EPYC_9654_ZEN4, "ppc64le")  # flags of another architecture mean nothing there


GPUS = [  # (card, compute capability, bf16 runs emulated, what auto must pick)
    ("Tesla P100", (6, 0), True, "fp16"),
    ("Tesla V100", (7, 0), True, "fp16"),
    ("Tesla T4", (7, 5), True, "fp16"),
    ("Quadro RTX 6000", (7, 5), True, "fp16"),
    ("A100-SXM4-80GB", (8, 0), True, "bf16"),
    ("A10G", (8, 6), True, "bf16"),
    ("L4", (8, 9), True, "bf16"),
    ("H100 80GB HBM3", (9, 0), True, "bf16"),
    ("B200", (10, 0), True, "bf16"),
]


@pytest.mark.parametrize("name, capability, emulated, expected", GPUS, ids=[g[0] for g in GPUS])
def test_gpu_auto_is_bf16_only_from_compute_capability_8(name, capability, emulated, expected):
    """`torch.cuda.is_bf16_supported()` says True on V100/T4 (it counts emulation): auto must not."""
    facts = gpu_facts(name, capability, emulated_bf16=emulated)
    chosen = choose("auto", facts)
    assert chosen.mode == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in chosen.reason
    if expected == "fp16":
        assert "grad scaler" in chosen.reason
    explicit = choose("bf16", facts)
    assert explicit.mode == "bf16" and (explicit.warning is None) == (expected == "bf16")
    if explicit.warning:
        assert name in explicit.warning and "auto picks fp16" in explicit.warning
    assert choose("fp16", facts).mode == "fp16" and choose("no", facts).mode == "no"


def test_bf16_on_a_gpu_that_cannot_run_it_is_a_config_error():
    facts = gpu_facts("GeForce GTX 1080", (6, 1), emulated_bf16=False)
    assert choose("auto", facts).mode == "fp16"
    with pytest.raises(ConfigError, match=r"train\.precision: bf16 does not run on GeForce GTX 1080"):
        choose("bf16", facts)


def test_rocm_gpus_compute_bf16():
    facts = gpu_facts("AMD Instinct MI250X", (9, 0), emulated_bf16=True, rocm=True)
    assert choose("auto", facts).mode == "bf16" and "ROCm" in choose("auto", facts).reason



# the devices of mixed jobs: two generations of cards, GPUs beside a CPU rank
A100 = gpu_facts("NVIDIA A100-SXM4-80GB", (8, 0), emulated_bf16=True)
H100 = gpu_facts("NVIDIA H100 80GB HBM3", (9, 0), emulated_bf16=True)
V100 = gpu_facts("Tesla V100-SXM2-32GB", (7, 0), emulated_bf16=True)
GTX1080 = gpu_facts("GeForce GTX 1080", (6, 1), emulated_bf16=False)
CPU_AVX2 = cpu_facts(EPYC_7B13_AVX2, "x86_64", onednn_bf16=False, capability="AVX2")
CPU_BF16 = cpu_facts(XEON_8480_SAPPHIRE_RAPIDS_AMX, "x86_64", onednn_bf16=True, capability="AVX512")

MIXES = [  # (the ranks' devices, the job's auto precision): the best every rank runs natively
    ([A100, V100], "fp16"),  # the V100 only emulates bf16; the A100 runs fp16 natively
    ([H100, A100, A100, V100], "fp16"),
    ([H100, CPU_AVX2], "no"),  # the CPU runs neither fp16 nor bf16 natively
    ([H100, CPU_BF16], "bf16"),
    ([V100, CPU_BF16], "no"),  # the CPU cannot run fp16, the V100 only emulates bf16
    ([A100, H100], "bf16"),
    ([V100, V100], "fp16"),
    ([CPU_AVX2, CPU_BF16], "no"),
]


@pytest.mark.parametrize("ranks, expected", MIXES, ids=["+".join(f.name.split(" (")[0] for f in m[0]) for m in MIXES])
def test_a_job_of_mixed_devices_agrees_on_what_every_rank_runs_natively_in_any_rank_order(ranks, expected):
    for order in itertools.permutations(ranks):
        assert agree("auto", list(order)).mode == expected, [f.name for f in order]


def test_the_agreed_precision_says_which_rank_forced_it():
    assert agree("auto", [H100, H100, H100, V100]).reason == (
        "auto: rank 3's Tesla V100-SXM2-32GB (compute capability 7.0) has no native bf16, so the job uses fp16 with a grad scaler")
    assert agree("auto", [H100, CPU_AVX2]).reason == "auto: rank 1's CPU (AVX2) has no native bf16 and cannot run fp16, so the job trains in fp32"
    assert agree("auto", [CPU_BF16, CPU_AVX2]).reason == "auto: rank 1's CPU (AVX2) has no native bf16 and cannot run fp16, so the job trains in fp32"
    assert agree("auto", [V100, CPU_BF16]).reason == (
        "auto: rank 0's Tesla V100-SXM2-32GB (compute capability 7.0) has no native bf16 and rank 1's CPU (AVX512) "
        "cannot run fp16, so the job trains in fp32")
    assert agree("auto", [H100, H100]) == choose("auto", H100), "the same devices: as one of them alone decides"
    assert agree("auto", [CPU_AVX2]) == choose("auto", CPU_AVX2)


def test_an_explicit_precision_one_rank_cannot_run_fails_naming_that_rank():
    with pytest.raises(ConfigError, match=r"^train\.precision: fp16 needs a CUDA device, and rank 2's CPU \(AVX2\) is not one; "):
        agree("fp16", [H100, V100, CPU_AVX2])
    with pytest.raises(ConfigError, match=r"^train\.precision: bf16 does not run on rank 1's GeForce GTX 1080 \(compute capability 6\.1\)"):
        agree("bf16", [A100, GTX1080])
    assert agree("fp16", [H100, V100]).mode == "fp16" and agree("no", [H100, CPU_AVX2]).mode == "no"
    emulated = agree("bf16", [A100, V100])
    assert emulated.mode == "bf16" and emulated.warning.startswith("warning: train.precision=bf16 on rank 1's Tesla V100")
