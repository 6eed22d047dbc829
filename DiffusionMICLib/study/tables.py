"""The study's outputs: Markdown tables in the survey's layout (rows = methods, columns = metrics,
best in bold, plus each method's training budget and inference time per volume) and the figure
(the same slices for every method, the reference, and error maps)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

FAMILY_ORDER = {"diffusion": 0, "learned": 1, "classic": 2, "floor": 3}


def metric_columns(module) -> list[dict[str, Any]]:
    """The task's metric columns: key, title, which direction is better ("higher"/"lower"/None)."""
    return [{"key": k, "title": t, "better": b} for k, t, b in module.COLUMNS]


def cell(text: str) -> str:
    """Text safe inside a markdown table cell (a method label may hold "|z|")."""
    return text.replace("|", "\\|")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def _budget(training: dict[str, Any] | None) -> str:
    if not training:
        return "none (no training)"
    return f"{training.get('steps')} × {training.get('batch_size')} in {training.get('wall_time_s', 0):.0f} s"


def table_names(doc: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for result in doc["methods"].values():
        names += [n for n in result["tables"] if n not in names]
    return names


def best_values(doc: dict[str, Any], table: str) -> dict[str, float]:
    """The best value of each metric column in one table (None-free columns only)."""
    best: dict[str, float] = {}
    for col in doc["columns"]:
        if col["better"] is None:
            continue
        values = [r["tables"][table].get(col["key"]) for r in doc["methods"].values() if table in r["tables"]]
        values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
        if values:
            best[col["key"]] = max(values) if col["better"] == "higher" else min(values)
    return best


def markdown(doc: dict[str, Any]) -> str:
    """One table per data set: rows = methods, columns = metrics, best in bold."""
    src = doc["data"]
    lines = [f"# Study: {doc['task']}{' (quick: wiring only, not a ranking)' if doc['quick'] else ''}", ""]
    if src.get("kind") == "phantom":
        lines.append(f"Data: phantom, {src['train_subjects']} training subjects (seed {src['train_seed']}), "
                     f"{src['test_subjects']} held-out subjects (seed {src['test_seed']}), "
                     f"{src['resolution_mm']:g} mm.")
    else:
        lines.append(f"Data: {src.get('path')}, split by seed {src.get('split_seed')}: "
                     f"{len(src.get('train_cases', []))} training, {len(src.get('test_cases', []))} test cases.")
    b = doc["budget"]
    lines += [f"Budget of every learned method: {b['steps']} steps of batch {b['batch_size']} "
              f"(a safety stop at {b['time_limit_s']:g} s of training; the training column says what each got).", ""]
    methods = sorted(doc["methods"].items(), key=lambda kv: FAMILY_ORDER.get(kv[1]["family"], 9))
    for table in table_names(doc):
        best = best_values(doc, table)
        cols = doc["columns"]
        lines += [f"## {table}", "",
                  "| method | " + " | ".join(c["title"] for c in cols) + " | training | s / volume |",
                  "|---" * (len(cols) + 3) + "|"]
        for name, r in methods:
            if table not in r["tables"]:
                continue
            row = r["tables"][table]
            cells = []
            for c in cols:
                v = row.get(c["key"])
                text = _fmt(v)
                cells.append(f"**{text}**" if c["key"] in best and v == best[c["key"]] else text)
            label = cell(r["label"] + (f" ({r['note']})" if r.get("note") else ""))
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_budget(r.get('training'))} | "
                         f"{_fmt(r.get('seconds_per_volume'))} |")
        lines.append("")
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def task_figure(path: Path, doc: dict[str, Any], work: Path) -> Path | None:
    """Rows: the reference, then every method; columns: the previews (same slices for all)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    label_colours = ListedColormap(["black", *matplotlib.colormaps["tab10"].colors])   # value 0 black
    rows: list[tuple[str, dict[str, np.ndarray]]] = []
    ref = work / "reference.npz"
    if ref.is_file():
        rows.append(("reference", dict(np.load(ref))))
    for name, r in doc["methods"].items():
        p = work / name / "previews.npz"
        if p.is_file():
            rows.append((r["label"], dict(np.load(p))))
    keys: list[str] = []
    for _, previews in rows:
        keys += [k for k in previews if k not in keys]
    if not rows or not keys:
        return None
    # one intensity window per column (the median over rows of each image's 99.5th percentile, so
    # that one failed method does not set it): the methods' images and error maps compare at a glance
    window = {k: float(np.median([np.percentile(p[k], 99.5) for _, p in rows if k in p])) or 1.0 for k in keys}
    fig, axes = plt.subplots(len(rows), len(keys), figsize=(2.2 * len(keys), 2.2 * len(rows)), squeeze=False)
    for i, (label, previews) in enumerate(rows):
        for j, key in enumerate(keys):
            ax = axes[i, j]
            ax.axis("off")
            if key in previews:
                image = previews[key]
                if "labels" in key and "error" not in key:     # label maps: one fixed colour per value
                    ax.imshow(image, cmap=label_colours, origin="lower", vmin=-0.5, vmax=label_colours.N - 0.5,
                              interpolation="nearest")
                else:
                    error = "error" in key or "map" in key
                    ax.imshow(image, cmap="magma" if error else "gray", origin="lower",
                              vmin=0, vmax=window[key], interpolation="nearest")
            if i == 0:
                ax.set_title(key, fontsize=7)
            if j == 0:
                ax.text(-0.05, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
