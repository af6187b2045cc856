"""N models -> metrics and a report: the one comparison loop of ``prlhf eval`` (policies, by their
implicit reward) and ``prlhf rm eval`` (reward models, or policies among them).

Each model is scored on the same pairs; the first is the baseline of the paired differences
(``accuracy_difference``), and with three or more models every later one also gets its paired
difference to each earlier one (``accuracy_differences``). What each command adds (generation,
user match) comes in through its ``score`` function and ``method_summary``'s arguments.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .behaviour import build_matcher, load_match_groups, user_match_rate
from .data import cap_pairs_per_user, load_preference_data
from .evaluation import evaluate_accuracy, evaluate_generation, load_user_groups
from .modeling import PersonalizedLM
from .reference import load_reference, reference_identity
from .report import comparison_table, fmt_number, method_summary, write_report
from .reward_model import HEAD_NAME, PersonalizedRewardModel, evaluate_reward_accuracy
from .stats import paired_difference
from .storage import atomic_write_text, check_output_path

logger = logging.getLogger(__name__)

# keys of a method's summary that metrics.json carries too
SUMMARY_KEYS = ("flip_rate", "flip_rate_ci", "flip_rate_by_group", "accuracy_by_group", "user_match", "user_match_ci",
                "user_match_chance", "accuracy_difference", "accuracy_differences")


@dataclass
class Scored:
    """One model's scores: ``metrics`` and ``pairs`` as ``evaluate_accuracy`` returns them, optional
    ``generation`` (``evaluate_generation``), and ``kind`` (what it was scored as)."""
    metrics: dict
    pairs: list[dict]
    generation: dict | None = None
    kind: str | None = None


@dataclass
class Comparison:
    metrics: dict[str, dict] = field(default_factory=dict)  # name -> metrics.json entry
    methods: dict[str, dict] = field(default_factory=dict)  # name -> report summary
    per_user: dict[str, dict] = field(default_factory=dict)  # name -> user -> accuracy
    generations: dict[str, list[dict]] = field(default_factory=dict)


def compare_models(paths: list[str], score: Callable[[str], Scored], groups: dict[str, str] | None = None,
                   per_pair: bool = False, matcher=None, match_groups: dict[str, str] | None = None) -> Comparison:
    """Score each model folder of ``paths`` with ``score(path)`` (one model in memory at a time) and
    summarise it; names are the folders' names (the path where two share one)."""
    out = Comparison()
    earlier: list[tuple[str, list[dict]]] = []  # (name, per-pair results) of every model scored so far
    for path in paths:
        name = Path(path).name if Path(path).name not in out.metrics else path
        s = score(path)
        metrics, pairs = s.metrics, s.pairs
        if s.kind is not None:
            metrics["scored_as"] = s.kind
        if per_pair:
            metrics["pairs"] = pairs
        summary = method_summary(metrics, pairs, s.generation, groups, matcher, match_groups)
        if earlier:  # accuracy gained over the first model on the same pairs, paired bootstrap interval
            summary["accuracy_difference"] = {"vs": earlier[0][0], **{
                group: paired_difference(pairs, earlier[0][1], group) for group in ("seen", "unseen")}}
        if len(earlier) >= 2:  # three or more models: the same paired difference against each earlier one
            summary["accuracy_differences"] = {other: {
                group: paired_difference(pairs, other_pairs, group) for group in ("seen", "unseen")}
                for other, other_pairs in earlier}
        earlier.append((name, pairs))
        if s.generation is not None:
            out.generations[name] = s.generation.pop("generations")
            metrics["generation"] = s.generation
        for key in SUMMARY_KEYS:
            if key in summary:
                metrics[key] = summary[key]
        out.methods[name] = summary
        out.per_user[name] = metrics["accuracy"]["per_user"]
        out.metrics[name] = metrics
        print(f"{name}" + (f" ({s.kind})" if s.kind else "") +
              f": pairs {metrics['n_pairs']} (seen {metrics['n']['seen']}, unseen {metrics['n']['unseen']})")
    return out


def per_user_table(per_user: dict[str, dict]) -> str:
    """A markdown table: one row per user, one column per model."""
    users = sorted({u for v in per_user.values() for u in v})
    lines = ["| user | " + " | ".join(per_user) + " |", "|---|" + "---|" * len(per_user)]
    lines += [f"| {uid} | " + " | ".join(fmt_number(v.get(uid)) for v in per_user.values()) + " |" for uid in users]
    return "\n".join(lines)


def write_comparison(c: Comparison, output: str | None, report: str | None, data: list[str], groups: dict | None,
                     title: str, preamble: str, extra: dict | None = None) -> None:
    """Print the comparison and per-user tables; write ``output`` (metrics.json: one model's metrics,
    or ``{"models": {name: metrics}}``) and the report folder."""
    print("\n" + comparison_table(c.methods))
    print("\n" + per_user_table(c.per_user))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        out = next(iter(c.metrics.values())) if len(c.metrics) == 1 else {"models": c.metrics}
        atomic_write_text(output, json.dumps(out, indent=1))
        print(f"\nwrote {output}")
    if report:
        first = next(iter(c.methods.values()))
        write_report(report, {"methods": c.methods, "metrics": c.metrics, "data": data, "n_pairs": first["n_pairs"],
                              **(extra or {})},
                     c.generations or None, c.per_user, groups, title=title, preamble=preamble)
        print(f"wrote {report}/report.md")


# -- the two commands ---------------------------------------------------------------------------------


def evaluate_policies(a) -> Comparison:
    """``prlhf eval`` (an ``EvalConfig``): each policy's implicit-reward accuracy on the same pairs
    (models with the same reference score it once), optionally generations, their lengths and
    user-match rate; printed, and written to ``a.output`` / ``a.report``."""
    for path, what in ((a.output, "--output"), (a.report, "--report")):
        if path:
            check_output_path(path, what)
    load = a.load_kwargs()
    records = cap_pairs_per_user([r for path in a.data for r in load_preference_data(path)], a.max_pairs_per_user)
    groups = load_user_groups(a.users)
    matcher, match_groups = None, load_match_groups(a.users)
    train_data = a.train_data or (Path(a.users).with_name("train.jsonl") if a.users else None)
    if a.generate and train_data is not None and Path(train_data).is_file():
        matcher = build_matcher(load_preference_data(train_data), match_groups)
    elif a.generate:
        logger.warning("no training data for the user-match rate: pass --train-data (or --users beside a train.jsonl)")
    ref_caches: dict = {}

    def score(path: str) -> Scored:
        model = PersonalizedLM.from_pretrained(path, **load)
        reference = load_reference(model, a.reference, dtype=load["dtype"], attn_implementation=load["attn_implementation"])
        ref_cache = ref_caches.setdefault(reference_identity(model, a.reference), {})
        metrics = evaluate_accuracy(model, records, reference, a.batch_size, a.max_length, a.max_prompt_length, ref_cache)
        gen = None
        if a.generate:
            gen = evaluate_generation(model, records, a.generate, groups, a.batch_size, a.max_new_tokens,
                                      progress=lambda i, n: logger.info("generated %d/%d", i, n),
                                      prompts=a.generate_prompts, **a.generation_kwargs())
        return Scored(metrics, metrics.pop("pairs"), gen)

    result = compare_models(a.model, score, groups, a.per_pair, matcher, match_groups)
    extra = {}
    if matcher is not None:  # the held-out chosen responses themselves: what a perfect model's text would score
        extra["user_match_data"] = user_match_rate(matcher, [{"user_id": r["user_id"], "response": r["chosen"]}
                                                             for r in records], match_groups)
    write_comparison(result, a.output, a.report, a.data, groups, "prlhf eval", f"Data: {', '.join(a.data)}.", extra)
    return result


def evaluate_reward_models(a) -> Comparison:
    """``prlhf rm eval`` (an ``RMEvalConfig``): each reward model's accuracy on the same pairs; a
    policy folder among them is scored by its implicit reward against its reference."""
    for path, what in ((a.output, "--output"), (a.report, "--report")):
        if path:
            check_output_path(path, what)
    load = a.load_kwargs()
    records = [r for path in a.data for r in load_preference_data(path)]
    groups = load_user_groups(a.users)

    def score(path: str) -> Scored:
        if (Path(path) / HEAD_NAME).is_file():
            rm = PersonalizedRewardModel.from_pretrained(path, **load)
            metrics = evaluate_reward_accuracy(rm, records, a.batch_size, a.max_length, a.max_prompt_length)
            return Scored(metrics, metrics.pop("pairs"), kind="reward model")
        policy = PersonalizedLM.from_pretrained(path, **load)
        reference = load_reference(policy, a.reference, dtype=load["dtype"], attn_implementation=load["attn_implementation"])
        metrics = evaluate_accuracy(policy, records, reference, a.batch_size, a.max_length, a.max_prompt_length)
        return Scored(metrics, metrics.pop("pairs"), kind="policy (implicit reward)")

    result = compare_models(a.model, score, groups, a.per_pair)
    write_comparison(result, a.output, a.report, a.data, groups, "prlhf rm eval",
                     f"Data: {', '.join(a.data)}. Reward accuracy: r(chosen) > r(rejected) on held-out pairs "
                     "(policies: their implicit reward), 95% bootstrap CIs.")
    return result
