"""Capability in the report: which number stands for a checkpoint's capability, the equal-capability band, and
the tables that show both. Pure (pandas only).

A checkpoint's compared capability is the one measured on the confirmation split (items that chose nothing);
without a confirmation split, the pool's re-measurement on the selection split, said to be biased upward
because that split chose the checkpoint; without that, training's own number. A comparison is at equal
capability only when every checkpoint in it lies in the band [target - tolerance, target + tolerance]. Each
confirmed capability is shown with its 95 % Wilson interval over the confirmation items.

A trial keeps, per level, the in-band evaluation closest to the level on the selection split; one that jumped
from below the band to above it with no evaluation inside keeps that evaluation, outside the band on the
selection split already, and the checkpoint table says so.
"""

from __future__ import annotations

import json

import pandas as pd

from capsafe.common.capability import in_band
from capsafe.report.stats import proportion_interval


def compared(row: pd.Series | dict) -> tuple[float | None, str]:
    """(capability that stands for a kept checkpoint, where it was measured)."""
    for column, source in (("confirmed_capability", "confirmation"), ("served_capability", "selection, served"),
                           ("capability", "selection, training")):
        value = row.get(column) if isinstance(row, dict) else row.get(column, None)
        if value is not None and not pd.isna(value):
            return float(value), source
    return None, "none"


def confirmed_interval(row: pd.Series | dict) -> tuple[float, float] | None:
    """95 % Wilson interval of a checkpoint's confirmed capability over its confirmation items (None without
    them). A metric with partial credit (rouge_l) counts its sum as successes."""
    value, items = row.get("confirmed_capability"), row.get("confirmed_items")
    if value is None or items is None or pd.isna(value) or pd.isna(items) or int(items) < 1:
        return None
    interval = proportion_interval([float(value)] * int(items))
    return None if interval is None else (interval.low, interval.high)


def _with_interval(value: float | None, source: str, row: pd.Series | dict) -> str:
    if value is None:
        return "n/a"
    interval = confirmed_interval(row) if source == "confirmation" else None
    return f"{value:.2f}" + ("" if interval is None else f" [{interval[0]:.2f}, {interval[1]:.2f}]")


def band(trials: pd.DataFrame) -> tuple[float, float]:
    """(target, tolerance) of the run."""
    target = float(trials["target"].dropna().iloc[0]) if trials["target"].notna().any() else float("nan")
    tol = trials["tolerance"].dropna() if "tolerance" in trials else pd.Series(dtype=float)
    return target, float(tol.iloc[0]) if not tol.empty else 0.0


def target_checkpoints(trials: pd.DataFrame, checkpoints: pd.DataFrame) -> pd.DataFrame:
    """The target-level checkpoint of every trial that reached it, with its method."""
    target, _ = band(trials)
    reached = checkpoints[checkpoints["reached"].astype(bool) & ((checkpoints["level"] - target).abs() < 1e-9)]
    return reached.merge(trials[["trial_id", "method"]], on="trial_id")


def method_band(trials: pd.DataFrame, checkpoints: pd.DataFrame) -> dict[str, tuple[bool, str]]:
    """Per method: (all its target checkpoints in the band, a short description of their capability, each
    confirmed one with its 95 % interval)."""
    target, tolerance = band(trials)
    out = {}
    for method, group in target_checkpoints(trials, checkpoints).groupby("method", sort=False):
        records = group.to_dict("records")
        values = [compared(r) for r in records]
        inside = all(in_band(v, target, tolerance) for v, _ in values)
        numbers = ", ".join(_with_interval(v, src, r) for (v, src), r in zip(values, records, strict=True))
        source = values[0][1] if values else "none"
        out[str(method)] = (inside, f"{numbers} ({source})")
    return out


def equal_capability(trials: pd.DataFrame, checkpoints: pd.DataFrame) -> dict[str, bool]:
    """Per method: whether every one of its target checkpoints lies in the equal-capability band."""
    return {m: inside for m, (inside, _) in method_band(trials, checkpoints).items()}


def band_label(inside: bool, trials: pd.DataFrame) -> str:
    target, tolerance = band(trials)
    return "yes" if inside else f"NO: outside [{target - tolerance:.2f}, {target + tolerance:.2f}]"


def checkpoint_table(trials: pd.DataFrame, checkpoints: pd.DataFrame) -> pd.DataFrame:
    """Every kept checkpoint: capability on the selection split in training and as served, on the confirmation
    split with its 95 % interval, and whether that lies in its level's band (a checkpoint kept after a jump over
    the whole band says so: no evaluation fell inside it)."""
    _, tolerance = band(trials)
    rows = []
    kept = checkpoints[checkpoints["reached"].astype(bool)].merge(trials[["trial_id", "method"]], on="trial_id")
    for c in kept.sort_values(["method", "trial_id", "level"]).to_dict("records"):
        value, source = compared(c)
        served = None if pd.isna(c["served_capability"]) else float(c["served_capability"])
        confirmed = None if pd.isna(c.get("confirmed_capability")) else float(c["confirmed_capability"])
        interval = confirmed_interval(c)
        verdict = "yes" if in_band(value, c["level"], tolerance) else f"NO ({source})"
        if not in_band(float(c["capability"]), c["level"], tolerance):
            verdict += "; jumped over the band: no evaluation inside it"
        rows.append({"method": c["method"], "trial": c["trial_id"], "level": f"{c['level']:g}", "step": int(c["step"]),
                     "selection (training)": float(c["capability"]), "selection (served)": served,
                     "confirmed": confirmed,
                     "confirmed 95 % CI": "n/a" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]",
                     "confirmed - level": "n/a" if confirmed is None else f"{confirmed - c['level']:+.3f}",
                     "in band": verdict})
    return pd.DataFrame(rows)


def postprocess_notes(group: pd.DataFrame) -> str:
    """What a post-hoc method (Safe-LoRA) did to these checkpoints."""
    notes = [json.loads(n) for n in group["postprocess"].dropna() if n]
    return "; ".join(_describe_postprocess(n) for n in notes) or "-"


def _describe_postprocess(note: dict) -> str:
    if "safe_lora" in note:
        s = note["safe_lora"]
        return f"Safe-LoRA projected {s['projected']}/{s['layers']} layers (threshold {s['threshold']:g})"
    return json.dumps(note)
