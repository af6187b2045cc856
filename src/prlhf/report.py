"""Reports that compare models: a markdown table, JSON, and PNG plots (length distribution per
user group, accuracy per user)."""

from __future__ import annotations

import json
from pathlib import Path

ACCURACY_KEYS = ("seen", "generic", "unseen")


def method_summary(metrics: dict, pairs: list[dict], generation: dict | None = None, groups: dict[str, str] | None = None,
                   matcher=None, match_groups: dict[str, str] | None = None) -> dict:
    """What a report says of one method: accuracy (with CIs) from ``evaluate_accuracy``'s
    ``metrics`` and ``pairs``, the user-swap flip rate (overall and per group), and, when
    ``generation`` (from ``evaluate_generation``) is given, words per group and the user-match
    rate of the generations (``matcher``: a ``NearestCentroidMatcher``)."""
    from .behaviour import flip_rate, user_match_rate

    acc = metrics["accuracy"]
    flips = flip_rate(pairs, groups)
    out = {
        "accuracy": {k: acc[k] for k in ACCURACY_KEYS},
        "accuracy_ci": {k: acc["ci"][k] for k in ACCURACY_KEYS},
        "accuracy_per_user_mean": {k: acc["per_user_mean"][k]["mean"] for k in ("seen", "unseen")},
        "n_pairs": {"seen": metrics["n"]["seen"], "unseen": metrics["n"]["unseen"]},
        "flip_rate": flips["rate"],
        "flip_rate_ci": flips["ci"],
        "flip_rate_by_group": flips["per_group"],
        "accuracy_by_group": accuracy_by_group(pairs, groups),
        "length": {},
    }
    if generation is not None:
        out["length"] = generation["length"]
        out["length_ci"] = generation["length_ci"]
        out["length_prompts"] = generation.get("prompts", "own")
        if matcher is not None:
            match = user_match_rate(matcher, generation["generations"], match_groups)
            out.update(user_match=match["rate"], user_match_ci=match["ci"], user_match_chance=match["chance"],
                       user_match_n=match["n"], user_match_per_label=match["per_label"],
                       user_match_unseen_assigned=match["assigned_unknown"])
    return out


def accuracy_by_group(pairs: list[dict], groups: dict[str, str] | None = None) -> dict[str, float]:
    """Held-out accuracy of the seen users' pairs per user group (users.json's ``group``, e.g.
    majority / minority), each pair scored with its user's own embedding."""
    by_group: dict[str, list[float]] = {}
    for p in pairs:
        if p.get("seen"):
            by_group.setdefault((groups or {}).get(p["user_id"], "seen"), []).append(p["correct"])
    return {g: sum(v) / len(v) for g, v in sorted(by_group.items())}


def fmt_number(x, digits=3) -> str:
    """A number as the tables print it ('-' for none)."""
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_interval(ci) -> str:
    return "" if not ci else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def comparison_table(methods: dict[str, dict]) -> str:
    """One row per method: accuracy (seen / generic / unseen, with 95% CIs), mean generated words
    per user group, and the flip and user-match rates when measured."""
    groups = sorted({g for m in methods.values() for g in m.get("length", {})},
                    key=lambda g: ({"majority": 0, "minority": 1, "unseen": 3}.get(g, 2), g))
    match = any(m.get("user_match") is not None for m in methods.values())
    flips = any(m.get("flip_rate") is not None for m in methods.values())
    head = ["method"] + [f"acc {k}" for k in ACCURACY_KEYS] + [f"words {g}" for g in groups]
    diff = next((m["accuracy_difference"]["vs"] for m in methods.values() if m.get("accuracy_difference")), None)
    head += ["flip rate"] * flips + ["user match"] * match + [f"seen - {diff}"] * bool(diff)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        acc, ci = m.get("accuracy", {}), m.get("accuracy_ci", {})
        cells = [name] + [fmt_number(acc.get(k)) + fmt_interval(ci.get(k)) for k in ACCURACY_KEYS]
        cells += [fmt_number(m.get("length", {}).get(g), 1) for g in groups]
        if flips:
            cells.append(fmt_number(m.get("flip_rate")))
        if match:
            cells.append(fmt_number(m.get("user_match")) + fmt_interval(m.get("user_match_ci")))
        if diff:
            d = (m.get("accuracy_difference") or {}).get("seen")
            cells.append("-" if not d else f"{d['mean']:+.3f}" + fmt_interval(d["ci"]))
        lines.append("| " + " | ".join(cells) + " |")
    pairwise = differences_table(methods)
    return "\n".join(lines) + ("\n\n" + pairwise if pairwise else "")


def differences_table(methods: dict[str, dict]) -> str:
    """With three or more methods: each one's accuracy minus each earlier one's on the same held-out pairs
    (paired bootstrap 95% intervals), seen and unseen users; empty when no method carries them."""
    rows = [(name, other, d) for name, m in methods.items() for other, d in (m.get("accuracy_differences") or {}).items()]
    if not rows:
        return ""
    lines = ["| method | minus | seen (paired) | unseen (paired) |", "|---|---|---|---|"]
    for name, other, d in rows:
        cells = ["-" if not d.get(g) else f"{d[g]['mean']:+.3f}" + fmt_interval(d[g]["ci"]) for g in ("seen", "unseen")]
        lines.append(f"| {name} | {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_lengths(generations: dict[str, list[dict]], path: Path) -> Path:
    """Box plots of generated response length (words) per user group, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(generations)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        by_group: dict[str, list[int]] = {}
        for g in generations[name]:
            by_group.setdefault(g["group"], []).append(g["n_words"])
        order = sorted(by_group, key=lambda g: ({"majority": 0, "minority": 1, "unseen": 3}.get(g, 2), g))
        if order:
            ax.boxplot([by_group[g] for g in order], tick_labels=order)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    axes[0][0].set_ylabel("words in generated response")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_per_user(per_user: dict[str, dict[str, float]], groups: dict[str, str], path: Path) -> Path:
    """Implicit-reward accuracy of each user (grouped bars, one colour per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = sorted({u for acc in per_user.values() for u in acc},
                   key=lambda u: ({"majority": 0, "minority": 1}.get(groups.get(u, ""), 2), u))
    width = 0.8 / max(1, len(per_user))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(users) * max(1, len(per_user)) / 2), 3.4))
    for k, (name, acc) in enumerate(per_user.items()):
        xs = [i + k * width for i in range(len(users))]
        ax.bar(xs, [acc.get(u, 0) or 0 for u in users], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(users))])
    ax.set_xticklabels([f"{u} ({groups.get(u, '?')[:3]})" for u in users], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.legend(fontsize=7, ncol=min(4, len(per_user)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, report: dict, generations: dict[str, list[dict]] | None = None,
                 per_user: dict[str, dict[str, float]] | None = None, groups: dict[str, str] | None = None,
                 title: str = "prlhf report", preamble: str = "") -> dict[str, Path]:
    """``report.json``, ``report.md`` and the plots; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=1))
    md = [f"# {title}", "", preamble, "", comparison_table(report["methods"]), ""]
    if generations:
        paths["lengths"] = plot_lengths(generations, out / "lengths.png")
        md += ["![generated length per user group](lengths.png)", ""]
        with (out / "generations.jsonl").open("w") as f:
            for name, gens in generations.items():
                for g in gens:
                    f.write(json.dumps({"method": name, **g}, ensure_ascii=False) + "\n")
    if per_user:
        paths["accuracy"] = plot_accuracy_per_user(per_user, groups or {}, out / "accuracy_per_user.png")
        md += ["![accuracy per user](accuracy_per_user.png)", ""]
    if report.get("cold_start"):
        cs = report["cold_start"]
        paths["cold_start"] = plot_cold_start(cs, out / "cold_start.png")
        md += ["## New users (cold start)", "",
               "Held-out accuracy of users absent from training after adapting only their own parameters on k of "
               "their labelled pairs (k = 0: the generic user), pairs chosen at random or by active questions.", "",
               cold_start_table(cs), "", f"Seen users: {fmt_number(cs.get('seen_accuracy'))}. Text only (no pairs, a profile "
               f"text): {fmt_number(cs.get('text_only_accuracy'))}; the same users without text: {fmt_number(cs.get('no_text_accuracy'))}.",
               "", "![cold start](cold_start.png)", ""]
    paths["md"].write_text("\n".join(md))
    return paths


def cold_start_table(cold: dict) -> str:
    """Markdown: accuracy of new users per k, one row per (user model, strategy)."""
    ks = sorted({int(k) for m in cold["curves"].values() for c in m.values() for k in c})
    head = ["user model", "choice"] + [f"k={k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, curves in cold["curves"].items():
        for strategy, curve in curves.items():
            cells = [name, strategy] + ["-" if curve.get(str(k)) is None else f"{curve[str(k)]:.3f}" for k in ks]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_cold_start(cold: dict, path: str | Path) -> Path:
    """Learning curves: held-out accuracy of new users against the number of labelled pairs k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, curves in cold["curves"].items():
        for strategy, curve in curves.items():
            ks = sorted(int(k) for k in curve)
            xs = [max(k, 0.5) for k in ks]  # k = 0 drawn at 0.5 on the log axis
            ax.plot(xs, [curve[str(k)] for k in ks], marker="o", ls="-" if strategy == "random" else "--",
                    label=f"{name}, {strategy}")
    if cold.get("seen_accuracy") is not None:
        ax.axhline(cold["seen_accuracy"], color="grey", lw=0.8, ls=":", label="seen users")
    if cold.get("text_only_accuracy") is not None:
        ax.axhline(cold["text_only_accuracy"], color="green", lw=0.8, ls=":", label="text only, k = 0")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labelled pairs per new user (k; k = 0 at 0.5)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stamp_runtime(report_json: str | Path, since: float) -> float:
    """Record ``runtime_seconds`` (now - ``since``, a Unix time) in a written ``report.json``; the
    recipes call it last (``python -m prlhf.report OUT/report.json --runtime-since START``)."""
    import time

    path = Path(report_json)
    report = json.loads(path.read_text())
    report["runtime_seconds"] = float(time.time() - since)
    path.write_text(json.dumps(report, indent=1))
    return report["runtime_seconds"]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m prlhf.report", description="Stamp a recipe's wall time into report.json.")
    ap.add_argument("report_json")
    ap.add_argument("--runtime-since", type=float, required=True, help="Unix time the recipe started")
    a = ap.parse_args()
    print(f"runtime {stamp_runtime(a.report_json, a.runtime_since):.0f} s, recorded in {a.report_json}")
