"""The benchmark's outputs: a markdown report for stdout and the JSON document it is rendered from.

Missing values print as 'n/a' (never as 0); projections print with the word PROJECTION in their row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.mode_result import COLUMNS

HEADERS = {
    "mode": "mode", "status": "status", "decode_tok_s": "decode tok/s", "ttft_s": "TTFT s", "mean_accept_length": "tau",
    "iterations": "iters", "draft_ms_per_iter": "draft ms/it", "verify_ms_per_iter": "verify ms/it",
    "copy_wait_ms_per_iter": "copy wait ms/it", "verify_h2d_gbps": "H2D GB/s (verify)", "pinned_h2d_gbps": "pinned GB/s",
    "peak_gpu_gib": "peak GPU GiB", "budget_gib": "budget GiB", "speedup_vs_vanilla": "x vanilla",
    "speedup_vs_hf_accelerate": "x hf-accelerate", "identical_to_vanilla": "same tokens as vanilla",
}
assert set(HEADERS) == set(COLUMNS)


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: n/a for None, yes/no for booleans, fixed digits for floats."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def with_unit(value: Any, unit: str, digits: int = 2) -> str:
    """'12.34 ms', or 'n/a' without the unit."""
    text = fmt(value, digits)
    return text if value is None else f"{text}{unit}"


def gb(nbytes_gb: float) -> str:
    """Gigabytes, or megabytes below one gigabyte (small synthetic models)."""
    return f"{nbytes_gb:.2f} GB" if nbytes_gb >= 1 else f"{nbytes_gb * 1e3:.2f} MB"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def modes_markdown(doc: dict[str, Any]) -> list[str]:
    run = doc["run"]
    bandwidth = doc["pinned_h2d"]
    lines = [
        f"## {run['model']} on {doc['environment']['device']}: {run['suite']}, {run['num_prompts']} prompts, "
        f"max {run['max_tokens']} tokens, greedy",
        "",
        "Pinned host-to-device bandwidth: "
        + (bandwidth["note"] if bandwidth["gbps"] is None else f"{bandwidth['gbps']:.2f} GB/s ({bandwidth['note']})"),
        "",
    ]
    rows = [[fmt(m.get(c), 3 if c in ("ttft_s", "mean_accept_length") else 2) for c in COLUMNS] for m in doc["modes"]]
    lines += _table([HEADERS[c] for c in COLUMNS], rows)
    lines += ["", f"Identical tokens, subspec vs vanilla: {fmt(doc['identical_tokens_subspec_vs_vanilla'])}"]
    lines += agreement_lines(doc.get("agreement"))
    for m in doc["modes"]:
        for note in ([m["reason"]] if m.get("reason") else []) + m.get("notes", []):
            lines.append(f"- {m['mode']}: {note}")
    return lines


def agreement_lines(agreement: dict[str, Any] | None) -> list[str]:
    """The losslessness verdict: exact in float32, tie-aware in bf16 (divergences and their margins listed)."""
    if agreement is None:
        return []
    kind = "exact (float32)" if agreement["exact"] else "tie-aware (low precision: a divergence passes only at a near-tie)"
    lines = [f"Lossless, {kind}: {fmt(agreement['lossless'])}; {agreement['identical']}/{agreement['prompts']} "
             f"prompts identical"]
    for d in agreement["diverged"]:
        margin = "n/a" if d["margin"] is None else f"{d['margin']:.4f} (near-tie at <= {d['tolerance']:.4f})"
        lines.append(f"- prompt {d['prompt']}: first difference at token {d['diverged_at']}, target top-2 margin "
                     f"{margin}: {'ok' if d['ok'] else 'LOSS'}")
    return lines


def _ms(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    return f"{with_unit(entry['ms'], ' ms')} (copy wait {with_unit(entry['copy_wait_ms'], ' ms')})"


def synthetic_markdown(syn: dict[str, Any]) -> list[str]:
    measured, engines = syn["measured"], syn["engines"]
    rows: list[list[str]] = [["pinned host-to-device bandwidth (measured at start)", with_unit(syn["pinned_h2d_gbps"], " GB/s")]]
    for mode in ("vanilla", "subspec"):
        e = engines.get(mode, {})
        if e.get("status") != "ok":
            rows.append([f"{mode} engine", f"skipped: {e.get('reason', 'not built')}"])
            continue
        layers = f"{len(e['resident_layers'])} / {len(e['streamed_layers'])}"
        rows.append([f"{mode} engine: resident / streamed layers", f"{layers} ({gb(e['streamed_gb_per_forward'])} per forward)"])
        memory = f"{with_unit(e['peak_gpu_gib'], ' GiB')} / {with_unit(e['budget_gib'], ' GiB')}"
        rows.append([f"{mode} engine: peak GPU / budget", memory])
        rows.append([f"{mode} floor (streamed bytes / pinned bandwidth)", with_unit(e["floor_ms"], " ms per forward")])
    rows.append(["vanilla token (one streamed target forward)", _ms(measured.get("vanilla_token"))])
    rows.append([f"draft tree, depth {syn['max_depth']} x topk {syn['topk']}", _ms(measured.get("draft_tree"))])
    rows.append(["draft step (tree / depth)", with_unit(measured.get("draft_step_ms"), " ms")])
    for size, entry in measured.get("verify", {}).items():
        rows.append([f"verify forward, {size} nodes", _ms(entry)])
    for p in syn["projections"]:
        tau = "n/a" if p["tau"] is None else f"{p['tau']:.2f}"
        value = (f"{with_unit(p['tokens_per_s'], ' tok/s')} ({with_unit(p['speedup_vs_vanilla'], 'x')} vanilla token; "
                 f"{with_unit(p['tokens_per_s_at_floor'], ' tok/s')} at the floor)")
        rows.append([f"PROJECTION at tau = {tau}, {p['tau_source']}", f"{value} {p['note']}".strip()])
    return [
        f"### Synthetic {syn['name']}: random {syn['dtype']} weights on {syn['device']}, mechanics only",
        "",
        *_table(["measurement", "value"], rows),
        "",
        *[f"- {note}" for note in syn["notes"]],
    ]


def markdown(doc: dict[str, Any]) -> str:
    """The whole report: the modes table (when modes ran) and the synthetic section (when asked)."""
    lines: list[str] = []
    if doc["modes"]:
        lines += modes_markdown(doc)
    if doc.get("synthetic"):
        lines += ([""] if lines else []) + synthetic_markdown(doc["synthetic"])
    return "\n".join(lines) + "\n"


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
