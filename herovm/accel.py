"""Which accelerator can really run guests here: KVM only where it works, else TCG (software emulation).

`/dev/kvm` existing is not enough: on PVM hosts (kvm_pvm, nested virtualization without VMX/SVM) an
ordinary guest kernel hangs right after "Booting from ROM". So KVM needs the device, access to it, a CPU
with vmx or svm, and no kvm_pvm module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidInput

ACCELS = ("kvm", "tcg")


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reasons: list[str] = field(default_factory=list)


def detect(root: Path = Path("/")) -> AccelChoice:
    reasons = []
    kvm = root / "dev/kvm"
    if not kvm.exists():
        return AccelChoice(
            "tcg", ["/dev/kvm does not exist: no hardware virtualization offered to this host"]
        )
    if not os.access(kvm, os.R_OK | os.W_OK):
        return AccelChoice(
            "tcg", ["/dev/kvm exists but this user cannot open it (add yourself to group kvm)"]
        )
    if (root / "sys/module/kvm_pvm").exists():
        return AccelChoice(
            "tcg", ["/dev/kvm is backed by kvm_pvm (PVM): ordinary guest kernels hang under it"]
        )
    try:
        flags = next(
            (line for line in (root / "proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
            "",
        ).split()
    except OSError:
        flags = []
    if "vmx" not in flags and "svm" not in flags:
        return AccelChoice("tcg", ["the CPU shows neither vmx nor svm: /dev/kvm cannot run ordinary guests"])
    reasons.append("/dev/kvm is usable and the CPU has " + ("vmx" if "vmx" in flags else "svm"))
    return AccelChoice("kvm", reasons)


def choose(requested: str | None) -> AccelChoice:
    if requested in (None, "", "auto"):
        return detect()
    if requested not in ACCELS:
        raise InvalidInput(f"unknown accelerator {requested!r}", hint="use kvm, tcg or auto")
    return AccelChoice(requested, [f"asked for with --accel {requested}"])
