"""``comb boot --accel auto``: KVM only when a probe guest really runs well under it, with the
verdict cached per host; the probe disk itself is checked under TCG with the real QEMU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from combtest import need_tool

from pipeline import accel
from pipeline.accel import KVM_ARGS, TCG_ARGS, choose, decide, probe


def test_the_probe_disk_prints_under_tcg() -> None:
    binary = need_tool("qemu-system-x86_64")
    took, detail = probe(binary, TCG_ARGS)
    assert took is not None and took < accel.PROBE_TIMEOUT_S, detail
    assert len(accel.PROBE_SECTOR) == 512 and accel.PROBE_SECTOR.endswith(b"\x55\xaa")


def test_a_probe_that_prints_nothing_times_out(tmp_path: Path) -> None:
    binary = need_tool("qemu-system-x86_64")
    took, _ = probe(binary, [*TCG_ARGS, "-S"], timeout=0.5)  # -S: the CPU never starts
    assert took is None


@pytest.mark.parametrize(
    ("kvm", "tcg", "chosen"),
    [
        ((0.12, ""), (0.08, ""), True),  # a working KVM host
        ((0.45, ""), (0.30, ""), True),  # slow machine, both slow
        ((1.40, ""), (0.08, ""), False),  # measured here: nested KVM that hangs real guests
        ((None, ": failed to set MSR"), (0.08, ""), False),
        ((0.20, ""), (None, ""), True),
    ],
)
def test_decide(kvm: tuple[float | None, str], tcg: tuple[float | None, str], chosen: bool) -> None:
    got = decide(kvm, tcg)
    assert got.kvm is chosen and got.args == (KVM_ARGS if chosen else TCG_ARGS)
    assert got.why


def test_auto_probes_once_per_host_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = need_tool("qemu-system-x86_64")
    monkeypatch.setenv("COMB_CACHE_DIR", str(tmp_path))
    assert choose(binary, "tcg").kvm is False and choose(binary, "kvm").kvm is True
    assert not (tmp_path / "accel.json").exists()  # forced choices probe nothing
    if not Path("/dev/kvm").exists():
        assert choose(binary, "auto").why == "no /dev/kvm"
        return
    first = choose(binary, "auto")
    doc = json.loads((tmp_path / "accel.json").read_text())
    assert [v["kvm"] for v in doc.values()] == [first.kvm]
    again = choose(binary, "auto")
    assert again.kvm == first.kvm and "probed" in again.why
    (tmp_path / "accel.json").write_text("{damaged")
    assert choose(binary, "auto").kvm in (True, False)  # a damaged cache: probed again
    assert json.loads((tmp_path / "accel.json").read_text())


def test_why_a_probe_failed_is_shortened_at_a_word() -> None:
    """QEMU's complaint is shortened at a word boundary (it used to be cut mid-word)."""
    long = "qemu-system-x86_64: failed to initialize kvm: " + "permission denied " * 10
    said = accel.why_not(f"some warning\n{long.strip()}\n".encode())
    assert said.startswith(": qemu-system-x86_64: failed to initialize kvm: permission")
    assert said.endswith(" ...") and len(said) <= 122
    assert said[: -len(" ...")].rsplit(" ", 1)[1] in {"permission", "denied"}  # whole words
    assert accel.why_not(b"short reason\n") == ": short reason"
    assert accel.why_not(b"") == ""
