"""A finished search's summary: one row per trial, results.csv/.md, best_config.yaml, metric_vs_params.png."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

from galaxalign_dist.config import Config
from galaxalign_dist.launch.tune_space import TIME_ATTR, SearchSpec, config_at


def collect_rows(grid: Any, spec: SearchSpec, base: dict[str, Any], runs_dir: str) -> list[dict[str, Any]]:
    """One row per trial of a Tune ResultGrid: sampled params, final and best metric, status, error, run dir."""
    rows = []
    for result in grid:
        point = {k: (result.config or {}).get(k) for k in spec.space}
        metrics = result.metrics or {}
        trial = Path(str(result.path)).name
        total = sum(
            int(point.get(k) if point.get(k) is not None else base["stages"][k.split(".")[1]])
            for k in ("stages.stage1_epochs", "stages.stage2_epochs")
        )
        history = result.metrics_dataframe
        best_value = None
        if history is not None and spec.metric in getattr(history, "columns", []):
            series = history[spec.metric].dropna()
            if len(series):
                best_value = float(series.max() if spec.mode == "max" else series.min())
        epochs = int(metrics.get(TIME_ATTR, 0) or 0)
        if result.error is not None:
            status = "failed"
        elif epochs == 0:
            status = "no result"  # interrupted (Ctrl-C, time budget) before its first epoch ended
        elif epochs < total:
            status = "stopped"  # by the scheduler (ASHA), before its last epoch
        else:
            status = "completed"
        error = error_summary(result.error) if result.error is not None else ""
        value = metrics.get(spec.metric)
        rows.append(
            {
                "trial": trial,
                "status": status,
                spec.metric: float(value) if isinstance(value, (int, float)) else None,
                f"best_{spec.metric}": best_value,
                "epochs": epochs,
                "total_epochs": total,
                **point,
                "run_dir": f"{runs_dir}/{trial}",
                "error": error,
            }
        )
    return sort_rows(rows, spec.metric, spec.mode)


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b[^:]*:")


def error_summary(error: BaseException, limit: int = 300) -> str:
    """One line for the table: the innermost `SomeError: message` of Ray's wrapped traceback text."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if _EXC_LINE.match(lines[i]):
            text = lines[i]
            if text.endswith(":") and i + 1 < len(lines):
                text += " " + lines[i + 1]  # Ray puts the message on the next line
            if i + 2 < len(lines):
                # Ray truncates workers' tracebacks; their last line is usually the cause (e.g. OOM kills).
                text = f"{text[: limit // 2]} ... {lines[-1][-(limit // 2) :]}"
            return text[:limit]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:limit]


def sort_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Best first by the metric at each trial's last reported epoch; trials without it (failed) last."""

    def key(row: dict[str, Any]) -> tuple[int, float]:
        v = row.get(metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return (1, 0.0)
        return (0, -v if mode == "max" else v)

    return sorted(rows, key=key)


# ----------------------------------------------------------------------------- files


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_summary(
    rows: list[dict[str, Any]], spec: SearchSpec, base: dict[str, Any], base_cfg: Config, out: Path
) -> dict[str, Any] | None:
    """results.csv, results.md, best_config.yaml and metric_vs_params.png; returns the best row."""
    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else ["trial", "status", spec.metric, *spec.space, "error"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    md_cols = [c for c in columns if c != "run_dir"]
    lines = [
        f"# Search `{spec.name}`: {spec.metric} ({spec.mode}), {spec.scheduler} scheduler, {spec.algorithm} search",
        "",
        "| " + " | ".join(md_cols) + " |",
        "|" + "---|" * len(md_cols),
    ]
    for row in rows:
        cells = [_fmt(row.get(c)).replace("|", "\\|").replace("\n", " ") for c in md_cols]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    best = next((r for r in rows if r.get(spec.metric) is not None and r["status"] != "failed"), None)
    if best is not None:
        point = {k: best[k] for k in spec.space}
        # Ready to train: the trial's config, but named and stored like the base run, not inside the search.
        cfg = config_at(
            base, {**point, "run.name": f"{base_cfg.run.name}-tuned", "run.out_dir": base_cfg.run.out_dir}
        )
        header = (
            f"# Best trial of search '{spec.name}': {best['trial']}, {spec.metric}={_fmt(best[spec.metric])} "
            f"(last epoch, {best['status']}).\n"
            f"# Searched values: {point}\n"
            f"# Train it:  galaxalign train --config {out / 'best_config.yaml'}\n"
        )
        (out / "best_config.yaml").write_text(header + cfg.to_yaml())
    plot_metric_vs_params(rows, spec, out / "metric_vs_params.png")
    return best


def _option_index(options: list[Any], value: Any) -> int:
    """Position of a drawn value among choice/grid options (CSV round trips turn 1 into 1.0 or '1')."""
    for i, option in enumerate(options):
        if option == value or str(option) == str(value):
            return i
    return -1


def plot_metric_vs_params(rows: list[dict[str, Any]], spec: SearchSpec, path: Path) -> None:
    """One panel per searched key: the metric of each finished trial against the value it drew."""
    import matplotlib

    matplotlib.use("Agg")  # headless: cluster heads and CI have no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    keys = list(spec.space)
    n = len(keys)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    done = [r for r in rows if r.get(spec.metric) is not None]
    best = done[0] if done else None
    for ax, key in zip(axes.flat, keys, strict=False):
        sampler = spec.space[key]
        xs = [r[key] for r in done]
        ys = [r[spec.metric] for r in done]
        colors = ["tab:orange" if r["status"] == "stopped" else "tab:blue" for r in done]
        options = list(dict.fromkeys(sampler.values))
        if sampler.categorical:
            xs = [_option_index(options, x) for x in xs]
            ax.set_xticks(range(len(options)), [str(v) for v in options], rotation=30, fontsize=8)
            ax.set_xlim(-0.5, len(options) - 0.5)
        else:
            lo, hi = sampler.args
            # The whole sampled range, so where the trials landed inside it is visible.
            if sampler.kind == "loguniform":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels overlap
                pad = (hi / lo) ** 0.05
                ax.set_xlim(lo / pad, hi * pad)
            else:
                pad = (hi - lo) * 0.05
                ax.set_xlim(lo - pad, hi + pad)
        ax.scatter(xs, ys, c=colors, s=30)
        if best is not None:
            bx = _option_index(options, best[key]) if sampler.categorical else best[key]
            ax.scatter([bx], [best[spec.metric]], marker="*", s=180, c="tab:red", label="best")
        ax.set_xlabel(f"{key}\n{sampler.text}", fontsize=8)
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    failed = sum(r["status"] == "failed" for r in rows)
    fig.suptitle(
        f"{spec.name}: {spec.metric} at each trial's last epoch "
        f"({len(done)} trials; blue completed, orange stopped early; {failed} failed not shown)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
