import pytest


@pytest.fixture
def cpu_platform():
    from kernmux.dispatch.platform import Platform

    return Platform(vendor="cpu", arch="cpu", device="cpu", units=2, libs={"torch": "2.13.0"})


@pytest.fixture
def rocm_platform():
    from kernmux.dispatch.platform import Platform

    return Platform(vendor="rocm", arch="gfx950", device="MI355X", units=256, libs={"torch": "2.9.0", "fake-vendor-lib": "1.3"}, what_if=True)
