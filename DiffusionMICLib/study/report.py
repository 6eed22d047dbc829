"""`diffusion-mic study report DIR`: the tasks' studies merged into DIR/report.md (a headline table:
for every table of every task, the best diffusion row against the best other row on the task's
first metric) and DIR/report.png (the same as bars)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import DiffusionMICError
from .tables import _fmt, cell, table_names

ORDER = ("denoise", "translate", "segment", "anomaly", "generate", "speed")


def headline(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per table: the primary metric, the best diffusion method and the best other method (the
    bundled models, trained longer than the study's budget, are left out: not a fair comparison)."""
    col = doc["columns"][0]
    sign = 1 if col["better"] == "higher" else -1
    rows = []
    for table in table_names(doc):
        best: dict[str, tuple[float, str]] = {}
        for name, r in doc["methods"].items():
            if name.endswith("-bundled"):
                continue
            v = r["tables"].get(table, {}).get(col["key"])
            if not isinstance(v, (int, float)) or math.isnan(v):
                continue
            side = "diffusion" if r["family"] == "diffusion" else "other"
            if side not in best or sign * v > sign * best[side][0]:
                best[side] = (float(v), r["label"])
        if "diffusion" in best and "other" in best:
            d, o = best["diffusion"], best["other"]
            rows.append({"task": doc["task"], "table": table, "metric": col["title"], "diffusion": d[0],
                         "diffusion_method": d[1], "other": o[0], "other_method": o[1],
                         "diffusion_wins": sign * d[0] >= sign * o[0]})
    return rows


def write_report(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    docs = {t: json.loads((folder / f"{t}.json").read_text(encoding="utf-8")) for t in ORDER if (folder / f"{t}.json").is_file()}
    if not docs:
        raise DiffusionMICError(f"'{folder}' holds no study results (TASK.json); run `diffusion-mic study TASK --out {folder}` first")
    rows = [row for doc in docs.values() for row in headline(doc)]
    lines = ["# Does diffusion help? Measured here", "",
             "Best diffusion row against the best other row of each table, on the table's first metric "
             "(every number and the other metrics are in the task sections below).", "",
             "| task | table | metric | diffusion | best other method | winner |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['table']} | {r['metric']} | {_fmt(r['diffusion'])} ({cell(r['diffusion_method'])}) | "
                     f"{_fmt(r['other'])} ({cell(r['other_method'])}) | {'diffusion' if r['diffusion_wins'] else 'other'} |")
    lines.append("")
    for task in docs:
        text = (folder / f"{task}.md").read_text(encoding="utf-8")
        lines += [text.replace("# Study:", "## Study:", 1).replace("\n## ", "\n### "), f"![{task}]({task}.png)", ""]
    (folder / "report.md").write_text("\n".join(lines), encoding="utf-8")
    figure = _summary_figure(folder / "report.png", rows)
    return {"report": str(folder / "report.md"), "figure": str(figure) if figure else None, "tasks": list(docs)}


def _summary_figure(path: Path, rows: list[dict[str, Any]]) -> Path | None:
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    labels = [f"{r['task']}: {r['table']} ({r['metric']})" for r in rows]
    y = range(len(rows))
    # relative to the better of the two, so that tasks with different metrics share one axis
    scale = [max(abs(r["diffusion"]), abs(r["other"])) or 1.0 for r in rows]
    ax.barh([i + 0.2 for i in y], [r["diffusion"] / s for r, s in zip(rows, scale)], 0.4, label="diffusion (best)")
    ax.barh([i - 0.2 for i in y], [r["other"] / s for r, s in zip(rows, scale)], 0.4, label="best other method")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.set_xlabel("value / larger of the two")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
