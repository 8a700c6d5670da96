"""benchmarks/host.py: /proc/cpuinfo samples of the host kinds the project meets (abridged to
the fields the parser reads, flags as the kernel prints them) -> vendor, model, ISA, cores and
the host-kind key RESULTS.md rows are keyed by."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import host  # noqa: E402  (benchmarks/host.py, as the benchmark scripts import it)

_X86_BASE = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx "
             "fxsr sse sse2 ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology "
             "nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 "
             "x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch "
             "fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb "
             "sha_ni xsaveopt xsavec xgetbv1 xsaves")
_AVX512 = ("avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512vbmi avx512_vbmi2 gfni "
           "vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq")


def _x86(vendor, name, family, model, stepping, flags, cores):
  """A /proc/cpuinfo with one block per (physical id, core id) in `cores`."""
  return "\n".join(
      f"processor\t: {i}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
      f"model name\t: {name}\nstepping\t: {stepping}\nmicrocode\t: 0x1\ncpu MHz\t\t: 2600.000\n"
      f"physical id\t: {socket}\nsiblings\t: {len(cores)}\ncore id\t\t: {core}\n"
      f"cpu cores\t: {len({c for _, c in cores})}\nfpu\t\t: yes\nflags\t\t: {flags}\n"
      f"bugs\t\t: spectre_v1 spectre_v2\nbogomips\t: 5200.00\n"
      for i, (socket, core) in enumerate(cores))


# The one seen on 2026-12-05 (RESULTS.md, ResNet section): KVM reports model 167 with AMX.
INTEL_KVM_AMX = _x86("GenuineIntel", "Intel(R) Xeon(R) Processor", 6, 167, 0,
                     f"{_X86_BASE} {_AVX512} avx_vnni avx512_bf16 avx512_fp16 serialize "
                     "tsxldtrk amx_bf16 amx_tile amx_int8", [(0, 0), (0, 1)])
# Sapphire Rapids (GCP C3), one core with its hyperthread.
INTEL_SPR = _x86("GenuineIntel", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", 6, 143, 8,
                 f"{_X86_BASE} {_AVX512} avx_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile "
                 "amx_int8", [(0, 0), (0, 0)])
ZEN3 = _x86("AuthenticAMD", "AMD EPYC 7B13 64-Core Processor", 25, 1, 0,
            f"{_X86_BASE} vaes vpclmulqdq rdpid fsrm", [(0, 0), (0, 0), (0, 1), (0, 1)])
ZEN4 = _x86("AuthenticAMD", "AMD EPYC", 25, 17, 1,
            f"{_X86_BASE} {_AVX512} avx512_bf16 rdpid fsrm", [(0, 0), (0, 1)])
ZEN5 = _x86("AuthenticAMD", "AMD EPYC 9B45 128-Core Processor", 26, 2, 1,
            f"{_X86_BASE} {_AVX512} avx_vnni avx512_bf16 avx512_vp2intersect movdiri "
            "movdir64b", [(0, 0), (0, 1), (1, 0), (1, 1)])
# AWS Graviton3 (Neoverse V1): no "model name", no "flags"; "Features" and part numbers.
GRAVITON3 = "\n".join(
    f"processor\t: {i}\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 "
    "crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp "
    "sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 "
    "dgh rng\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\n"
    "CPU part\t: 0xd40\nCPU revision\t: 1\n" for i in range(2))


@pytest.mark.parametrize("text, kind, fields", [
    (INTEL_KVM_AMX, "Intel Xeon family 6 model 167 avx512=yes bf16=yes amx=yes",
     dict(vendor="GenuineIntel", stepping=0, physical_cores=2, logical_cpus=2, sockets=1,
          hypervisor=True, uarch=host._AMX_GUESS[0])),
    (INTEL_SPR, "Intel Xeon Platinum 8481C family 6 model 143 avx512=yes bf16=yes amx=yes",
     dict(vendor="GenuineIntel", stepping=8, physical_cores=1, logical_cpus=2,
          uarch="Sapphire Rapids")),
    (ZEN3, "AMD EPYC 7B13 family 25 model 1 avx512=no bf16=no amx=no",
     dict(vendor="AuthenticAMD", physical_cores=2, logical_cpus=4, uarch="Zen 3",
          avx512_datapath="")),
    (ZEN4, "AMD EPYC family 25 model 17 avx512=yes bf16=yes amx=no",
     dict(physical_cores=2, logical_cpus=2, uarch="Zen 4", avx512_datapath=host._ZEN4_WIDTH)),
    (ZEN5, "AMD EPYC 9B45 family 26 model 2 avx512=yes bf16=yes amx=no",
     dict(physical_cores=4, logical_cpus=4, sockets=2, uarch="Zen 5")),
    (GRAVITON3, "ARM Neoverse-V1 part 0xd40 sve=yes bf16=yes",
     dict(arch="arm", vendor="ARM", model_name="ARM Neoverse-V1", family=8, model=0xd40,
          stepping=1, uarch="Neoverse-V1", physical_cores=None, sockets=None, logical_cpus=2,
          avx512_datapath="", hypervisor=False)),
])
def test_parse_known_hosts(text, kind, fields):
  h = host.parse(text)
  assert h.kind == kind
  for name, value in fields.items():
    assert getattr(h, name) == value, name
  assert host.Host.from_dict(h.as_dict()) == h  # what the JSON holds reads back whole
  assert h.kind in h.summary()


def test_isa_facts():
  intel, zen3, zen4, arm = (host.parse(t) for t in (INTEL_KVM_AMX, ZEN3, ZEN4, GRAVITON3))
  assert intel.isa["amx_tile"] and intel.isa["amx_bf16"] and intel.isa["avx512_fp16"]
  assert intel.isa["avx512_vnni"] and intel.isa["avx_vnni"]
  assert zen3.isa["avx2"] and zen3.isa["fma"] and not zen3.isa["avx512f"]
  assert zen4.isa["avx512f"] and zen4.isa["avx512_bf16"] and not zen4.isa["amx_tile"]
  assert "double-pumped" in zen4.avx512_datapath
  assert set(arm.isa) == set(host.ISA_FLAGS["arm"]) and arm.isa["sve"] and not arm.isa["sve2"]
  assert "avx2" not in arm.isa and "asimd" in arm.flags.split()


def test_model_names_shorten_to_the_sku():
  assert host.short_model_name("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz") == \
      "Intel Xeon Platinum 8481C"
  assert host.short_model_name("AMD EPYC 7B13 64-Core Processor") == "AMD EPYC 7B13"
  assert host.short_model_name("Intel(R) Xeon(R) Processor") == "Intel Xeon"


def test_unknown_or_missing_cpuinfo_degrades_gracefully(tmp_path):
  # An aarch64 board with an unknown implementer and a header block before the processors.
  odd = ("Serial\t\t: 0000\n\nprocessor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x99\n"
         "CPU part\t: 0x123\n")
  h = host.parse(odd)
  assert (h.arch, h.vendor, h.uarch, h.logical_cpus) == ("arm", "0x99", "", 1)
  assert h.kind == "0x99 part 0x123 sve=no bf16=no"
  empty = host.parse("", machine="x86_64")
  assert empty.arch == "x86" and empty.kind == "unknown CPU family ? model ? avx512=no bf16=no " \
      "amx=no" and empty.logical_cpus == 0
  missing = host.describe(str(tmp_path / "no-cpuinfo"))
  assert missing.logical_cpus > 0 and missing.kind


def test_this_host_describes_itself():
  h = host.describe()
  assert h.logical_cpus >= 1 and h.kind and h.summary().startswith("host: ")
