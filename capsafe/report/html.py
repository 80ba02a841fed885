"""The report's plots (PNG files beside ``report.md``) and a self-contained ``report.html``: the markdown's
headings, paragraphs, bullet lists and tables as HTML, with every plot embedded as a data URI so that the
file can be mailed or copied off a cluster alone. matplotlib only, headless (Agg)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

import pandas as pd

from capsafe.report.stats import nested_interval
from capsafe.report.tables import coherence_split, method_order, per_checkpoint, per_prompt

PLOTS_DIR = "plots"
LEAD_PLOT = "lead.png"  # shown under the headline, before the tables


def _figure(width: float = 7.0, height: float = 3.6, rows: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, 1, figsize=(width, height), dpi=110)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def capability_plot(trials: pd.DataFrame, checkpoints: pd.DataFrame, target: float, out: Path) -> Path | None:
    """Capability reached by each trial at each kept checkpoint (training and as served), against the target."""
    rows = checkpoints[checkpoints["reached"].astype(bool)].merge(trials[["trial_id", "method"]], on="trial_id")
    best = trials[(trials["method"] != "base") & ~trials["reached"].astype(bool)]
    if rows.empty and best.empty:
        return None
    fig, ax = _figure()
    methods = sorted(set(rows["method"]) | set(best["method"]))
    for i, m in enumerate(methods):
        mine = rows[rows["method"] == m]
        ax.scatter([i - 0.1] * len(mine), mine["capability"], color="tab:blue",
                   label="in training" if i == 0 else None)
        served = mine[mine["served_capability"].notna()]
        ax.scatter([i + 0.1] * len(served), served["served_capability"], color="tab:orange",
                   marker="s", label="served" if i == 0 else None)
        missed = best[best["method"] == m]
        ax.scatter([i] * len(missed), missed["capability"].fillna(0.0), color="tab:red",
                   marker="x", label="best, target not reached" if not missed.empty else None)
    ax.axhline(target, color="gray", linestyle="--", label=f"target {target:g}")
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylabel("capability")
    ax.set_title("Capability at the kept checkpoints")
    ax.legend(fontsize=8)
    return _save(fig, out)


def rates_plot(judgments: pd.DataFrame, trials: pd.DataFrame, out: Path) -> Path | None:
    """Per suite: each method's rate (harmful compliance, over-refusal ...) by judge, with 95 % intervals."""
    suites = sorted(judgments["suite"].unique())
    if not suites:
        return None
    fig, axes = _figure(7.0, 2.6 * len(suites), rows=len(suites))
    import numpy as np

    axes = list(np.atleast_1d(axes))
    for ax, suite in zip(axes, suites, strict=True):
        judges = [j for j in sorted(judgments["judge"].unique())
                  if not per_prompt(judgments, trials, j, suite).empty]
        for k, judge in enumerate(judges):
            wide = per_prompt(judgments, trials, judge, suite)
            methods = list(wide.columns)
            by_checkpoint = per_checkpoint(judgments, trials, judge, suite)
            ivs = [nested_interval(by_checkpoint[by_checkpoint["method"] == m].drop(columns="method")
                                   .to_numpy(dtype=float)) for m in methods]
            xs = np.arange(len(methods)) + (k - (len(judges) - 1) / 2) * 0.8 / max(1, len(judges))
            vals = [iv.value if iv else np.nan for iv in ivs]
            err = [[max(0.0, iv.value - iv.low) if iv else 0 for iv in ivs],
                   [max(0.0, iv.high - iv.value) if iv else 0 for iv in ivs]]
            ax.bar(xs, vals, width=0.8 / max(1, len(judges)), yerr=err, capsize=3, label=judge)
            ax.set_xticks(range(len(methods)), methods, rotation=20)
        kind = str(judgments.loc[judgments["suite"] == suite, "suite_kind"].iloc[0])
        ax.set_ylim(0, 1.05)
        measure = "harmful compliance (harm judges), non-refusal (keyword judge)" if kind == "harmful" \
            else "refusal rate"
        ax.set_title(f"{suite}: {measure} (95 % CI)")
        if judges:
            ax.legend(fontsize=7)
    return _save(fig, out)


def coherence_plot(judgments: pd.DataFrame, trials: pd.DataFrame, out: Path) -> Path | None:
    """Harmful-suite answers per method: refused, complied coherently, complied incoherently (stacked)."""
    split = coherence_split(judgments, trials)
    if split.empty:
        return None
    fig, ax = _figure()
    bottom = [0.0] * len(split)
    for col, color in (("refused", "tab:green"), ("complied, coherent", "tab:red"),
                       ("complied, incoherent", "tab:gray")):
        ax.bar(split["method"], split[col], bottom=bottom, label=col, color=color)
        bottom = [b + v for b, v in zip(bottom, split[col], strict=True)]
    ax.set_ylim(0, 1.05)
    ax.set_title("Harmful-suite answers by coherence")
    ax.legend(fontsize=8)
    return _save(fig, out)


def ladder_plot(ladder: pd.DataFrame, out: Path) -> Path | None:
    """Safety against capability per method along the ladder: the keyword judge's non-refusal at each rung's
    checkpoints."""
    rows = ladder.dropna(subset=["harmful refusal"])
    if rows.empty or rows["level"].nunique() < 2:
        return None
    fig, ax = _figure()
    for method, g in rows.groupby("method", sort=True):
        x = g["served capability"].fillna(g["capability"]).astype(float)
        ax.plot(x, 1.0 - g["harmful refusal"].astype(float), marker="o", label=str(method))
    ax.set_xlabel("capability (as served)")
    ax.set_ylabel("non-refusal (keyword judge)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("Safety along the capability ladder")
    ax.legend(fontsize=8)
    return _save(fig, out)


def lead_plot(judgments: pd.DataFrame, trials: pd.DataFrame, checkpoints: pd.DataFrame, target: float,
              tolerance: float, out: Path) -> Path | None:
    """The report's lead figure: harmful compliance (harmful suites pooled, one marker per judge) against
    confirmed capability, one colour per method, every evaluated checkpoint (ladder rungs make a curve), with
    the equal-capability band shaded."""
    from capsafe.report.agreement import HARMFUL_LABELS, KEYWORD_JUDGE

    j = judgments[(judgments["suite_kind"] == "harmful") & (judgments["judge"] != "coherence")]
    j = j.assign(harmful=j["verdict"].map(HARMFUL_LABELS)).dropna(subset=["harmful"])
    if j.empty:
        return None
    kept = checkpoints[checkpoints["reached"].astype(bool)].dropna(subset=["step"])
    points = pd.concat([
        kept.assign(x=kept["confirmed_capability"].fillna(kept["served_capability"]).fillna(kept["capability"]))
        [["trial_id", "step", "x"]],
        trials[trials["status"] == "base"].assign(x=lambda t: t["confirmed_capability"].fillna(t["capability"]))
        [["trial_id", "step", "x"]]]).astype({"step": "int64"}).drop_duplicates(["trial_id", "step"])
    points = points.merge(trials[["trial_id", "method"]], on="trial_id")
    rates = (j.groupby(["trial_id", "step", "judge"])["harmful"].mean().reset_index()
             .astype({"step": "int64"}).merge(points, on=["trial_id", "step"]))
    if rates.empty:
        return None
    fig, ax = _figure(7.0, 4.2)
    import matplotlib.pyplot as plt

    if tolerance == tolerance and target == target:  # both known (not NaN)
        ax.axvspan(target - tolerance, target + tolerance, color="tab:green", alpha=0.12,
                   label=f"equal-capability band {target:g} ± {tolerance:g}")
    palette = plt.get_cmap("tab10")
    colours = {m: palette(i % 10) for i, m in enumerate(method_order(rates["method"]))}
    markers = dict(zip(sorted(rates["judge"].unique()), "osD^v<>p*", strict=False))
    for (method, judge), g in rates.groupby(["method", "judge"], sort=True):
        for _, trial in g.groupby("trial_id"):
            trial = trial.sort_values("x")
            ax.plot(trial["x"], trial["harmful"], color=colours[method], marker=markers[judge], alpha=0.85,
                    linestyle="-" if len(trial) > 1 else "none")
    for method, colour in colours.items():
        ax.plot([], [], color=colour, linewidth=6, label=str(method))
    for judge, marker in markers.items():
        # the keyword judge sees refusal, not harm: its rate is non-refusal, gibberish included
        what = " (non-refusal)" if judge == KEYWORD_JUDGE else ""
        ax.plot([], [], color="black", marker=marker, linestyle="none", label=f"judge: {judge}{what}")
    ax.set_xlabel("confirmed capability (held-out split, as served)")
    ax.set_ylabel("harmful compliance (keyword judge: non-refusal)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Harmful compliance against capability, per method and judge")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, out)


def write_plots(results_dir: Path, trials: pd.DataFrame, checkpoints: pd.DataFrame, judgments: pd.DataFrame,
                target: float, ladder: pd.DataFrame | None = None) -> list[Path]:
    """Every plot the results allow, as PNG files under ``results_dir/plots``."""
    folder = results_dir / PLOTS_DIR
    folder.mkdir(exist_ok=True)
    tolerance = float(trials["tolerance"].dropna().iloc[0]) if "tolerance" in trials and \
        trials["tolerance"].notna().any() else float("nan")
    made = [lead_plot(judgments, trials, checkpoints, target, tolerance, folder / LEAD_PLOT) if not judgments.empty
            else None, capability_plot(trials, checkpoints, target, folder / "capability.png")]
    if ladder is not None:
        made.append(ladder_plot(ladder, folder / "ladder.png"))
    if not judgments.empty:
        made += [rates_plot(judgments, trials, folder / "rates.png"),
                 coherence_plot(judgments, trials, folder / "coherence.png")]
    return [p for p in made if p is not None]


def _inline(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _embed(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(alt or path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(path.name)}</figcaption></figure>")


def markdown_to_html(markdown: str, images: dict[str, Path] | None = None) -> str:
    """The report's markdown subset (headings, paragraphs, '- ' lists, pipe tables, and image lines
    ``![alt](plots/x.png)`` whose file is in ``images``, embedded there and taken out of it) as HTML."""
    parts: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            parts.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, body = rows[0], [r for r in rows[1:] if not all(set(c) <= {"-"} for c in r)]
            parts.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                         + "</table>")
            continue
        elif (image := re.fullmatch(r"!\[(.*)\]\((.+)\)", line.strip())) and images is not None:
            path = Path(image.group(2))
            if path.name in images:
                parts.append(_embed(images.pop(path.name), image.group(1)))
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            parts.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            parts.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(parts)


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:3px 6px}th{background:#f0f0f0}img{max-width:100%}")


# Once the page has loaded, each image records the size the browser decoded it at: a headless browser's DOM dump
# then shows whether every plot rendered (scripts/check_report_html.py).
RENDER_MARK = ("window.addEventListener('load',()=>document.querySelectorAll('img').forEach("
               "i=>i.setAttribute('data-rendered',i.naturalWidth+'x'+i.naturalHeight)))")


def write_html(results_dir: Path, markdown: str, plots: list[Path], title: str) -> Path:
    """``report.html``: the markdown report with the plots embedded (no file beside it is needed)."""
    rest = {p.name: p for p in plots}
    body = markdown_to_html(markdown, rest)  # embeds the plots the markdown shows in place
    figures = "".join(_embed(p, p.stem) for p in rest.values())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}{'<h2>Plots</h2>' + figures if figures else ''}"
            f"<script>{RENDER_MARK}</script></body></html>")
    tmp = results_dir / ".report.html.tmp"
    tmp.write_text(page)
    tmp.replace(results_dir / "report.html")
    return results_dir / "report.html"
