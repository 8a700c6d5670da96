"""What CPU a figure came from: /proc/cpuinfo parsed into vendor, model, family/model, ISA
facts, core counts and a short stable host-kind key (RESULTS.md keeps one row per kind).

  python benchmarks/host.py            # this host, as the benchmarks record it

Pure apart from `describe()`, which reads this host's /proc/cpuinfo (no jax, no subprocess).
The model number and flags are what the kernel sees: under a hypervisor (flag `hypervisor`)
both are what the hypervisor exposes, so the microarchitecture is a guess from them, and the
AVX-512 datapath width is the silicon's as far as the guess is right.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re

# ISA flags recorded per architecture: what the matmul and attention kernels can use.
ISA_FLAGS = {
    "x86": ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512dq",
            "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
            "amx_bf16", "amx_int8", "amx_fp16"),
    "arm": ("asimd", "asimddp", "asimdhp", "fphp", "sve", "sve2", "bf16", "i8mm", "sme"),
}

# (vendor_id, family, first model, last model) -> (microarchitecture, AVX-512 datapath note).
# A guess from the reported numbers; ranges from the kernel's and the vendors' model tables.
_ZEN4_WIDTH = "256-bit datapaths: AVX-512 ops issue as two halves (double-pumped)"
UARCHS = (
    ("AuthenticAMD", 23, 0x00, 0x2f, "Zen / Zen+", ""),
    ("AuthenticAMD", 23, 0x30, 0xff, "Zen 2", ""),
    ("AuthenticAMD", 25, 0x00, 0x0f, "Zen 3", ""),
    ("AuthenticAMD", 25, 0x10, 0x1f, "Zen 4", _ZEN4_WIDTH),
    ("AuthenticAMD", 25, 0x20, 0x5f, "Zen 3", ""),
    ("AuthenticAMD", 25, 0x60, 0x7f, "Zen 4", _ZEN4_WIDTH),
    ("AuthenticAMD", 25, 0xa0, 0xaf, "Zen 4", _ZEN4_WIDTH),
    ("AuthenticAMD", 26, 0x00, 0xff, "Zen 5",
     "512-bit datapaths on server and desktop parts (256-bit on mobile ones)"),
    ("GenuineIntel", 6, 85, 85, "Skylake-SP / Cascade Lake",
     "512-bit; one or two 512-bit FMA units depending on the SKU"),
    ("GenuineIntel", 6, 106, 106, "Ice Lake-SP", "512-bit, two FMA units"),
    ("GenuineIntel", 6, 108, 108, "Ice Lake-SP", "512-bit, two FMA units"),
    ("GenuineIntel", 6, 143, 143, "Sapphire Rapids", "512-bit, two FMA units; AMX tiles"),
    ("GenuineIntel", 6, 167, 167, "Rocket Lake", "512-bit, one FMA unit"),
    ("GenuineIntel", 6, 173, 174, "Granite Rapids", "512-bit, two FMA units; AMX tiles"),
    ("GenuineIntel", 6, 207, 207, "Emerald Rapids", "512-bit, two FMA units; AMX tiles"),
)
# Under KVM an AMX host may report another model (one seen: "Intel(R) Xeon(R) Processor",
# family 6 model 167 with AMX flags); AMX exists from Sapphire Rapids on.
_AMX_GUESS = ("Sapphire Rapids or later (AMX; the reported model is not that of the silicon)",
              "512-bit, two FMA units; AMX tiles")

# aarch64 reports CPU implementer and part numbers instead of a model name.
ARM_IMPLEMENTERS = {0x41: "ARM", 0x61: "Apple", 0xc0: "Ampere", 0x48: "HiSilicon",
                    0x4e: "NVIDIA", 0x51: "Qualcomm"}
ARM_PARTS = {(0x41, 0xd0c): "Neoverse-N1", (0x41, 0xd40): "Neoverse-V1",
             (0x41, 0xd49): "Neoverse-N2", (0x41, 0xd4f): "Neoverse-V2",
             (0x41, 0xd8e): "Neoverse-N3", (0x41, 0xd84): "Neoverse-V3",
             (0x41, 0xd08): "Cortex-A72", (0x41, 0xd0b): "Cortex-A76",
             (0xc0, 0xac3): "AmpereOne"}


@dataclasses.dataclass(frozen=True)
class Host:
  """One host's CPU as /proc/cpuinfo describes it (the first processor's fields)."""
  arch: str  # "x86", "arm" or "" (unknown)
  vendor: str  # vendor_id (x86) or the implementer's name (arm)
  model_name: str  # as reported
  family: int | None  # x86 "cpu family"; arm: "CPU architecture"
  model: int | None  # x86 "model"; arm: "CPU part"
  stepping: int | None  # x86 "stepping"; arm: "CPU revision"
  uarch: str  # a guess from vendor, family and model; "" when unknown
  avx512_datapath: str  # how wide the AVX-512 units are, when the guess knows; ""
  hypervisor: bool
  isa: dict  # flag -> present, for ISA_FLAGS[arch]
  flags: str  # every flag (x86 "flags", arm "Features"), space-separated, sorted
  logical_cpus: int  # processor entries
  physical_cores: int | None  # distinct (physical id, core id) pairs; None when not reported
  sockets: int | None

  @property
  def short_name(self) -> str:
    return short_model_name(self.model_name) or self.vendor or "unknown CPU"

  @property
  def kind(self) -> str:
    """A short stable key for RESULTS.md rows: name, family/model, the ISA facts that matter."""
    yes = lambda *flags: "yes" if any(self.isa.get(f) for f in flags) else "no"
    if self.arch == "arm":
      part = "?" if self.model is None else f"0x{self.model:x}"
      return f"{self.short_name} part {part} sve={yes('sve')} bf16={yes('bf16')}"
    return (f"{self.short_name} family {_num(self.family)} model {_num(self.model)} "
            f"avx512={yes('avx512f')} bf16={yes('avx512_bf16', 'amx_bf16')} amx={yes('amx_tile')}")

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "kind": self.kind}

  @classmethod
  def from_dict(cls, d: dict) -> Host:
    """The inverse of as_dict (e.g. a Host read back from a benchmark's JSON)."""
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

  def summary(self) -> str:
    """One line for a printed report."""
    cores = (f"{self.physical_cores} cores / {self.logical_cpus} threads"
             if self.physical_cores else f"{self.logical_cpus} CPUs")
    guess = f", {self.uarch}" if self.uarch else ""
    vm = ", VM" if self.hypervisor else ""
    return f"host: {self.kind} ({self.model_name or '?'}{guess}{vm}; {cores})"


def _num(value) -> str:
  return "?" if value is None else str(value)


def short_model_name(name: str) -> str:
  """'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz' -> 'Intel Xeon Platinum 8481C';
  'AMD EPYC 7B13 64-Core Processor' -> 'AMD EPYC 7B13'."""
  name = re.sub(r"\((R|TM|tm|r)\)", "", name)
  name = re.sub(r"@\s*[\d.]+\s*[GM]Hz", "", name)
  name = re.sub(r"\b\d+-Core\b|\bProcessor\b|\bCPU\b", "", name)
  return " ".join(name.split())


def processors(text: str) -> list[dict[str, str]]:
  """/proc/cpuinfo text -> one {field: value} per blank-line separated block (the header
  block some aarch64 kernels print first included)."""
  blocks, current = [], {}
  for line in text.splitlines():
    if not line.strip():
      if current:
        blocks.append(current)
      current = {}
      continue
    key, sep, value = line.partition(":")
    if sep:
      current.setdefault(key.strip(), value.strip())
  if current:
    blocks.append(current)
  return blocks


def _int(text: str | None) -> int | None:
  if text is None or not text.strip():
    return None
  try:
    return int(text, 0)  # arm's part and implementer are hex ("0xd0c"); x86 numbers decimal
  except ValueError:
    return None


def _uarch(vendor: str, family, model, flags: set) -> tuple[str, str]:
  guess = next(((name, width) for v, f, lo, hi, name, width in UARCHS
                if v == vendor and f == family and model is not None and lo <= model <= hi),
               ("", ""))
  if vendor == "GenuineIntel" and "amx_tile" in flags and "AMX" not in guess[1]:
    return _AMX_GUESS
  return guess


def parse(text: str, machine: str = "") -> Host:
  """A Host from /proc/cpuinfo text; `machine` (platform.machine()) when the text is empty."""
  blocks = processors(text)
  cpus = [b for b in blocks if "processor" in b] or blocks[:1]
  first = {**next((b for b in blocks if "processor" not in b), {}), **(cpus[0] if cpus else {})}
  if "vendor_id" in first or "flags" in first:
    arch = "x86"
  elif "Features" in first or "CPU implementer" in first:
    arch = "arm"
  else:
    arch = {"x86_64": "x86", "amd64": "x86", "aarch64": "arm", "arm64": "arm"}.get(
        machine.lower(), "")
  flags = set(first.get("flags" if arch == "x86" else "Features", "").split())
  if arch == "arm":
    implementer, part = _int(first.get("CPU implementer")), _int(first.get("CPU part"))
    vendor = ARM_IMPLEMENTERS.get(implementer, "" if implementer is None else f"0x{implementer:x}")
    uarch = ARM_PARTS.get((implementer, part), "")
    model_name = first.get("model name") or " ".join(filter(None, (vendor, uarch)))
    family, model = _int(first.get("CPU architecture")), part
    stepping, width = _int(first.get("CPU revision")), ""
  else:
    vendor, model_name = first.get("vendor_id", ""), first.get("model name", "")
    family, model, stepping = (_int(first.get(k)) for k in ("cpu family", "model", "stepping"))
    uarch, width = _uarch(vendor, family, model, flags)
    if "avx512f" not in flags:
      width = ""
  cores = {(b.get("physical id"), b.get("core id")) for b in cpus}
  known = all("core id" in b for b in cpus) and cpus
  sockets = {b["physical id"] for b in cpus if "physical id" in b}
  return Host(arch=arch, vendor=vendor, model_name=model_name, family=family, model=model,
              stepping=stepping, uarch=uarch, avx512_datapath=width,
              hypervisor="hypervisor" in flags,
              isa={f: f in flags for f in ISA_FLAGS.get(arch, ())},
              flags=" ".join(sorted(flags)), logical_cpus=len(cpus),
              physical_cores=len(cores) if known else None,
              sockets=len(sockets) if sockets else None)


def describe(path: str = "/proc/cpuinfo") -> Host:
  """This host (no /proc, e.g. macOS: a Host with the machine and processor names only)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    text = ""
  host = parse(text, platform.machine())
  if not text:
    host = dataclasses.replace(host, model_name=platform.processor() or platform.machine(),
                               logical_cpus=os.cpu_count() or 0)
  return host


if __name__ == "__main__":
  import json
  h = describe()
  print(h.summary())
  print(json.dumps({k: v for k, v in h.as_dict().items() if k != "flags"}, indent=2))
