"""Platform detection, what-if overrides, fingerprint; availability as reasons."""

import sys

import pytest

from kernmux.dispatch.platform import Platform, lib_version
from kernmux.dispatch.registry import Kernel, Registry, Support


def test_detect_on_this_machine_reads_versions_without_import():
    plat = Platform.detect()
    assert plat.vendor in ("cpu", "cuda", "rocm")
    assert plat.libs.get("torch") == lib_version("torch")
    assert "amd-aiter" not in plat.libs or plat.vendor == "rocm"


def test_lib_version_does_not_import():
    import subprocess

    code = (
        "import sys; from kernmux.dispatch.platform import lib_version, Platform; "
        "v = lib_version('optuna'); libs = Platform.detect().libs; "
        "print(v is not None, 'optuna' in sys.modules, 'triton' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False"]


def test_overrides_are_what_if_and_validated():
    base = Platform(vendor="cpu", arch="cpu", device="cpu", units=2, libs={"torch": "2.13.0"})
    plat = base.with_overrides({"vendor": "rocm", "arch": "gfx950", "units": "256"}, {"amd-aiter": "0.1.12", "torch": None})
    assert (plat.vendor, plat.arch, plat.units, plat.what_if) == ("rocm", "gfx950", 256, True)
    assert dict(plat.libs) == {"amd-aiter": "0.1.12"}
    assert not base.what_if
    with pytest.raises(ValueError, match="unknown platform key"):
        base.with_overrides({"colour": "red"})
    with pytest.raises(ValueError, match="vendor must be one of"):
        Platform(vendor="intel")


def test_fingerprint_is_hardware_only():
    a = Platform(vendor="cuda", arch="sm_90", device="NVIDIA H100 80GB HBM3", units=132, libs={"torch": "2.11.0"})
    b = a.with_overrides(libs={"torch": "2.12.0"})
    c = a.with_overrides({"units": "114"})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.fingerprint().startswith("cuda:sm_90:")


def test_kernel_availability_reasons():
    plat = Platform(vendor="cuda", arch="sm_90", device="x", units=1, libs={"triton": "3.6.0"})
    assert Kernel(op="o", name="k", impl=print, requires={"triton": ">=3.0"}).availability(plat).ok
    assert Kernel(op="o", name="k", impl=print, requires={"triton": ">=3.7"}).availability(plat).reason == "triton 3.6.0 does not satisfy >=3.7"
    assert Kernel(op="o", name="k", impl=print, requires={"amd-aiter": ""}).availability(plat).reason == "amd-aiter not installed"
    assert "runs on rocm" in Kernel(op="o", name="k", impl=print, vendors=("rocm",)).availability(plat).reason
    probe = Kernel(op="o", name="k", impl=print, probe=lambda p: Support(False, "extension lacks topk_softmax"))
    assert probe.availability(plat).reason == "extension lacks topk_softmax"
    # A what-if platform is judged on metadata only: the probe is not run.
    assert probe.availability(plat.with_overrides({"arch": "sm_100"})).ok
    broken = Kernel(op="o", name="k", impl=print, probe=lambda p: 1 / 0)
    assert "probe failed: ZeroDivisionError" in broken.availability(plat).reason


def test_lazy_impl_is_not_imported_until_used():
    kernel = Kernel(op="o", name="k", impl="json:dumps")
    assert kernel.load()([1]) == "[1]"


def test_entry_point_plugins_load_and_failures_are_reasons(monkeypatch):
    import importlib.metadata as md

    calls = []

    class EP:
        def __init__(self, name, target):
            self.name, self._target = name, target

        def load(self):
            if isinstance(self._target, Exception):
                raise self._target
            return self._target

    eps = [EP("good", lambda: calls.append("good")), EP("broken", ImportError("no module named vendor_kernels"))]
    monkeypatch.setattr(md, "entry_points", lambda group: eps if group == "kernmux.kernels" else [])
    registry = Registry()
    registry.ensure_loaded()
    assert calls == ["good"]
    assert "no module named vendor_kernels" in registry.plugin_errors["broken"]


def test_a_rule_on_any_installed_distribution_matches_without_a_list():
    """No list of tracked libraries: a rule naming pyyaml (which kernmux never lists)
    matches where it is installed, and a missing one does not."""
    from kernmux.dispatch.resolver import resolve
    from kernmux.rules.loader import parse_rules_text
    from kernmux.dispatch.rule_model import RuleSet

    text = """version: 1
rules:
  - id: pyyaml-present
    op: toy_attention
    when: {libs: {pyyaml: ">=1"}}
    use: chunked
    reason: test
    link: https://example.org/a
  - id: absent-dist
    op: toy_attention
    when: {libs: {no-such-distribution-kmx: ">=0"}}
    use: wide
    reason: test
    link: https://example.org/b
"""
    rules = RuleSet(tuple(parse_rules_text(text, "t.yaml")))
    plat = Platform.detect()
    assert lib_version("pyyaml") is not None
    decision = resolve("toy_attention", {"batch": 2, "heads": 8, "keys": 16, "dim": 8, "sink": False,
                                         "dtype": "fp32", "device": "cpu"}, plat, rules, force={})
    assert (decision.kernel, decision.rule) == ("chunked", "pyyaml-present")
    assert [rid for rid, _ in decision.rules] == ["pyyaml-present"]


def test_a_kernel_requiring_an_unlisted_distribution_is_available_when_installed():
    plat = Platform.detect()
    assert Kernel(op="o", name="k", impl=print, requires={"pyyaml": ">=1"}).availability(plat).ok
    assert Kernel(op="o", name="k", impl=print, requires={"packaging": ""}).availability(plat).ok
    missing = Kernel(op="o", name="k", impl=print, requires={"no-such-distribution-kmx": ""}).availability(plat)
    assert missing.reason == "no-such-distribution-kmx not installed"
