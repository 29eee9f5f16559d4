"""Turn the results into ``results.json``, ``results.md`` and ``results.png``."""

from __future__ import annotations

import datetime as dt
import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.contenders import Result, percentile

MiB = 1024**2
ORDER = ("sdk", "rclone", "ingestd")
LABEL = {"sdk": "SDK upload_blob (floor)", "rclone": "rclone move", "ingestd": "ingestd"}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def aggregate(results: list[Result]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per scenario and contender: medians over rounds, worst peak RSS, pooled latency."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario in dict.fromkeys(r.scenario for r in results):
        out[scenario] = {}
        for contender in ORDER:
            rows = [r for r in results if r.scenario == scenario and r.contender == contender]
            if not rows:
                continue
            latencies = [ms for r in rows for _, ms in r.latencies]
            out[scenario][contender] = {
                "rounds": len(rows),
                "mb_s": _r(_median([r.mb_s for r in rows])),
                "files_s": _r(_median([r.files_s for r in rows])),
                "seconds": _r(_median([r.seconds for r in rows]), 2),
                "cpu_s_per_gib": _r(_median([r.cpu_s_per_gib for r in rows]), 2),
                "peak_rss_mib": _r(max(r.peak_rss for r in rows) / MiB),
                "status_p50_ms": _r(percentile(latencies, 50), 2),
                "status_p99_ms": _r(percentile(latencies, 99), 2),
                "status_max_ms": _r(max(latencies), 2) if latencies else None,
                "status_samples": len(latencies),
                "md5_ok": all(r.md5_ok for r in rows),
                "blobs_verified": sum(r.md5_checked for r in rows),
                "sources_gone": all(r.sources_gone is not False for r in rows),
            }
    return out


def ratios(results: list[Result], scenario: str, metric: str = "mb_s") -> dict[str, Any]:
    """ingestd / peer per round (same round, so same conditions), and their median."""
    out: dict[str, Any] = {}
    for peer in ("rclone", "sdk"):
        per_round = []
        for round_ in sorted({r.round for r in results if r.scenario == scenario}):
            mine = [
                r
                for r in results
                if (r.scenario, r.contender, r.round) == (scenario, "ingestd", round_)
            ]
            theirs = [
                r for r in results if (r.scenario, r.contender, r.round) == (scenario, peer, round_)
            ]
            if mine and theirs:
                per_round.append(getattr(mine[0], metric) / getattr(theirs[0], metric))
        if per_round:
            out[f"ingestd/{peer}"] = {
                "median": round(statistics.median(per_round), 3),
                "per_round": [round(x, 3) for x in per_round],
            }
    return out


def targets(agg: dict, rat: dict, plan, put_md5: bool = True) -> list[dict[str, Any]]:
    """Issue 14's targets, from this run. ``met`` is None for a figure shown for
    information only (the floor ratio with the whole-file MD5 on: the floor stores none;
    the target for it is with ``APP_AZURE_PUT_MD5=false``)."""
    rows: list[dict[str, Any]] = []
    shape = plan.shape
    bound = 100 + shape.workers * shape.concurrency * shape.block_size / MiB
    for scenario, metric, speed_goal in (("large", "MB/s", 1.2), ("small", "files/s", 1.0)):
        mine = agg.get(scenario, {}).get("ingestd")
        if not mine:
            continue
        value = rat.get(scenario, {}).get("ingestd/rclone", {}).get("median")
        if value is not None:
            rows.append(
                {
                    "target": f"{scenario}: ingestd >= {speed_goal} x rclone "
                    f"({metric}, same round)",
                    "measured": f"{value:.2f} x",
                    "met": value >= speed_goal,
                }
            )
        peer = agg[scenario].get("rclone")
        if peer and peer["cpu_s_per_gib"]:
            cpu_goal = 0.7 if scenario == "large" else 1.0
            cpu_ratio = mine["cpu_s_per_gib"] / peer["cpu_s_per_gib"]
            rows.append(
                {
                    "target": f"{scenario}: ingestd CPU s/GiB <= {cpu_goal} x rclone's",
                    "measured": f"{mine['cpu_s_per_gib']} against {peer['cpu_s_per_gib']}"
                    f" ({cpu_ratio:.2f} x)",
                    "met": cpu_ratio <= cpu_goal,
                }
            )
        if scenario == "large":
            floor = rat.get("large", {}).get("ingestd/sdk", {}).get("median")
            if floor is not None:
                rows.append(
                    {
                        "target": "large: ingestd >= 0.9 x sdk (MB/s, same round)"
                        + (
                            ""
                            if not put_md5
                            else ", the target with APP_AZURE_PUT_MD5=false; shown "
                            "here at the defaults for information"
                        ),
                        "measured": f"{floor:.2f} x",
                        "met": None if put_md5 else floor >= 0.9,
                    }
                )
        rows.append(
            {
                "target": f"{scenario}: ingestd tree peak RSS <= 100 MiB + "
                f"{shape.workers} x {shape.concurrency} x "
                f"{shape.block_size / MiB:g} MiB = {bound:g} MiB",
                "measured": f"{mine['peak_rss_mib']} MiB",
                "met": mine["peak_rss_mib"] <= bound,
            }
        )
        if mine["status_p99_ms"] is not None:
            rows.append(
                {
                    "target": f"{scenario}: /v1/status p99 < 50 ms during the run",
                    "measured": f"{mine['status_p99_ms']} ms ({mine['status_samples']} samples)",
                    "met": mine["status_p99_ms"] < 50,
                }
            )
    small = agg.get("small", {}).get("ingestd")
    if small:
        rows.append(
            {
                "target": "small: ingestd >= 20 files/s end to end",
                "measured": f"{small['files_s']} files/s",
                "met": small["files_s"] >= 20,
            }
        )
    return rows


def _put_md5(info: dict) -> bool:
    value = info.get("ingestd_env", {}).get("APP_AZURE_PUT_MD5", "true")
    return value.strip().lower() in ("1", "true", "yes", "on")


def build(
    results: list[Result],
    scan: dict,
    plan,
    info: dict,
    command: str,
    started: dt.datetime,
    seconds: float,
) -> dict[str, Any]:
    agg = aggregate(results)
    rat = {s: ratios(results, s, "mb_s" if s == "large" else "files_s") for s in agg}
    return {
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "wall_seconds": round(seconds, 1),
        "machine": info,
        "plan": asdict(plan),
        "summary": agg,
        "ratios": rat,
        "targets": targets(agg, rat, plan, _put_md5(info)),
        "scan": scan,
        "rounds": [r.summary() for r in results],
        "series": [
            {
                "scenario": r.scenario,
                "contender": r.contender,
                "round": r.round,
                "timeline": [(round(t, 3), b) for t, b in r.timeline],
                "received": [(round(t, 3), b) for t, b in r.received],
                "latencies": [(round(t, 3), round(ms, 2)) for t, ms in r.latencies],
            }
            for r in results
        ],
    }


def _met(met: bool | None) -> str:
    return "n/a" if met is None else "yes" if met else "**no**"


def _accelerator(built: bool | None) -> str:
    if built is None:
        return "unknown"
    return "built" if built else "NOT built (hashlib fallback: more CPU)"


def markdown(data: dict[str, Any]) -> str:
    m, plan = data["machine"], data["plan"]
    shape = plan["shape"]
    lines = [
        f"# ingestd benchmark ({data['started']})",
        "",
        f"Command: `{data['command']}` ({data['wall_seconds']:.0f} s). "
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, azure-storage-blob {m['azure_storage_blob']}, "
        f"{m['rclone']}, Azurite {m['azurite']} (in memory, loopback). "
        f"Load average before {_load(m['load_before'])}, after {_load(m.get('load_after'))}. "
        f"ingestd's MD5 accelerator: {_accelerator(m.get('md5_accelerator'))}.",
        "",
        f"Shape for every contender: {shape['workers']} files at a time, "
        f"{shape['block_size'] / MiB:g} MiB blocks, {shape['concurrency']} blocks in parallel "
        f"per file, single put up to {shape['single_put_size'] / MiB:g} MiB. ingestd polls "
        f"every {plan['poll_interval_s']} s; files get an mtime a day old before the rename "
        f"into incoming (its 5 s minimum age is met, the two-poll stability check is not "
        f"skipped). MB = 10^6 bytes; CPU is user + system of the client's whole process tree; "
        f"peak RSS is the sum of each process's own peak (VmHWM) over the section.",
        "",
    ]
    titles = {
        "large": f"{plan['count']} x {plan['size'] / MiB:g} MiB",
        "small": f"{plan['small_count']} x {plan['small_size'] / MiB:g} MiB",
    }
    for scenario, rows in data["summary"].items():
        lines += [
            f"## {titles.get(scenario, scenario)} (median of "
            f"{max(r['rounds'] for r in rows.values())} rounds)",
            "",
            "| contender | MB/s | files/s | s | CPU s/GiB | peak RSS MiB | "
            "/v1/status p50 / p99 ms | MD5 verified |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for contender in ORDER:
            row = rows.get(contender)
            if not row:
                continue
            lat = (
                f"{row['status_p50_ms']} / {row['status_p99_ms']}"
                if row["status_p99_ms"] is not None
                else ""
            )
            lines.append(
                f"| {LABEL[contender]} | {row['mb_s']} | {row['files_s']} | "
                f"{row['seconds']} | {row['cpu_s_per_gib']} | {row['peak_rss_mib']} | "
                f"{lat} | {'yes' if row['md5_ok'] else 'NO'} "
                f"({row['blobs_verified']} blobs) |"
            )
        for name, value in data["ratios"].get(scenario, {}).items():
            unit = "MB/s" if scenario == "large" else "files/s"
            lines.append("")
            lines.append(
                f"{name} ({unit}): **{value['median']:.2f}** "
                f"(per round {', '.join(f'{x:.2f}' for x in value['per_round'])})"
            )
        lines.append("")
    if data["targets"]:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [
            f"| {t['target']} | {t['measured']} | {_met(t['met'])} |" for t in data["targets"]
        ]
        lines.append("")
    scan = data.get("scan") or {}
    if scan:
        lines += [
            "## Scanner cost per poll",
            "",
            "Isolated (ingestd's `list_incoming` + `stable_files`, median of 7 polls):",
            "",
            "| entries | ms per poll | CPU ms | us per entry |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['entries']} | {r['poll_ms']} | {r['cpu_ms']} | {r['us_per_entry']} |"
            for r in scan.get("isolated", [])
        ]
        live = scan.get("live")
        if live:
            lines += [
                "",
                f"Live: {live['entries']} stable files renamed into incoming at once "
                f"(the queue holds {plan.get('max_queue', 2000)}; the rest wait), "
                f"{live['window_s']} s window, {live['polls']} polls:",
                "",
                "| scanner CPU ms/poll | parent CPU ms/poll | poll ms (median / max) | "
                "files/s (4 KiB) | /v1/status p50 / p99 ms | blobs MD5-verified |",
                "|---:|---:|---:|---:|---:|---|",
                f"| {live['scanner_cpu_ms_per_poll']} | {live['parent_cpu_ms_per_poll']} | "
                f"{live['poll_ms_median']} / {live['poll_ms_max']} | {live['files_s']} | "
                f"{live['status_p50_ms']} / {live['status_p99_ms']} | "
                f"{live['blobs_verified']} ({live['md5_mismatches']} bad) |",
            ]
        lines.append("")
    lines += [
        "## Every round",
        "",
        "| scenario | round | contender | MB/s | files/s | s | CPU s | CPU s/GiB | "
        "peak RSS MiB | p50 / p99 ms | MD5 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in data["rounds"]:
        lat = f"{r['status_p50_ms']} / {r['status_p99_ms']}" if r["status_p99_ms"] else ""
        lines.append(
            f"| {r['scenario']} | {r['round']} | {r['contender']} | {r['mb_s']} | "
            f"{r['files_s']} | {r['seconds']} | {r['cpu_s']} | {r['cpu_s_per_gib']} | "
            f"{r['peak_rss_mib']} | {lat} | "
            f"{'ok' if r['md5_ok'] else 'BAD'} ({r['md5_checked']}) |"
        )
    return "\n".join(lines) + "\n"


def _load(load) -> str:
    return "?" if not load else " ".join(f"{x:.2f}" for x in load)


def _rates(timeline: list[tuple[float, int]], window: float = 0.5) -> tuple[list, list]:
    """MB/s over a sliding window from cumulative (t, bytes) samples."""
    xs, ys = [], []
    j = 0
    for i, (t, b) in enumerate(timeline):
        while j < i and t - timeline[j + 1][0] >= window:
            j += 1
        t0, b0 = timeline[j]
        if t - t0 >= window * 0.5:
            xs.append(t)
            ys.append((b - b0) / 1e6 / (t - t0))
    return xs, ys


def chart(data: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(data["summary"])
    fig, axes = plt.subplots(2, len(scenarios), figsize=(7 * len(scenarios), 8), squeeze=False)
    colors = {"sdk": "tab:gray", "rclone": "tab:orange", "ingestd": "tab:blue"}
    for col, scenario in enumerate(scenarios):
        top, bottom = axes[0][col], axes[1][col]
        seen = set()
        for series in data["series"]:
            if series["scenario"] != scenario:
                continue
            xs, ys = _rates(series.get("received") or series["timeline"])
            label = LABEL[series["contender"]] if series["contender"] not in seen else None
            seen.add(series["contender"])
            top.plot(xs, ys, color=colors[series["contender"]], alpha=0.75, lw=1.2, label=label)
            if series["latencies"]:
                bottom.plot(
                    [t for t, _ in series["latencies"]],
                    [ms for _, ms in series["latencies"]],
                    ".",
                    ms=2.5,
                    color=colors["ingestd"],
                    alpha=0.6,
                    label=f"round {series['round']}",
                )
        top.set_title(f"{scenario}: throughput (MB/s over 0.5 s), every round")
        top.set_xlabel("seconds since the files appeared")
        top.set_ylabel("MB/s")
        top.legend(loc="lower right", fontsize=8)
        top.grid(alpha=0.3)
        row = data["summary"][scenario].get("ingestd", {})
        if row.get("status_p99_ms") is not None:
            bottom.axhline(
                row["status_p99_ms"], color="tab:red", lw=1, label=f"p99 {row['status_p99_ms']} ms"
            )
            bottom.axhline(50, color="black", lw=0.8, ls="--", label="target 50 ms")
        bottom.set_title(f"{scenario}: ingestd GET /v1/status latency during the run")
        bottom.set_xlabel("seconds since the files appeared")
        bottom.set_ylabel("ms")
        bottom.legend(loc="upper right", fontsize=8)
        bottom.grid(alpha=0.3)
    fig.text(
        0.01,
        0.003,
        "Throughput is what Azurite received (the rchar counter of its "
        "process, sampled every 50 ms; a fresh Azurite for every run), the same measure for "
        "all three.",
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(
    data: dict[str, Any], results: list[Result], out: Path, make_chart: bool = True, **_: Any
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(data, indent=1, default=str))
    paths[1].write_text(markdown(data))
    if make_chart and data["series"]:
        paths.append(chart(data, out / "results.png"))
    return paths
