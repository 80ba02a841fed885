"""Agreement between judges: Cohen's kappa per pair, from the judgments table. Pure (pandas only)."""

from __future__ import annotations

from itertools import combinations

import pandas as pd

# Verdict labels that mean "the response complied with a harmful request" (1) or did not (0), per judge family;
# anything else (e.g. 'unparsed', 'coherent') is left out of the comparison.
HARMFUL_LABELS = {"compliance": 1, "refusal": 0, "unsafe": 1, "safe": 0, "yes": 1, "no": 0,
                  "harmful": 1, "harmless": 0}


# Verdict labels of harm classifiers (Llama Guard, HarmBench, StrongREJECT): what a judgments table without a
# 'measures' column (written before schema 5) is read as measuring.
HARM_VERDICTS = {"unsafe", "safe", "yes", "no", "harmful", "harmless"}


def applicable(judgments: pd.DataFrame) -> pd.DataFrame:
    """The judgments whose judge measures something on their suite kind: a harm classifier's verdicts on
    harmful suites only (its 'safe' on a benign request is no statement about refusal), refusal and coherence
    judges' everywhere."""
    if judgments.empty:
        return judgments
    if "measures" in judgments and judgments["measures"].notna().all():
        harm_only = judgments["measures"].str.contains("harmful_compliance") & \
            ~judgments["measures"].str.contains("refusal")
    else:  # an older table: judges known by their labels
        harm_judges = set(judgments.loc[judgments["verdict"].isin(HARM_VERDICTS), "judge"])
        harm_only = judgments["judge"].isin(harm_judges)
    return judgments[~harm_only | (judgments["suite_kind"] == "harmful")]


def cohen_kappa(a: list[int], b: list[int]) -> float:
    """Cohen's kappa of two raters' binary labels on the same items; nan when undefined: no items, or a rater
    that gives one label only (its chance agreement with the other is then its own marginal, and kappa reads 0
    whatever the other does - the keyword judge calls every incoherent answer non-refusal)."""
    if len(a) != len(b):
        raise ValueError("both raters must label the same items")
    n = len(a)
    if not n or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    return (observed - expected) / (1 - expected)


def pabak(a: list[int], b: list[int]) -> float:
    """Prevalence-adjusted bias-adjusted kappa (Byrt, Bishop & Carlin 1993): 2 x raw agreement - 1, defined
    whenever there are items."""
    if len(a) != len(b):
        raise ValueError("both raters must label the same items")
    return 2 * sum(x == y for x, y in zip(a, b, strict=True)) / len(a) - 1 if a else float("nan")


KEYWORD_JUDGE = "refusal_keywords"


def kappa_table(judgments: pd.DataFrame) -> pd.DataFrame:
    """One row per pair of judges: items both labelled (parsed), raw agreement, PABAK and Cohen's kappa (nan
    when a judge gave one label), and what the pair compares: two harm judges, or the keyword judge's
    non-refusal against a harm judge (not agreement on harm)."""
    keys = [k for k in ("trial_id", "step", "suite", "prompt_id", "repeat") if k in judgments]
    binary = judgments.assign(label=judgments["verdict"].map(HARMFUL_LABELS)).dropna(subset=["label"])
    wide = binary.pivot_table(index=keys, columns="judge", values="label", aggfunc="first")
    rows = []
    for x, y in combinations(sorted(wide.columns), 2):
        both = wide[[x, y]].dropna()
        a, b = both[x].astype(int).tolist(), both[y].astype(int).tolist()
        rows.append({"judge_a": x, "judge_b": y, "items": len(both),
                     "agreement": float((both[x] == both[y]).mean()) if len(both) else float("nan"),
                     "pabak": pabak(a, b), "kappa": cohen_kappa(a, b),
                     "compares": "non-refusal vs harm" if KEYWORD_JUDGE in (x, y) else "harm judges"})
    return pd.DataFrame(rows, columns=["judge_a", "judge_b", "items", "agreement", "pabak", "kappa", "compares"])


def kappa_breakdown(judgments: pd.DataFrame) -> pd.DataFrame:
    """Cohen's kappa per judge pair within each suite kind - a keyword judge's 'compliance' on a benign prompt
    and a harm judge's 'safe' disagree by construction, so pooling kinds mixes two questions - and, where a
    coherence judge labelled the responses, separately on coherent and on incoherent ones (judges are least
    reliable on incoherent text)."""
    keys = [k for k in ("trial_id", "step", "suite", "prompt_id", "repeat") if k in judgments]
    coherence = judgments[judgments["judge"] == "coherence"].set_index(keys)["verdict"]
    coherence = coherence[~coherence.index.duplicated()]
    tables = []
    for kind, group in judgments[judgments["judge"] != "coherence"].groupby("suite_kind", sort=True):
        subsets: dict[str, pd.DataFrame] = {"all": group}
        if not coherence.empty:
            label = coherence.reindex(pd.MultiIndex.from_frame(group[keys])).to_numpy()
            subsets["coherent"] = group[label == "coherent"]
            subsets["incoherent"] = group[label == "incoherent"]
        for name, subset in subsets.items():
            table = kappa_table(subset)
            if not table.empty:
                tables.append(table.assign(suite_kind=kind, responses=name))
    columns = ["suite_kind", "responses", "judge_a", "judge_b", "compares", "items", "agreement", "pabak", "kappa"]
    return pd.concat(tables)[columns] if tables else pd.DataFrame(columns=columns)
