"""Rebinding primitives: copies found by identity and name, restore, post-import hooks."""

from __future__ import annotations

import importlib
import sys
import types

import pytest

from kernmux.integrations.vllm_hooks.rebind import PostImportHooks, find_bindings, rebind_everywhere


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


@pytest.fixture
def modules():
    made = []

    def make(name, **attrs):
        made.append(name)
        return _module(name, **attrs)

    yield make
    for name in made:
        sys.modules.pop(name, None)


def test_rebind_everywhere_replaces_copies_and_aliases_only(modules):
    def f():
        return "original"

    def stub():
        return "stub"

    home = modules("standin_home", f=f, other_name=f, stub=stub)
    copy = modules("standin_copy", f=f)
    aliased = modules("standin_alias", g=f)
    unrelated = modules("standin_unrelated", f=stub)

    def replacement():
        return "kernmux"

    bindings = rebind_everywhere(home, "f", replacement, aliases=("g",))
    assert [b.where for b in bindings][0] == "standin_home.f"
    assert sorted(b.where for b in bindings) == ["standin_alias.g", "standin_copy.f", "standin_home.f"]
    assert home.f is copy.f is aliased.g is replacement
    assert home.other_name is f  # same object, another role: left alone
    assert unrelated.f is stub

    copy.f = "rebound by someone else"
    restored = [b.restore() for b in bindings]
    assert restored == [True, False, True]
    assert home.f is f and aliased.g is f and copy.f == "rebound by someone else"


def test_find_bindings_skips_kernmux_modules(modules):
    marker = object()
    modules("standin_holder", x=marker)
    modules("kernmux_standin_holder", x=marker)
    assert [(m.__name__, a) for m, a in find_bindings(marker)] == [("standin_holder", "x")]


def test_post_import_hook_runs_after_module_code(tmp_path, monkeypatch):
    (tmp_path / "standin_later.py").write_text("def f():\n    return 'original'\nVALUE = f()\n")
    (tmp_path / "standin_user.py").write_text("from standin_later import f\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    errors = []
    hooks = PostImportHooks(on_error=lambda name, e: errors.append((name, e)))
    seen = []

    def callback(module):
        seen.append(module.VALUE)
        module.f = lambda: "kernmux"

    try:
        assert hooks.when_imported("standin_later", callback) is False
        assert hooks.pending() == ["standin_later"] and hooks in sys.meta_path
        user = importlib.import_module("standin_user")
        assert seen == ["original"]  # the module had run when the callback fired
        assert user.f() == "kernmux"  # the copy was taken after the callback
        assert hooks.pending() == [] and hooks not in sys.meta_path
        # Already imported: the callback runs at once.
        assert hooks.when_imported("standin_later", lambda m: seen.append("again")) is True
        assert seen[-1] == "again" and not errors
    finally:
        hooks.clear()
        for name in ("standin_later", "standin_user"):
            sys.modules.pop(name, None)


def test_post_import_callback_error_never_breaks_the_import(tmp_path, monkeypatch):
    (tmp_path / "standin_fragile.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    errors = []
    hooks = PostImportHooks(on_error=lambda name, e: errors.append((name, str(e))))

    def broken(module):
        raise RuntimeError("hook bug")

    try:
        hooks.when_imported("standin_fragile", broken)
        module = importlib.import_module("standin_fragile")
        assert module.X == 1
        assert errors == [("standin_fragile", "hook bug")]
    finally:
        hooks.clear()
        sys.modules.pop("standin_fragile", None)
