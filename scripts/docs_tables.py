"""Write every generated table of README.md and docs/*.md from its committed source, so that a
number in the docs cannot drift from the file it comes from.

    python scripts/docs_tables.py            # rewrite the tables in place
    python scripts/docs_tables.py --check    # change nothing; exit 1 naming each table that differs

A generated table sits between two markers; the prose around it stays hand-written:

    <!-- table: KIND ARG ... -->
    | ... |
    <!-- /table -->

Sources (paths relative to the repository root):

- ``report RUN``: ``docs/runs/RUN/report.json`` as ``python -m prlhf.runs table`` prints it (the
  recipes' and ``prlhf eval``'s report);
- ``benchmark FILE``: the table a benchmark wrote into its JSON (``"table"``);
- ``json FILE NAME``: table NAME of a ``{"tables": {NAME: {"columns": [...], "rows": [[...]]}}}``
  file: numbers transcribed from the logs or docs of their time for runs whose report was not
  committed (their ``run.json`` says so under ``source``);
- a named view over several sources (``tuning``, ``prompt_baselines``, ``targets_defaults``,
  ``health``, ``demo``, ``demo_seeds``, ``cold_start``, ``serve_load``, ``judge``, ``layout_quality``,
  ``layout_recipes``, ``adapt_speed``, ``readme_real``): see each function below.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prlhf.report import fmt_interval, fmt_number  # noqa: E402
from prlhf.runs import report_table  # noqa: E402

DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"(<!-- table: (?P<spec>[^\n]*?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def load(path: str | Path) -> dict:
    p = ROOT / path
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file (a generated table's source)")
    return json.loads(p.read_text())


def run_report(run: str) -> dict:
    return load(f"docs/runs/{run}/report.json")


def run_info(run: str) -> dict:
    return load(f"docs/runs/{run}/run.json")


def md(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def diff(m: dict, group: str = "seen", key: str = "accuracy_difference") -> str:
    d = (m.get(key) or {}).get(group)
    return "-" if not d else f"{d['mean']:+.3f}{fmt_interval(d.get('ci'))}"


def pair_diff(report: dict, a: str, b: str, group: str = "seen") -> str:
    """a minus b on the same pairs, from ``accuracy_differences`` (either direction)."""
    ma, mb = report["methods"][a], report["methods"][b]
    if (ma.get("accuracy_difference") or {}).get("vs") == b:  # against the report's first model
        return diff(ma, group)
    if b in (ma.get("accuracy_differences") or {}):
        d = ma["accuracy_differences"][b].get(group)
        return "-" if not d else f"{d['mean']:+.3f}{fmt_interval(d.get('ci'))}"
    d = (mb.get("accuracy_differences") or {}).get(a, {}).get(group)
    if not d:
        return "-"
    lo, hi = d["ci"]
    return f"{-d['mean']:+.3f}{fmt_interval([-hi, -lo])}"


def words(m: dict, group: str):
    """Mean generated words of a group, from a report's ``length`` block."""
    length = m.get("length") or {}
    g = (length.get("by_group") or length).get(group)
    if isinstance(g, dict):
        g = g.get("mean_words", g.get("mean"))
    return None if g is None else f"{g:.1f}"


# ---------------------------------------------------------------- the kinds


def t_report(run: str) -> str:
    return report_table(run_report(run))


def t_benchmark(path: str) -> str:
    return load(path)["table"].strip()


def t_json(path: str, name: str) -> str:
    t = load(path)["tables"][name]
    return md(t["columns"], t["rows"])


def t_tuning(baseline: str, *runs: str) -> str:
    """P-DPO of several tuning runs, one row each (label from its run.json), against the vanilla
    DPO of the baseline run (the same data, reference and DPO model)."""
    dpo_minority = run_report(baseline)["methods"]["dpo"]["accuracy_by_group"]["minority"]
    head = ["half-1 run (P-DPO, 60 steps)", "acc seen", "acc generic", "flip", "flip minority",
            f"acc minority (DPO {dpo_minority:.3f})", "seen - DPO (paired)", "run file"]
    rows = []
    for run in (baseline, *runs):
        m = run_report(run)["methods"]["pdpo_individual"]
        rows.append([run_info(run).get("label", run), fmt_number(m["accuracy"]["seen"]), fmt_number(m["accuracy"]["generic"]),
                     fmt_number(m["flip_rate"]), fmt_number(m["flip_rate_by_group"]["minority"]),
                     fmt_number(m["accuracy_by_group"]["minority"]), diff(m), f"`{run}`"])
    return md(head, rows)


def t_prompt_baselines(*runs: str) -> str:
    """The prompt baseline beside vanilla DPO and P-DPO, several runs (label: run.json's ``label``)."""
    head = ["half", "method", "acc seen", "acc generic", "acc unseen", "flip rate (minority)", "acc minority",
            "seen - dpo (paired)", "P-DPO - this (paired, seen)"]
    rows = []
    for run in runs:
        r = run_report(run)
        for name, m in r["methods"].items():
            flip = fmt_number(m.get("flip_rate"))
            minority = (m.get("flip_rate_by_group") or {}).get("minority")
            if minority is not None and name != "dpo":
                flip += f" ({fmt_number(minority)})"
            acc, ci = m["accuracy"], m.get("accuracy_ci", {})
            rows.append([run_info(run).get("label", run), name, fmt_number(acc["seen"]) + fmt_interval(ci.get("seen")),
                         fmt_number(acc["generic"]), fmt_number(acc["unseen"]),
                         flip, fmt_number((m.get("accuracy_by_group") or {}).get("minority")),
                         "-" if name == "dpo" else pair_diff(r, name, "dpo"),
                         "-" if name == "pdpo_individual" else pair_diff(r, "pdpo_individual", name)])
    return md(head, rows)


def t_targets_defaults(tldr_first: str, tldr_now: str, dsp_first: str, dsp_now: str, rm: str) -> str:
    """Issue 21's targets on the report half: the first 0.2 defaults against the current ones."""
    tf, tn = run_report(tldr_first)["methods"], run_report(tldr_now)["methods"]
    df, dn = run_report(dsp_first)["methods"], run_report(dsp_now)["methods"]
    rmr = run_report(rm)["methods"]

    def minority_acc(ms):
        return (f"{ms['pdpo_individual']['accuracy_by_group']['minority']:.3f} vs "
                f"{ms['dpo']['accuracy_by_group']['minority']:.3f}")

    def gap(ms, name="pdpo_individual"):
        a = ms[name]["accuracy"]
        return f"{a['seen'] - a['generic']:+.3f}"

    def met(ok: bool, how: str = "") -> str:
        return ("yes" if ok else "no") + (f" ({how})" if how else "")

    def secs(run):
        return f"{run_info(run)['wall_seconds']:,.0f} s"

    nmin = tn["pdpo_individual"]["flip_rate_by_group"]["minority"]
    dsp_gap = dn["pdpo_individual"]["accuracy"]["seen"] - dn["pdpo_individual"]["accuracy"]["generic"]
    dsp_d = dn["pdpo_individual"]["accuracy_difference"]["seen"]
    p = rmr["prm_individual"]
    rows = [
        ["TL;DR minority flip rate >= 0.30", fmt_number(tf["pdpo_individual"]["flip_rate_by_group"]["minority"]), fmt_number(nmin),
         met(nmin >= 0.30)],
        ["TL;DR minority accuracy above vanilla DPO's", minority_acc(tf), minority_acc(tn),
         met(tn["pdpo_individual"]["accuracy_by_group"]["minority"] > tn["dpo"]["accuracy_by_group"]["minority"])],
        ["DSP seen >= generic + 0.10", gap(df), gap(dn), met(dsp_gap >= 0.10 - 1e-9, "narrowly" if dsp_gap < 0.11 else "")],
        ["DSP seen above vanilla DPO", diff(df["pdpo_individual"]), diff(dn["pdpo_individual"]),
         met(dsp_d["mean"] > 0, "" if dsp_d["ci"][0] > 0 else "not significant")],
        ["DSP flip rate >= 0.25", fmt_number(df["pdpo_individual"]["flip_rate"]), fmt_number(dn["pdpo_individual"]["flip_rate"]),
         met(dn["pdpo_individual"]["flip_rate"] >= 0.25)],
        ["each recipe within 40 minutes", f"TL;DR {secs(tldr_first)}, DSP {secs(dsp_first)}",
         f"TL;DR {secs(tldr_now)}, DSP {secs(dsp_now)}",
         met(max(run_info(tldr_now)["wall_seconds"], run_info(dsp_now)["wall_seconds"]) <= 2400)],
        ["P-RM (DSP): seen >= generic + 0.10, above the vanilla RM, flip >= 0.25",
         f"{gap(rmr, 'prm_individual')}, {diff(p)}, {fmt_number(p['flip_rate'])} ({secs(rm)})", "(unchanged: P-RM keeps 1e-2)",
         met(p["accuracy"]["seen"] - p["accuracy"]["generic"] >= 0.10 and p["accuracy_difference"]["seen"]["mean"] > 0
             and p["flip_rate"] >= 0.25)],
    ]
    return md(["target (report half)", "first defaults (user lr 1e-2)", "defaults now (user lr 3e-2, chosen on half 1)", "met"], rows)


def t_health(run: str, state: str = "pdpo_trainer_state.json") -> str:
    """The health evaluations in a run's training log."""
    log = load(f"docs/runs/{run}/{state}")["log_history"]
    rows = [[e["step"], fmt_number(e["eval_rewards/accuracies"]), fmt_number(e["eval_rewards/accuracies_generic"]),
             fmt_number(e["eval_flip_rate"]), fmt_number(e.get("eval_flip_rate/majority")),
             fmt_number(e.get("eval_flip_rate/minority"))] for e in log if "eval_flip_rate" in e]
    return md(["step", "seen", "generic", "flip rate", "flip majority", "flip minority"], rows)


def _demo_rows(report: dict, names=None, label=None):
    rows = []
    for name, m in report["methods"].items():
        if names and name not in names:
            continue
        acc, ci = m["accuracy"], m.get("accuracy_ci", {})
        cells = [name] + ([label] if label is not None else [])
        cells += [fmt_number(acc["seen"]) + fmt_interval(ci.get("seen")), fmt_number(acc["generic"]), fmt_number(acc["unseen"]),
                  words(m, "majority"), words(m, "minority"), words(m, "unseen"), fmt_number(m.get("flip_rate"))]
        rows.append(cells)
    return rows


DEMO_HEAD = ["acc seen", "acc generic", "acc unseen", "words majority", "words minority", "words unseen", "flip rate"]


def t_demo(run: str, *names: str) -> str:
    """``prlhf demo``'s (and ``prlhf rm demo``'s) comparison: accuracy, generated (or, for reward
    models, best-of-n picked) words per group, flip rate; ``names``: these methods only."""
    return md(["method", *DEMO_HEAD], _demo_rows(run_report(run), names=names or None))


def t_demo_seeds(*runs: str) -> str:
    rows = []
    for run in runs:
        r = run_report(run)
        rows += _demo_rows(r, names=[n for n in r["methods"] if n != "sft"], label=str(r.get("seed", run_info(run).get("seed"))))
    return md(["method", "seed", *DEMO_HEAD], rows)


def t_cold_start(path: str) -> str:
    """New users' held-out accuracy after adaptation on k of their pairs, with intervals where the
    source has them: a ``benchmarks/cold_start_curve.py`` JSON or a demo report (its ``cold_start``)."""
    d = load(path if path.endswith(".json") else f"docs/runs/{path}/report.json")
    cs = d.get("cold_start", d)
    curves, cis = cs["curves"], cs.get("ci") or {}
    ks = sorted({int(k) for by_choice in curves.values() for curve in by_choice.values() for k in curve})
    rows = []
    for model, by_choice in curves.items():
        for choice, curve in by_choice.items():
            ci = (cis.get(model) or {}).get(choice) or {}
            rows.append([model, choice] + [fmt_number(curve.get(str(k))) + fmt_interval(ci.get(str(k))) if str(k) in curve else "-"
                                           for k in ks])
    return md(["user model", "choice", *[f"k={k}" for k in ks]], rows)


def t_adapt_speed(*paths: str) -> str:
    rows = []
    for p in paths:
        d = load(p)
        def sec(x):
            return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"

        rows.append([f"{d['model']}" + (", LoRA" if d.get("lora") else ""), sec(d["seconds_per_user"]["one_at_a_time"]),
                     sec(d["seconds_per_user"]["together"]), sec(d["reference_seconds_per_user"])])
    return md(["model", "one user at a time", "users adapted together (per user)", "of which reference log-probs"], rows)


def t_serve_load(*paths: str) -> str:
    rows = []
    for p in paths:
        d = load(p)
        model = "/".join(Path(d["model"]).parts[-2:]) if "/" in d["model"] else d["model"]  # a model folder: its last two names
        label = f"{model} ({d['users']} users), {d['max_tokens']} tokens"
        for name in ("sequential", "concurrent"):
            s = d[name]
            rps = f"{s['requests_per_second']:.2f}" + (f" ({d['speedup']:.2f}x)" if name == "concurrent" else "")
            rows.append([label, s["clients"], s["requests"], s["errors"], rps, f"{s['tokens_per_second']:.1f}",
                         f"{s['latency_p50']:.3f} s", f"{s['latency_p95']:.3f} s"])
    return md(["model", "clients", "requests", "errors", "requests/s", "generated tokens/s", "p50 latency", "p95 latency"], rows)


def t_judge(path: str) -> str:
    d = load(path)
    return md(["judge", "template", "pairs", "invalid", "wins / ties / losses (P-DPO)", "win rate"],
              [[d["judge"]["model"], f"`{d['template']}`", d["n"], d["invalid"], f"{d['wins']} / {d['ties']} / {d['losses']}",
                f"{d['win_rate']['per_sample']:.3f}{fmt_interval(d['win_rate_ci']['per_sample'])}"]])


def t_readme_real(*runs: str) -> str:
    """The README's real-model table: vanilla DPO and P-DPO of the defaults recipes on their report half."""
    rows = []
    for run in runs:
        info, r = run_info(run), run_report(run)
        dpo, p = r["methods"]["dpo"], r["methods"]["pdpo_individual"]
        minority = (p.get("flip_rate_by_group") or {}).get("minority")
        rows.append([info.get("label", run), f"{info['wall_seconds']:,.0f} s", fmt_number(dpo["accuracy"]["seen"]),
                     fmt_number(p["accuracy"]["seen"]), diff(p),
                     fmt_number(p["flip_rate"]) + ("" if minority is None else f" (minority {fmt_number(minority)})"),
                     f"`docs/runs/{run}`"])
    return md(["recipe (report half, SmolLM2-135M-Instruct Q4_1 GGUF, LoRA)", "runtime", "vanilla DPO", "P-DPO",
               "P-DPO - DPO (paired)", "flip rate", "run file"], rows)


def t_new_user(run: str) -> str:
    """``recipes/smollm2_dsp_new_user.sh``: the new user's held-out accuracy by k (adapted, random and
    active; the prompt baseline given the same pairs) and the share of the gap to the fully trained
    user closed, with paired intervals."""
    from prlhf.experiments.new_user import report_table as new_user_table

    return new_user_table(run_report(run))


def t_tldr_lengths(run: str) -> str:
    """The TL;DR recipe's generations: words per user group and the minority / majority ratio for
    each method (greedy summaries of held-out posts)."""
    report = run_report(run)
    rows = []
    for name, m in report["methods"].items():
        length = m.get("length") or {}
        maj, mino = length.get("majority"), length.get("minority")
        rows.append([name, words(m, "majority"), words(m, "minority"), words(m, "unseen"),
                     f"{mino / maj:.2f}" if maj and mino is not None else None,
                     fmt_number(m.get("user_match")) + fmt_interval(m.get("user_match_ci"))])
    return md(["method", "words majority", "words minority", "words unseen", "minority / majority", "user match (long / short)"], rows)


def length_ratios(b: dict, m: dict) -> tuple:
    """(m's minority / majority words, b's, m's unseen words relative to b's): issue 24's length targets."""
    lb, lm = b.get("length") or {}, m.get("length") or {}
    ratio_m = lm["minority"] / lm["majority"] if lm.get("majority") else None
    ratio_b = lb["minority"] / lb["majority"] if lb.get("majority") else None
    unseen = lm["unseen"] / lb["unseen"] - 1 if lb.get("unseen") else None
    return ratio_m, ratio_b, unseen


def t_tldr_targets(run: str, base: str = "dpo", method: str = "pdpo_individual") -> str:
    """Issue 24's TL;DR targets, each measured on the run's held-out pairs and generations."""
    report = run_report(run)
    ms = report["methods"]
    b, m = ms[base], ms[method]
    lb, lm = b.get("length") or {}, m.get("length") or {}
    ratio_m, ratio_b, unseen = length_ratios(b, m)
    d = m["accuracy_differences"][base]["seen"] if base in (m.get("accuracy_differences") or {}) else m["accuracy_difference"]["seen"]
    rows = [
        [f"{method} minority words <= 0.6x majority", f"{lm['minority']:.1f} / {lm['majority']:.1f} = {ratio_m:.2f}",
         "yes" if ratio_m is not None and ratio_m <= 0.6 else "no"],
        [f"{base} minority / majority words >= 0.85", f"{lb['minority']:.1f} / {lb['majority']:.1f} = {ratio_b:.2f}",
         "yes" if ratio_b is not None and ratio_b >= 0.85 else "no"],
        [f"{method} seen accuracy >= {base} + 0.10, paired interval above 0",
         f"{m['accuracy']['seen']:.3f} vs {b['accuracy']['seen']:.3f}: {d['mean']:+.3f}{fmt_interval(d.get('ci'))}",
         "yes" if d["mean"] >= 0.10 - 1e-9 and d["ci"] and d["ci"][0] > 0 else "no"],
        [f"unseen users' words within 25% of {base}'s", f"{lm['unseen']:.1f} vs {lb['unseen']:.1f} ({unseen:+.0%})",
         "yes" if unseen is not None and abs(unseen) <= 0.25 else "no"],
        ["runtime <= 5,400 s", f"{report['runtime_seconds']:.0f} s", "yes" if report["runtime_seconds"] <= 5400 else "no"]
        if report.get("runtime_seconds") else ["runtime <= 5,400 s", "not a whole-recipe run", "-"],
    ]
    return md(["target", "measured", "met"], rows)


def t_tldr_probes(*specs: str) -> str:
    """P-DPO settings on the TL;DR recipe's pi_SFT, each ``RUN:METHOD[:LABEL]`` (LABEL: the setting, ``_`` for
    spaces) against the run's vanilla DPO on the same pairs and the same prompts: issue 24's length targets."""
    rows = []
    for spec in specs:
        run, method, *label = spec.split(":")
        report = run_report(run)
        b, m = report["methods"]["dpo"], report["methods"][method]
        lb, lm = b.get("length") or {}, m.get("length") or {}
        ratio, _, unseen = length_ratios(b, m)
        rows.append([label[0].replace("_", " ") if label else method, fmt_number(m["accuracy"]["seen"]),
                     pair_diff(report, method, "dpo"), f"{lm['majority']:.1f}", f"{lm['minority']:.1f}",
                     f"{ratio:.2f}", f"{lm['unseen']:.1f} vs {lb['unseen']:.1f} ({unseen:+.0%})", f"`docs/runs/{run}`"])
    return md(["P-DPO setting", "acc seen", "seen - dpo (paired)", "words majority", "words minority",
               "minority / majority (target <= 0.6)", "words unseen vs dpo (target within 25%)", "run file"], rows)


def t_policy_or_rm(run: str) -> str:
    """``recipes/smollm2_dsp_policy_or_rm.sh``: P-DPO, the P-RM layouts and a vanilla RM on the same
    pairs: accuracy per user, training seconds per pair, and the user match of the answers each gives."""
    from prlhf.experiments.policy_or_rm import report_table as policy_or_rm_table

    return policy_or_rm_table(run_report(run))


STEP_LABELS = {
    "trl_dpo_precompute": "trl_dpo_precompute (TRL at its best: `precompute_ref_log_probs`)",
    "pdpo_no_user": "pdpo_no_user (prlhf, `user_model none`: vanilla DPO)",
    "pdpo_alpha_0.5": "pdpo_alpha_0.5 (every default on)",
    "pdpo_no_packing": "pdpo_no_packing (plain layout)",
    "pdpo_full_logits": "pdpo_full_logits (LM head at every position)",
    "pdpo_step_reference": "pdpo_step_reference (reference log-probs at every step)",
    "sft": "sft (LM head at response positions)",
    "sft_full_logits": "sft_full_logits (head everywhere, as most SFT trainers)",
    "pdpo_lora": "pdpo_lora (reference precomputed for every pair)",
    "pdpo_lora_lazy_reference": "pdpo_lora_lazy_reference (reference at each pair's first visit)",
}


def t_step_speed(path: str, base: str = "-") -> str:
    """A ``benchmarks/step_speed.py`` JSON: seconds per comparison, the ratio to ``base`` (time and
    peak memory) and the one-off reference pass."""
    d = load(path)
    spc, rss, ref = d["seconds_per_comparison"], d["peak_rss_mb"], d.get("reference_seconds_per_comparison") or {}
    head = ["system", "s / comparison"] + ([f"vs {base}", "peak RSS (MB)", f"memory vs {base}"] if base != "-" else ["peak RSS (MB)"])
    head.append("reference pass (s / comparison, once)")
    rows = []
    for name, sec in spc.items():
        row = [STEP_LABELS.get(name, name), f"{sec:.3f}"]
        if base != "-":
            row += [f"{sec / spc[base]:.2f}", f"{rss[name]:.0f}", f"{rss[name] / rss[base]:.2f}"]
        else:
            row.append(f"{rss[name]:.0f}")
        row.append("-" if ref.get(name) is None else f"{ref[name]:.3f}")
        rows.append(row)
    return md(head, rows)


def t_speed_summary(*paths: str) -> str:
    """P-DPO (alpha 0.5 and 1) against TRL's DPOTrainer, default and at its best, per benchmark run."""
    rows = []
    for p in paths:
        d = load(p)
        spc = d["seconds_per_comparison"]

        def ratio(a, b):
            return f"{spc[a] / spc[b]:.2f}x" if a in spc and b in spc else "-"

        rows.append([f"`{Path(p).name}`", ratio("pdpo_alpha_0.5", "trl_dpo"), ratio("pdpo_alpha_1", "trl_dpo"),
                     ratio("pdpo_alpha_0.5", "trl_dpo_precompute"), ratio("pdpo_alpha_1", "trl_dpo_precompute"),
                     ratio("pdpo_alpha_0.5_before_response", "trl_dpo_precompute"), ratio("pdpo_no_user", "trl_dpo_precompute"),
                     ratio("official_scheme", "pdpo_alpha_0.5")])
    return md(["run (docs/benchmarks/)", "alpha 0.5 / TRL default", "alpha 1 / TRL default", "alpha 0.5 / TRL at its best",
               "alpha 1 / TRL at its best", "alpha 0.5, before_response / TRL at its best", "no user model / TRL at its best",
               "authors' scheme / alpha 0.5"], rows)


def t_generation(*paths: str) -> str:
    rows = []
    for p in paths:
        d = load(p)
        g = d["generation"]
        rows.append([d["settings"]["model"], f"{g['prompts']} ({g['users']})", f"{g['batched_tokens_per_second']:.1f}",
                     f"{g['sequential_tokens_per_second']:.1f}"])
    return md(["model", "prompts (users)", "batched tokens/s", "one at a time tokens/s"], rows)


def t_layout_quality(path: str) -> str:
    """``benchmarks/layout_quality.py``: the demo under both user-token layouts."""
    d = load(path)
    rows = []
    for layout in ("prefix", "before_response"):
        for name, m in d[layout]["methods"].items():
            a, w = m["accuracy"], m["length"]
            rows.append([name, layout, fmt_number(a["seen"]), fmt_number(a["generic"]), fmt_number(a["unseen"]),
                         f"{w['majority']:.1f}", f"{w['minority']:.1f}", f"{w['unseen']:.1f}"])
    return md(["method", "layout", "acc seen", "acc generic", "acc unseen", "words majority", "words minority", "words unseen"], rows)


KINDS = {name[2:]: fn for name, fn in globals().items() if name.startswith("t_") and callable(fn)}


def render(spec: str) -> str:
    kind, *args = spec.split()
    if kind not in KINDS:
        raise ValueError(f"unknown table kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    return KINDS[kind](*args).strip() + "\n"


def update(path: Path) -> tuple[str, list[str]]:
    """The file's text with every generated table rewritten, and the specs whose table changed."""
    text = path.read_text()
    changed = []

    def sub(m: re.Match) -> str:
        new = render(m.group("spec"))
        if new != m.group("body"):
            changed.append(m.group("spec"))
        return m.group(1) + new + m.group(4)

    return BLOCK.sub(sub, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table differs from its source")
    a = ap.parse_args(argv)
    bad = 0
    for doc in DOCS:
        text, changed = update(doc)
        for spec in changed:
            print(f"{doc.relative_to(ROOT)}: table `{spec}` differs from its source")
        bad += len(changed)
        if changed and not a.check:
            doc.write_text(text)
    n = sum(len(BLOCK.findall(d.read_text())) for d in DOCS)
    print(f"{n} generated tables; {bad} {'differ' if a.check else 'rewritten'}")
    return 1 if (a.check and bad) else 0


if __name__ == "__main__":
    raise SystemExit(main())
