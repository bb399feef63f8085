"""The MoE top-k direct launcher on CPU: its cache key and its fallback to Triton's own
launch path when Triton's internals differ. (The GPU launch itself: test_gpu_paths.py.)"""

from types import SimpleNamespace

from kernmux.kernels.moe_topk_softmax.direct_launch import DirectLauncher, direct_key

BASE = dict(stride_t=160, stride_e=1, tokens=7, experts=160, topk=6, num_shared=0, renormalize=False,
            config=None, dtype="bf16", pointers=(256, 512, 1024, 2048), device_index=0, has_padding=False)


def key(**changes):
    return direct_key(**{**BASE, **changes})


def test_key_separates_everything_triton_specialises_on():
    base = key()
    # Each of these changes the compiled kernel or its launch: a different key.
    for change in (
        dict(stride_t=161), dict(stride_e=2), dict(experts=161), dict(topk=7), dict(num_shared=1),
        dict(renormalize=True), dict(config={"rows": 4}), dict(dtype="fp16"), dict(pointers=(258, 512, 1024, 2048)),
        dict(pointers=(256, 520, 1024, 2048)), dict(pointers=(256, 512, 1032, 2048)),
        dict(pointers=(256, 512, 1024, 2049)), dict(has_padding=True), dict(device_index=1), dict(tokens=9),
    ):
        assert key(**change) != base, change
    # Same token class (5..8 -> class 3), same 16-byte alignment, same stride classes: same key.
    assert key(tokens=8) == base
    assert key(pointers=(256 + 4096, 512, 1024, 2048)) == base
    assert key(stride_t=176) == base and key(stride_t=168) != base


def test_key_refuses_what_triton_passes_as_int64():
    assert key(tokens=2**31) is None
    assert key(stride_t=2**31) is None
    assert key(tokens=0) is None


class _Hooks:
    launch_enter_hook = None
    launch_exit_hook = None


def _fake_compiled(calls):
    def run(*args):
        calls.append(args)

    return SimpleNamespace(run=run, function="fn", packed_metadata="meta", launch_metadata=lambda *a: "launch-meta")


def test_launch_replays_the_cached_compiled_kernel():
    launcher = DirectLauncher()
    launcher._driver = (lambda: 0, lambda index: "stream", _Hooks())
    calls = []
    k = key()
    assert not launcher.launch(k, 7, "stream", ("x",))
    launcher.remember(k, _fake_compiled(calls), rows=4, consts=("K", "S"))
    assert launcher.launch(k, 7, "stream", ("x", "y"))
    (grid_x, gy, gz, stream, function, packed, meta, enter, leave, *args), = calls
    assert (grid_x, gy, gz, stream, function, packed) == (2, 1, 1, "stream", "fn", "meta")
    assert (meta, enter, leave) == (None, None, None) and args == ["x", "y", "K", "S"]


def test_missing_internals_disable_the_direct_path():
    launcher = DirectLauncher()
    launcher._driver = (lambda: 0, lambda index: "stream", _Hooks())
    launcher.remember(key(), SimpleNamespace(run=print), rows=4, consts=())
    assert "lacks function" in launcher.disabled_reason
    assert launcher.entries == {}
    # Once disabled, nothing is cached again: every call takes Triton's launcher.
    launcher.remember(key(), _fake_compiled([]), rows=4, consts=())
    assert launcher.entries == {}


def test_missing_driver_getters_disable_the_direct_path(monkeypatch):
    import triton

    monkeypatch.setattr(triton.runtime, "driver", SimpleNamespace(), raising=False)
    launcher = DirectLauncher()
    assert launcher.driver() is None
    assert "driver getters unavailable" in launcher.disabled_reason
