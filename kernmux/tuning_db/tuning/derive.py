"""Deny rules derived from failures recorded in the tuning database (``kernmux rules derive``).

For each (op, kernel, platform vendor/arch/device) with failed trials
(numerics_failed, crashed, timeout, error), one ``deny`` rule:

* ``when``: the vendor, arch and device name of the failing rows (a rule is never
  broader than the machines its evidence comes from: rows measured on a CPU never deny
  a kernel on a GPU), plus every feature whose failing values never occur among the
  kernel's ok trials on the same platform (the evidence that separates "fails" from
  "works"); with no ok trial at all, every feature observed in the failing rows.
* ``reason``: the evidence in one line: counts per status, example error messages and
  metrics, library versions, row ids.
* ``link``: the database (password hidden) and the row ids the rule rests on.

When failing and ok trials share every feature value the failure depends on the
config, which a deny rule cannot express (the store never picks a failed config
anyway): the group is listed as a YAML comment instead of a rule. Rows of ops or
kernels not registered in this process are left out likewise, and so are rows whose
tensor device (the ``device`` feature) is not the platform's own: CPU tensors on a
GPU machine (``device`` in ``when`` names the platform's device, so such a rule would
deny the kernel for GPU tensors too), or CUDA tensors on a machine without CUDA (the
failure says the device was missing, not that the kernel is broken). Names and
messages from the database are escaped in comments (a newline would end the comment).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kernmux.tuning_db.storage.records import FAILURE_STATUSES, TrialRow
from kernmux.tuning_db.storage.store import TuningStore

_SKIP_FEATURES = {"device"}
_MAX_EXAMPLES = 2


@dataclass
class _Group:
    op: str
    kernel: str
    vendor: str
    arch: str
    device: str  # the platform's device name
    tensors: str  # the rows' ``device`` feature ("" when the op has none)
    failed: list[TrialRow] = field(default_factory=list)
    ok: list[TrialRow] = field(default_factory=list)


def _kebab(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _clean(text: str) -> str:
    """``text`` with control characters, line breaks and lone surrogates escaped: safe in
    a YAML comment and in a UTF-8 file."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)


def _one_line(text: str, limit: int = 90) -> str:
    text = _clean(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _device_mismatch(group: _Group) -> str:
    """Why the group's tensor device is not the platform's own ("" when it is)."""
    if not group.tensors:
        return ""
    if group.vendor == "cpu" and group.tensors != "cpu":
        return (f"measured with device={group.tensors} on a machine without it (the failures say the "
                f"device was missing, not that the kernel is broken)")
    if group.vendor in ("cuda", "rocm") and group.tensors == "cpu":
        return (f"measured with device=cpu tensors on a {group.vendor} machine (a rule cannot tell tensor "
                f"devices apart on one machine; a deny would also hit GPU tensors)")
    return ""


def _sorted_values(values: set[Any]) -> list[Any]:
    return sorted(values, key=lambda v: (str(type(v)), v))


def _feature_conditions(group: _Group, feature_names: Sequence[str]) -> dict[str, Any] | None:
    """Feature conditions separating failing from ok rows; None if none separates them."""
    conditions: dict[str, Any] = {}
    for name in feature_names:
        if name in _SKIP_FEATURES:
            continue
        failing = {r.features[name] for r in group.failed if name in r.features}
        if not failing or any(name not in r.features for r in group.failed):
            continue
        if any(isinstance(v, (list, dict)) for v in failing):
            continue
        ok = {r.features.get(name) for r in group.ok}
        if group.ok and failing & ok:
            continue
        values = _sorted_values(failing)
        conditions[name] = values[0] if len(values) == 1 else values
    if group.ok and not conditions:
        return None
    return conditions


def _evidence(group: _Group) -> str:
    statuses = Counter(r.status for r in group.failed)
    counts = ", ".join(f"{s} x{n}" for s, n in sorted(statuses.items()))
    devices = sorted({str(r.platform.get("device", "?")) for r in group.failed})
    parts = [
        f"tuning DB: {len(group.failed)} failed trial(s) of {group.kernel} ({counts}) "
        f"on {group.vendor}/{group.arch} ({', '.join(devices)}), {len(group.ok)} ok"
    ]
    errors = Counter(_one_line(r.error, 70) for r in group.failed if r.error)
    if errors:
        shown = "; ".join(f"{e!r} x{n}" for e, n in errors.most_common(_MAX_EXAMPLES))
        parts.append(f"errors: {shown}")
    metric_rows = [r for r in group.failed if r.status == "numerics_failed" and r.metrics]
    if metric_rows:
        sample = metric_rows[0].metrics
        shown = ", ".join(f"{k}={v}" for k, v in sorted(sample.items())[:3])
        parts.append(f"metrics e.g. {shown}")
    libs: dict[str, set[str]] = defaultdict(set)
    for r in group.failed:
        for name, version in r.libs.items():
            libs[name].add(version)
    if libs:
        parts.append("measured with " + ", ".join(f"{n} {'/'.join(sorted(v))}" for n, v in sorted(libs.items())))
    return _one_line("; ".join(parts), 400)


def _row_ids(rows: Sequence[TrialRow], limit: int = 20) -> str:
    ids = sorted(r.id for r in rows)
    text = ",".join(map(str, ids[:limit]))
    return text + (f",...(+{len(ids) - limit})" if len(ids) > limit else "")


def _groups(store: TuningStore, op: str | None) -> list[_Group]:
    rows = store.rows(op=op, status=("ok", *FAILURE_STATUSES))
    groups: dict[tuple[str, ...], _Group] = {}
    for r in rows:
        key = (r.op, r.kernel, str(r.platform.get("vendor", "")), str(r.platform.get("arch", "")),
               str(r.platform.get("device", "")), str(r.features.get("device", "")))
        group = groups.setdefault(key, _Group(*key))
        (group.ok if r.status == "ok" else group.failed).append(r)
    return [g for _, g in sorted(groups.items()) if g.failed]


def derive_rules(store: TuningStore, op: str | None = None) -> tuple[str, int]:
    """YAML text (rule file version 1) of deny rules from failure rows, and the rule count."""
    from kernmux.dispatch.registry import REGISTRY

    REGISTRY.ensure_loaded()
    rules: list[dict[str, Any]] = []
    skipped: list[str] = []
    used_ids: set[str] = set()
    for group in _groups(store, op):
        label = _clean(f"{group.op}/{group.kernel} on {group.vendor}/{group.arch} ({group.device})")
        mismatch = _device_mismatch(group)
        if mismatch:
            skipped.append(f"{label}: {mismatch}")
            continue
        known_op = REGISTRY.ops.get(group.op)
        if known_op is None:
            skipped.append(f"{label}: op not registered in this process")
            continue
        if group.kernel not in REGISTRY.kernels.get(group.op, {}):
            skipped.append(f"{label}: kernel not registered in this process")
            continue
        features = _feature_conditions(group, known_op.feature_names)
        if features is None:
            configs = sorted({_one_line(str(r.config), 120) for r in group.failed})[:3]
            skipped.append(
                f"{label}: failures share every feature value with ok trials (config-dependent: "
                f"{'; '.join(configs)}); the store already never picks a failed config"
            )
            continue
        when: dict[str, Any] = {}
        if group.vendor:
            when["vendor"] = group.vendor
        if group.arch:
            when["arch"] = group.arch
        if group.device:
            when["device"] = group.device
        when.update(features)
        rule_id = _kebab(f"db-deny-{group.op}-{group.kernel}-{group.arch or group.vendor}")
        base, n = rule_id, 2
        while rule_id in used_ids:
            rule_id, n = f"{base}-{n}", n + 1
        used_ids.add(rule_id)
        rules.append({
            "id": rule_id,
            "op": group.op,
            "when": when,
            "deny": [group.kernel],
            "reason": _evidence(group),
            "link": f"{store.display_url}#rows={_row_ids(group.failed)}",
        })
    return _render(store, rules, skipped, op), len(rules)


def _render(store: TuningStore, rules: list[dict[str, Any]], skipped: list[str], op: str | None) -> str:
    import yaml

    header = [
        _clean(f"# Deny rules derived from failed trials in {store.display_url}" + (f" (op {op})" if op else "")),
        "# Review before shipping: each rule rests only on the rows named in its link.",
    ]
    header += [_clean(f"# not derived: {line}") for line in skipped]
    body = yaml.safe_dump(
        {"version": 1, "rules": rules}, sort_keys=False, default_flow_style=None, width=10_000, allow_unicode=True
    )
    return "\n".join(header) + "\n" + body


def rules_by_kernel(yaml_text: str) -> Mapping[str, list[str]]:
    """kernel -> rule ids in a derived file (a convenience for tests and reports)."""
    import yaml

    out: dict[str, list[str]] = defaultdict(list)
    for rule in (yaml.safe_load(yaml_text) or {}).get("rules") or []:
        for kernel in rule.get("deny", []):
            out[kernel].append(rule["id"])
    return dict(out)
