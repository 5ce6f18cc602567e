"""Records and their display: igctl's record of an attribute answer, and the lines it prints of records and status.

attribute_record turns the daemon's attribute result map into the record (the --json line);
the rest words records (attributed and classified images) and igd's status for people.
Plain dicts in, dicts and strings out: no I/O, no connections.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from igctl.naming import STDIO
from igd import request as spec
from igd.output.keys import record_of

def attribute_record(image: str, result: dict[str, Any], out: Path | None, heatmap: Path | None) -> dict[str, Any]:
    """The record of one attributed image (``ok``: true), from the daemon's attribute
    result map; ``out`` None means the result went to stdout.

    Its facts are the answer map's, under the names of igd.output.keys (the names of the
    status lines and parquet columns of `igd batch`); an older daemon's missing ones are
    left out (and get no accuracy warning). ``target`` (the name) and the ``metrics`` and
    ``targets`` maps, as sent, are kept from igctl's first records."""
    record: dict[str, Any] = {
        "image": image,
        "ok": True,
        "output": str(out) if out is not None else STDIO,
        "heatmap": str(heatmap) if heatmap is not None else None,
        "target": result["target"]["name"],
        **record_of(result),
        "timing_ms": result.get("timing_ms", {}),
    }
    if "metrics" in result:
        record["metrics"] = result["metrics"]
    if "targets" in result:  # several targets: each one's facts; the record's accuracy is the worst of them
        record["targets"] = result["targets"]
        record.setdefault("paths", 1)
        for key in ("error_estimate", "completeness_gap"):
            values = [t.get(key) for t in result["targets"]]
            record[key] = None if None in values else max(values, key=abs)
    return record


def describe(record: dict[str, Any]) -> str:
    names = [t["name"] for t in record["targets"]] if "targets" in record else [record["target"]]
    paths = f" over {record['paths']} paths" if record.get("paths", 1) > 1 else ""
    return (
        f"{record['image']}: {record['prediction']} ({record['probability']:.2f}); "
        f"attributed to {', '.join(repr(name) for name in names)}{paths} -> {record['output']}"
        + (f", heatmap {record['heatmap']}" if record.get("heatmap") else "")
        + f" ({accuracy(record)}"
        + "".join(f", {name} area {area:.3f}" for name, area in record.get("metrics", {}).items()) + ")"
    )


def ranking(record: dict[str, Any]) -> str:
    """The line of a classified image: ``cat.jpg: tiger cat 0.612, tabby 0.201``."""
    ranked = ", ".join(f"{c['name']} {c['probability']:.3f}" for c in record["top"])
    return f"{record['image']}: {ranked}"


def accuracy(record: dict[str, Any]) -> str:
    """``estimated error 9.6 %, completeness gap -4.0 %, 50 steps`` (or, from a daemon
    that does not estimate, the convergence delta)."""
    if "error_estimate" not in record:
        return f"convergence delta {record['convergence_delta']:+.3g}"
    return (f"estimated error {percent(record['error_estimate'])}, "
            f"completeness gap {percent(record.get('completeness_gap'), signed=True)}, {record['n_steps']} steps")


def percent(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "unbounded"
    return f"{value * 100:+.1f} %" if signed else f"{value * 100:.1f} %"


def accuracy_warning(record: dict[str, Any]) -> str | None:
    """A warning when the estimated error is above spec.WARN_ERROR (or unbounded), naming a
    fix that helps this net; None otherwise. (From a daemon that sends no estimate: when the
    completeness gap is beyond it.)"""
    if "error_estimate" in record:
        key, name = "error_estimate", "estimated error"
    elif "completeness_gap" in record:
        key, name = "completeness_gap", "completeness gap"
    else:
        return None
    value = record[key]
    if value is not None and abs(value) <= spec.WARN_ERROR:
        return None
    high = f"{name} {percent(value, signed=key == 'completeness_gap')}"
    return f"{record['image']}: {high} above {spec.WARN_ERROR * 100:g} %; {_fix(record)}"


def _fix(record: dict[str, Any]) -> str:
    """What would make this answer accurate, for the kind of net it came from."""
    steps, estimate, tolerance = record["n_steps"], record.get("error_estimate"), record.get("tolerance")
    if record.get("tolerance_met") is False:
        if estimate is None or not tolerance:
            return f"the tolerance was not met within {steps} points; allow more with --steps"
        # Adaptive steps' error falls about as 1/points on the nets that need many (kinked ones).
        needed = 16 * math.ceil(steps * estimate / tolerance / 16)
        if needed > spec.MAX_STEPS:
            return (f"the tolerance {tolerance:g} was not met within {steps} points; it would take about {needed}, "
                    f"beyond igd's default --max-steps ({spec.MAX_STEPS}): ask for a larger tolerance")
        return f"the tolerance {tolerance:g} was not met within {steps} points; about {needed} would (--steps {needed})"
    if tolerance is not None:
        return "lower --tolerance"
    if record.get("integrand") == "smooth":
        return f"the integrand is smooth, where Gauss-Legendre converges fast: --steps {2 * steps}"
    return (f"leave out --steps (adaptive steps to {spec.DEFAULT_TOLERANCE:g}) or ask for "
            f"--tolerance {spec.WARN_ERROR / 2:g}")


# --- igd's status ------------------------------------------------------------------------


def status_lines(socket: Path, state: dict[str, Any]) -> list[tuple[str, str]]:
    uptime = ("uptime", f"{state['uptime_s']:.0f} s (pid {state['pid']})")
    if state.get("state") == "starting":
        startup = state.get("startup", {})
        return [("socket", str(socket)),
                ("state", f"starting: {startup.get('phase', '?')} ({startup.get('phase_s', 0):.0f} s)"), uptime]
    requests, batching = state["requests"], state["batching"]
    precision = "" if state.get("precision", "float32") == "float32" else f", {state['precision']}"
    precision += "" if state.get("compiler", "eager") == "eager" else f", compiled ({state['compiler']})"
    return [
        ("socket", str(socket)),
        ("state", "ready"),
        ("model", f"{state['model']['name']}: {state['model']['description']}"),
        ("device", state["device"] + precision),
        uptime,
        ("requests", f"{requests['served']} served, {requests['failed']} failed, {requests['in_flight']} in flight"),
        ("queue", f"{state['queue_depth']} waiting (of {state['queue_size']})"),
        ("batching", f"{batching['passes']} passes, {batching['images']} images, largest batch {batching['largest_batch']}"),
        ("chunks", chunk_line(batching)),
        ("memory", f"{state['memory']['rss_bytes'] / 2**20:.0f} MiB resident"),
    ]


def chunk_line(batching: dict[str, Any]) -> str:
    """E.g. "4 points (measured: sizes 2, 4, 8, 16 at 42, 40, 47, 56 ms per point; search 4.0 s, <when>)"."""
    line = f"{batching['max_batch_points']} points ({batching['chunk_source']}"
    search = batching.get("chunk_search")
    if search:
        times = search["ms_per_point"]
        line += (f": sizes {', '.join(times)} at {', '.join(f'{ms:.0f}' for ms in times.values())} ms per point; "
                 f"search {search['search_s']:.1f} s, {search['measured']}")
    return line + ")"
