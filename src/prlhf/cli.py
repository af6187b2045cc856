"""The ``prlhf`` command: a thin shell over the Python API.

    prlhf demo [--output DIR]                               the paper's finding, offline, in minutes
    prlhf train --config recipe.yaml [--field value ...]   P-DPO (flags override YAML keys)
    prlhf sft   --config recipe.yaml [--field value ...]   SFT: prompt -> chosen, builds pi_SFT
    prlhf eval  --model DIR --data FILE --output metrics.json
    prlhf generate --model DIR --user ID --prompt TEXT
    prlhf generate --model DIR --input prompts.jsonl --output out.jsonl [--best-of N --reward-model RM_DIR]
    prlhf data convert {tldr,psoups,prism,dsp} --input PATH --output DIR [options]
    prlhf data synth --output DIR [options]
    prlhf data inspect FILE [--json]
    prlhf adapt --model DIR --data NEW_USERS.jsonl --output DIR2 [--steps N] [--reset]
    prlhf adapt --model DIR --suggest N --candidates PAIRS.jsonl [--output FILE]
    prlhf users list|export|remove --model DIR [--user ID]
    prlhf rm train --config recipe.yaml [--field value ...]   a personalized reward model (P-RM)
    prlhf rm eval  --model DIR [--model DIR2 ...] --data FILE --output metrics.json
    prlhf rm score --model DIR --input rows.jsonl --output scored.jsonl
    prlhf rm demo [--output DIR]                            P-RM vs vanilla RM and best-of-n on the demo task
    prlhf serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]   OpenAI-compatible server
    prlhf judge --generations FILE --a METHOD --b METHOD --base-url URL --model NAME --output judge.json

Exit codes: 0 done, 2 bad input or a refused setting, 3 a non-finite (NaN or inf) loss, gradient,
weight or log-prob, 1 anything unexpected. --debug shows the Python traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import yaml

logger = logging.getLogger("prlhf")


class ConfigError(ValueError):
    pass


def _to_flags(key: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *map(str, value)]
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    return [f"--{key}", str(value)]


def read_yaml_config(path: Path) -> dict:
    """A YAML config file as a mapping, with errors naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return data


def parse_config(cls, argv: list[str], ignore: set[str] = frozenset()):
    """A config dataclass from ``--config file.yaml`` plus ``--field value`` flags (flags win).
    YAML keys in ``ignore`` are skipped (one recipe serves ``sft`` and ``train``); other unknown
    keys are errors."""
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    flags: list[str] = []
    if known.config:
        path = Path(known.config)
        data = read_yaml_config(path)
        names = {f.name for f in dataclasses.fields(cls)}
        skipped = sorted(k for k in data if k not in names and k in ignore)
        if skipped:
            logger.info("%s: %s ignores the keys %s", path, cls.__name__, ", ".join(skipped))
        for key, value in data.items():
            if key in skipped:
                continue
            if key not in names:
                raise ConfigError(f"{path}: unknown config key '{key}' for {cls.__name__}")
            flags += _to_flags(key, value)
    parser = HfArgumentParser(cls)
    try:
        (cfg,) = parser.parse_args_into_dataclasses(args=flags + rest)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


def _resume_arg(cfg):
    r = cfg.resume_from_checkpoint
    if r is None or str(r).lower() in ("", "false", "no"):
        return None
    return True if str(r).lower() in ("true", "last", "yes") else r


def _train_and_save(trainer, what: str):
    """Train (resuming when the config says so), save the final model, say where."""
    trainer.train(resume_from_checkpoint=_resume_arg(trainer.args))
    trainer.save_model()
    trainer.save_state()
    if trainer.args.should_save:
        print(f"saved the {what} to {trainer.args.output_dir}")
    return trainer


def cmd_train(argv: list[str]) -> int:
    from .config import PDPOConfig
    from .trainers.pdpo import PDPOTrainer

    cfg = parse_config(PDPOConfig, argv)
    trainer = _train_and_save(PDPOTrainer(args=cfg), "personalized model")
    if cfg.push_to_hub and trainer.args.should_save:
        repo = cfg.hub_model_id or Path(cfg.output_dir).name
        url = trainer.accelerator.unwrap_model(trainer.model).push_to_hub(repo, private=cfg.hub_private_repo,
                                                                          token=cfg.hub_token)
        print(f"pushed to the Hugging Face Hub: {url}")
    return 0


def cmd_sft(argv: list[str]) -> int:
    from .config import PDPOConfig, PSFTConfig
    from .trainers.sft import PSFTTrainer

    pdpo_only = {f.name for f in dataclasses.fields(PDPOConfig)} - {f.name for f in dataclasses.fields(PSFTConfig)}
    cfg = parse_config(PSFTConfig, argv, ignore=pdpo_only)
    trainer = PSFTTrainer(args=cfg)
    trainer.train(resume_from_checkpoint=_resume_arg(cfg))
    out = trainer.save_final()
    if trainer.args.should_save:
        print(f"saved the SFT model to {out}")
    return 0


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _merge_repeated(argv: list[str], flag: str) -> list[str]:
    """``--model A --model B`` (argparse 'append' style) as ``--model A B``."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        else:
            rest.append(argv[i])
            i += 1
    return ([flag, *values] if values else []) + rest


def cmd_eval(argv: list[str]) -> int:
    from .config import EvalConfig
    from .data import load_preference_data
    from .evaluation import evaluate_accuracy, evaluate_generation, load_user_groups, paired_difference
    from .modeling import PersonalizedLM
    from .reference import load_reference, reference_identity
    from .report import comparison_table, method_summary, write_report
    from .user_match import build_matcher, load_match_groups, user_match_rate

    a = parse_config(EvalConfig, _merge_repeated(argv, "--model"))
    gen_kwargs = a.generation_kwargs()
    load = a.load_kwargs()
    from .storage import check_output_path

    for path, what in ((a.output, "--output"), (a.report, "--report")):
        if path:
            check_output_path(path, what)
    records = [r for path in a.data for r in load_preference_data(path)]
    if a.max_pairs_per_user is not None:
        from collections import Counter

        seen_per_user: Counter = Counter()
        kept = []
        for r in records:
            seen_per_user[r["user_id"]] += 1
            if seen_per_user[r["user_id"]] <= a.max_pairs_per_user:
                kept.append(r)
        records = kept
    groups = load_user_groups(a.users)
    matcher, match_groups = None, load_match_groups(a.users)
    train_data = a.train_data or (Path(a.users).with_name("train.jsonl") if a.users else None)
    if a.generate and train_data is not None and Path(train_data).is_file():
        matcher = build_matcher(load_preference_data(train_data), match_groups)
    elif a.generate:
        logger.warning("no training data for the user-match rate: pass --train-data (or --users beside a train.jsonl)")
    all_metrics, methods, generations, per_user, ref_caches = {}, {}, {}, {}, {}
    earlier: list[tuple[str, list[dict]]] = []  # (name, per-pair results) of every model scored so far; the first is the baseline
    for path in a.model:
        name = Path(path).name if Path(path).name not in all_metrics else path
        model = PersonalizedLM.from_pretrained(path, **load)
        reference = load_reference(model, a.reference, dtype=load["dtype"], attn_implementation=load["attn_implementation"])
        # models with the same reference score it once (vanilla DPO and P-DPO from the same pi_SFT)
        ref_cache = ref_caches.setdefault(reference_identity(model, a.reference), {})
        metrics = evaluate_accuracy(model, records, reference, a.batch_size, a.max_length, a.max_prompt_length, ref_cache)
        pairs = metrics.pop("pairs")
        if a.per_pair:
            metrics["pairs"] = pairs
        gen = None
        if a.generate:
            gen = evaluate_generation(model, records, a.generate, groups, a.batch_size, a.max_new_tokens,
                                      progress=lambda i, n: logger.info("generated %d/%d", i, n),
                                      **gen_kwargs)
        methods[name] = method_summary(metrics, pairs, gen, groups, matcher, match_groups)
        if earlier:  # accuracy gained over the first --model on the same pairs, paired bootstrap interval
            methods[name]["accuracy_difference"] = {"vs": earlier[0][0], **{
                group: paired_difference(pairs, earlier[0][1], group) for group in ("seen", "unseen")}}
        if len(earlier) >= 2:  # three or more models: the same paired difference against each earlier one
            methods[name]["accuracy_differences"] = {other: {
                group: paired_difference(pairs, other_pairs, group) for group in ("seen", "unseen")}
                for other, other_pairs in earlier}
        earlier.append((name, pairs))
        if gen is not None:
            generations[name] = gen.pop("generations")
            metrics["generation"] = gen
        for key in ("flip_rate", "flip_rate_ci", "flip_rate_by_group", "accuracy_by_group", "user_match", "user_match_ci", "user_match_chance"):
            if key in methods[name]:
                metrics[key] = methods[name][key]
        per_user[name] = metrics["accuracy"]["per_user"]
        all_metrics[name] = metrics
        print(f"{name}: pairs {metrics['n_pairs']} (seen {metrics['n']['seen']}, unseen {metrics['n']['unseen']})")
        del model, reference
    print("\n" + comparison_table(methods))
    if len(a.model) == 1:
        print("\n| user | accuracy |\n|---|---|")
        for uid, v in sorted(next(iter(per_user.values())).items()):
            print(f"| {uid} | {_fmt(v)} |")
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        out = next(iter(all_metrics.values())) if len(a.model) == 1 else {"models": all_metrics}
        Path(a.output).write_text(json.dumps(out, indent=1))
        print(f"\nwrote {a.output}")
    if a.report:
        first = next(iter(methods.values()))
        extra = {}
        if matcher is not None:  # the held-out chosen responses themselves: what a perfect model's text would score
            extra["user_match_data"] = user_match_rate(matcher, [{"user_id": r["user_id"], "response": r["chosen"]}
                                                                 for r in records], match_groups)
        write_report(a.report, {"methods": methods, "metrics": all_metrics, "data": a.data, "n_pairs": first["n_pairs"],
                                **extra},
                     generations or None, per_user, groups,
                     title="prlhf eval", preamble=f"Data: {', '.join(a.data)}.")
        print(f"wrote {a.report}/report.md")
    return 0


def cmd_generate(argv: list[str]) -> int:
    import torch

    from .config import GenerateConfig
    from .modeling import PersonalizedLM

    a = parse_config(GenerateConfig, argv)
    if a.output:
        from .storage import check_output_path

        check_output_path(a.output, "--output")
    torch.manual_seed(a.seed)
    model = PersonalizedLM.from_pretrained_or_plain(a.model, **a.load_kwargs())
    if a.best_of > 1:
        return _generate_best_of(a, model)
    kw = dict(max_new_tokens=a.max_new_tokens, do_sample=a.do_sample, **a.generation_kwargs())
    if a.do_sample:
        kw.update(temperature=a.temperature, top_p=a.top_p)
    if a.prompt is not None:
        print(model.generate([a.prompt], [a.user], [a.user_text], **kw)[0])
        return 0
    records = _prompt_records(a.input)
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    out_f = open(a.output, "w", encoding="utf-8") if a.output else sys.stdout
    n_tokens, start = 0, time.perf_counter()
    try:
        for s in range(0, len(records), a.batch_size):
            chunk = records[s:s + a.batch_size]
            # one generate() call per batch, each row with its own user embedding, KV cache on
            batch = model.prepare_prompts([r["prompt"] for r in chunk], [r.get("user_id") for r in chunk],
                                          [r.get("user_text") for r in chunk])
            ids = model.generate_ids(batch, **kw)
            n_tokens += count_new_tokens(ids, model.tokenizer.eos_token_id, model.tokenizer.pad_token_id)
            texts = model.tokenizer.batch_decode(ids, skip_special_tokens=True)
            for r, t in zip(chunk, texts):
                out_f.write(json.dumps({**r, "response": t}, ensure_ascii=False) + "\n")
            logger.info("generated %d/%d", min(s + a.batch_size, len(records)), len(records))
    finally:
        if a.output:
            out_f.close()
    seconds = time.perf_counter() - start
    summary = (f"generated {n_tokens} tokens for {len(records)} prompts in {seconds:.1f} s: "
               f"{n_tokens / max(seconds, 1e-9):.1f} tokens/s (batch size {a.batch_size})")
    if a.output:
        print(f"wrote {len(records)} responses to {a.output}; {summary}")
    else:
        logger.warning(summary)
    return 0


def _prompt_records(path: str) -> list[dict]:
    from .data import read_records

    records = read_records(path)
    for i, rec in enumerate(records):
        if not isinstance(rec.get("prompt"), (str, list)):
            raise ConfigError(f"{path}: record {i} (line {rec.get('_line')}): field 'prompt' is missing")
        rec.pop("_line", None)
    return records


def _generate_best_of(a, policy) -> int:
    """``prlhf generate --best-of N --reward-model DIR``: N samples per prompt, the P-RM's pick for the user."""
    from .best_of_n import best_of_n
    from .reward_model import PersonalizedRewardModel

    rm = PersonalizedRewardModel.from_pretrained(a.reward_model, **a.load_kwargs())
    kw = dict(n=a.best_of, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
              top_p=a.top_p, **a.generation_kwargs())
    if a.prompt is not None:
        best = best_of_n(policy, rm, [a.prompt], [a.user], [a.user_text], **kw)[0]
        print(best["response"])
        logger.info("best of %d: reward %.3f (candidates %s)", a.best_of, best["reward"],
                    ", ".join(f"{c['reward']:.2f}" for c in best["candidates"]))
        return 0
    records = _prompt_records(a.input)
    start = time.perf_counter()
    picked = best_of_n(policy, rm, [r["prompt"] for r in records], [r.get("user_id") for r in records],
                       [r.get("user_text") for r in records],
                       progress=lambda i, n: logger.info("best of %d: %d/%d prompts", a.best_of, i, n), **kw)
    lines = "".join(json.dumps({**r, **p}, ensure_ascii=False) + "\n" for r, p in zip(records, picked))
    if a.output:
        from .storage import atomic_write_text

        atomic_write_text(a.output, lines)
        print(f"wrote {len(records)} best-of-{a.best_of} responses to {a.output} in {time.perf_counter() - start:.1f} s")
    else:
        sys.stdout.write(lines)
    return 0


def count_new_tokens(ids, eos_id: int | None, pad_id: int | None) -> int:
    """Generated tokens of each row up to and including its first EOS (the rest is padding)."""
    total = 0
    for row in ids.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t == eos_id:
                n = i + 1
                break
            if t == pad_id:
                n = i
                break
        total += n
    return total


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def _data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prlhf data", description="Convert, synthesize and inspect preference data.")
    sub = p.add_subparsers(dest="action", required=True)
    conv = sub.add_parser("convert", help="convert a data set of the paper into train/test/unseen files")
    src = conv.add_subparsers(dest="source", required=True)

    def common(sp, unseen=True):
        sp.add_argument("--input", required=True, help="local file or folder (or a hub data set name when reachable)")
        sp.add_argument("--output", required=True, help="folder for train.jsonl, test.jsonl, unseen.jsonl, users.json")
        sp.add_argument("--test-fraction", type=float, default=0.1, help="share of prompts held out for test.jsonl")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--overwrite", action="store_true", help="replace the conversion in a non-empty --output folder")
        if unseen:
            sp.add_argument("--unseen-users", default="", help="comma-separated users kept out of training")

    t = src.add_parser("tldr", help="OpenAI summarize_from_feedback comparisons (Reddit TL;DR)")
    common(t, unseen=False)
    t.add_argument("--label", choices=["human", "length"], default="human",
                   help="human: the worker's choice; length: the paper's conflicting length preferences")
    t.add_argument("--long-share", type=float, default=0.7, help="share of workers preferring longer summaries (--label length)")
    t.add_argument("--length-unit", choices=["words", "chars"], default="words")
    t.add_argument("--top-k", type=int, default=10, help="the k most frequent workers are seen users (0: all)")
    t.add_argument("--sft-only", action="store_true", help="keep comparisons of two supervised (sup, not ppo) policies")
    t.add_argument("--max-prompt-chars", type=int, default=None, help="truncate posts to this many characters")
    t.add_argument("--pool-users", type=int, default=None, metavar="N",
                   help="merge the seen workers into N pooled users of their preference (--label length): "
                        "more pairs per user")
    t.add_argument("--worker-half", type=int, choices=[1, 2], default=None,
                   help="keep one of two disjoint halves of the workers (ranked by comparisons, alternately "
                        "assigned): choose settings on one half, report on the other")
    t.add_argument("--hub-split", default="validation", help="split of the hub data set")
    ps = src.add_parser("psoups", help="P-SOUPS: RLPHF P1A.json ... P3B.json, or uid/prompt/chosen/rejected rows")
    common(ps)
    ps.add_argument("--keep-preference-prompt", action="store_true", help="keep the 'Generate a response that ...' sentence")
    ps.add_argument("--profiles", default=None, help="folder with pref1A.txt ... pref3B.txt (profile descriptions)")
    ps.add_argument("--user-text", choices=["none", "profile"], default="none")
    ps.add_argument("--format", choices=["chat", "text"], default="chat")
    pr = src.add_parser("prism", help="PRISM: a folder with survey.jsonl and conversations.jsonl")
    common(pr, unseen=False)
    pr.add_argument("--unseen-fraction", type=float, default=0.1, help="share of participants kept out of training")
    pr.add_argument("--user-fields", default="stated_prefs,self_description,demographics",
                    help="survey fields in user_text: stated_prefs, self_description, demographics, system_string")
    pr.add_argument("--skip-ties", action="store_true", help="skip pairs whose responses got the same score")
    pr.add_argument("--max-users", type=int, default=None, help="only the first N participants of survey.jsonl")
    d = src.add_parser("dsp", help="Domain-Specific Preference JSON (query, responses per domain)")
    common(d)
    d.add_argument("--rejected-per-query", type=int, default=1, help="rejected responses per query and user")
    d.add_argument("--rejected-pool", choices=["all", "domains", "normal"], default="all",
                   help="where rejected responses come from: other domains, 'normal', or both")
    d.add_argument("--format", choices=["chat", "text"], default="chat")
    d.add_argument("--query-half", type=int, choices=[1, 2], default=None,
                   help="keep one of two disjoint halves of the queries (odd / even records): choose settings on "
                        "one half, report on the other")

    sy = sub.add_parser("synth", help="synthetic users with conflicting preferences (no download)")
    sy.add_argument("--output", required=True)
    sy.add_argument("--n-users", type=int, default=20, help="seen users")
    sy.add_argument("--unseen-users", type=int, default=4)
    sy.add_argument("--majority-share", type=float, default=0.7)
    sy.add_argument("--n-prompts", type=int, default=150)
    sy.add_argument("--pairs-per-user", type=int, default=40)
    sy.add_argument("--attributes", default="length", help="comma-separated: length, tone")
    sy.add_argument("--test-fraction", type=float, default=0.2)
    sy.add_argument("--format", choices=["chat", "text"], default="text")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--user-texts", action="store_true",
                    help="give every user a profile text consistent with their preference (the explicit user model)")
    sy.add_argument("--unseen-pairs-per-user", type=int, default=None, help="pairs of each unseen user (default: --pairs-per-user)")
    sy.add_argument("--overwrite", action="store_true", help="replace the data in a non-empty --output folder")

    ins = sub.add_parser("inspect", help="users, pairs per user, agreement, accuracy ceilings")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _yaml_to_argparse_flags(argv: list[str]) -> list[str]:
    """``--config FILE.yaml`` for argparse commands: each YAML key becomes its flag (``max_prompt_chars``
    -> ``--max-prompt-chars``), placed before the command line's own flags, which win."""
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise ConfigError("--config needs a YAML file")
    rest = argv[:i] + argv[i + 2:]
    data = read_yaml_config(Path(argv[i + 1]))
    flags = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags += [flag, ",".join(map(str, value))]
        else:
            flags += [flag, str(value)]
    n_positional = next((k for k, a in enumerate(rest) if a.startswith("-")), len(rest))
    return rest[:n_positional] + flags + rest[n_positional:]


def cmd_data(argv: list[str]) -> int:
    from .sources import CONVERTERS, synthesize, write_conversion

    a = _data_parser().parse_args(_yaml_to_argparse_flags(argv))
    if a.action == "inspect":
        from .data import load_preference_data
        from .inspection import format_report, inspect_pairs

        stats = inspect_pairs(load_preference_data(a.file))
        if a.json:
            print(json.dumps(stats, indent=1))
        else:
            print(format_report(stats))
        return 0
    if a.action == "synth":
        conv = synthesize(a.n_users, a.unseen_users, a.majority_share, a.n_prompts, a.pairs_per_user,
                          tuple(_csv(a.attributes)), a.test_fraction, a.seed, a.format, user_texts=a.user_texts,
                          unseen_pairs_per_user=a.unseen_pairs_per_user)
    else:
        kw = {k: v for k, v in vars(a).items() if k not in ("action", "source", "output", "overwrite")}
        kw = {k.replace("-", "_"): v for k, v in kw.items()}
        if "unseen_users" in kw:
            kw["unseen_users"] = tuple(_csv(kw["unseen_users"]))
        if "user_fields" in kw:
            kw["user_fields"] = tuple(_csv(kw["user_fields"]))
        if "profiles" in kw:
            kw["profiles_dir"] = kw.pop("profiles")
        if a.source == "tldr" and kw.get("top_k") == 0:
            kw["top_k"] = None
        conv = CONVERTERS[a.source](**kw)
    out = write_conversion(conv, a.output, overwrite=a.overwrite)
    print(conv.summary_table())
    print(f"\nwrote {out}/train.jsonl, test.jsonl" + (", unseen.jsonl" if (out / "unseen.jsonl").exists() else "")
          + ", users.json")
    return 0


def cmd_adapt(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="prlhf adapt", description="Few-shot adaptation: add the users of a few labelled pairs to a trained "
        "model and fit only their own parameters (everything else frozen); or, with --suggest, pick the candidate "
        "comparisons to ask a new user about.")
    p.add_argument("--model", required=True, help="a trained model folder (individual or cluster user model)")
    p.add_argument("--data", help="labelled pairs of the users to adapt (JSONL or JSON, the usual preference format)")
    p.add_argument("--output", help="adaptation: the model folder to write (may be --model itself); "
                   "--suggest: the JSONL file to write (default: standard output)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    p.add_argument("--reset", action="store_true", help="users the model already knows restart as the generic "
                   "user instead of continuing from their current parameters")
    p.add_argument("--learning-rate", "--learning_rate", type=float, default=None,
                   help="Adam learning rate of the users' parameters (default: the training's user learning rate, else "
                   "1e-2; at least 0.1 for a cluster model's mixture logits)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=16)
    p.add_argument("--beta", type=float, default=None, help="default: the training's beta (training_args.json), else 0.1")
    p.add_argument("--sft-weight", "--sft_weight", type=float, default=None, help="default: the training's")
    p.add_argument("--max-length", "--max_length", type=int, default=None, help="default: the training's, else 1024")
    p.add_argument("--max-prompt-length", "--max_prompt_length", type=int, default=None)
    p.add_argument("--reference", default=None, help="pi_SFT (default: the one the model records)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suggest", type=int, default=None, metavar="N", help="pick N comparisons to ask a new user about")
    p.add_argument("--candidates", help="with --suggest: unlabelled candidate pairs (prompt, chosen, rejected; the "
                   "order of the two responses carries no label)")
    p.add_argument("--strategy", choices=("active", "random"), default="active",
                   help="with --suggest: committee disagreement (active) or uniform choice (random)")
    p.add_argument("--user", default=None, help="with --suggest: the user id written into the suggested records")
    a = p.parse_args(argv)
    import torch

    from .adapt import adapt_users, suggest_pairs, training_objective
    from .data import load_preference_data
    from .modeling import PersonalizedLM
    from .persistence import resolve_saved_model
    from .reference import load_reference
    from .storage import check_output_path

    torch.manual_seed(a.seed)
    if a.suggest is not None:
        if not a.candidates:
            raise ConfigError("--suggest needs --candidates PAIRS.jsonl")
        if a.output:
            check_output_path(a.output, "--output")
        candidates = load_preference_data(a.candidates)
        model = PersonalizedLM.from_pretrained(a.model)
        objective = training_objective(resolve_saved_model(a.model))
        picked = suggest_pairs(model, candidates, a.suggest, load_reference(model, a.reference), a.strategy, a.seed,
                               beta=a.beta or objective.get("beta", 0.1), batch_size=a.batch_size,
                               max_length=a.max_length or objective.get("max_length", 1024),
                               max_prompt_length=a.max_prompt_length or objective.get("max_prompt_length", 512))
        lines = []
        for rank, i in enumerate(picked):
            rec = {k: v for k, v in candidates[i].items() if k not in ("index", "_line")}
            if a.user is not None:
                rec["user_id"] = a.user
            rec.update(suggest_rank=rank + 1, candidate_index=i)
            lines.append(json.dumps(rec, ensure_ascii=False))
        text = "\n".join(lines) + ("\n" if lines else "")
        if a.output:
            from .storage import atomic_write_text

            atomic_write_text(a.output, text)
            print(f"wrote {len(picked)} of {len(candidates)} candidates ({a.strategy}) to {a.output}: label each "
                  "(swap chosen and rejected where the user prefers the other) and pass the file to --data")
        else:
            sys.stdout.write(text)
        return 0
    if not a.data or not a.output:
        raise ConfigError("adaptation needs --data NEW_USERS.jsonl and --output DIR2 (or --suggest N --candidates FILE)")
    check_output_path(a.output, "--output")
    records = load_preference_data(a.data)
    source = resolve_saved_model(a.model)
    model = PersonalizedLM.from_pretrained(source)
    objective = training_objective(source)
    reference = load_reference(model, a.reference)
    result = adapt_users(model, records, reference, steps=a.steps, learning_rate=a.learning_rate,
                         batch_size=a.batch_size, reset=a.reset, beta=a.beta, sft_weight=a.sft_weight,
                         max_length=a.max_length, max_prompt_length=a.max_prompt_length, seed=a.seed,
                         objective=objective, name=a.data)
    extra = {"adaptation.json": json.dumps({**result.to_dict(), "data": a.data, "from": str(a.model)}, indent=1)}
    if (Path(source) / "training_args.json").is_file():
        extra["training_args.json"] = (Path(source) / "training_args.json").read_text(encoding="utf-8")
    model.save_pretrained(a.output, extra_files=extra)
    print("| user | new | pairs (total) |\n|---|---|---|")
    for uid in result.adapted_users:
        print(f"| {uid} | {'yes' if uid in result.new_users else 'no'} | {model.registry.pair_counts.get(uid)} |")
    acc = "-" if result.train_accuracy is None else f"{result.train_accuracy:.3f}"
    print(f"\nadapted {len(result.adapted_users)} users ({len(result.new_users)} new) on {result.n_pairs} pairs, "
          f"{result.steps} steps in {result.seconds:.1f} s (reference pass {result.reference_seconds:.1f} s); "
          f"training accuracy {acc}; wrote {a.output}")
    return 0


def cmd_users(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="prlhf users", description="What a trained model holds about its users: list "
                                "them, export one user's data as JSON, or remove (forget) one user.")
    p.add_argument("action", choices=("list", "export", "remove"))
    p.add_argument("--model", required=True)
    p.add_argument("--user", default=None, help="the user id (export, remove)")
    p.add_argument("--json", action="store_true", help="list: print JSON instead of a table")
    a = p.parse_args(argv)
    from .adapt import export_user, list_users, remove_user

    if a.action == "list":
        rows = list_users(a.model)
        if a.json:
            print(json.dumps(rows, indent=1, ensure_ascii=False))
        else:
            print("| user | row | pairs | text |\n|---|---|---|---|")
            for r in rows:
                print(f"| {r['user_id']} | {r['row']} | {'-' if r['n_pairs'] is None else r['n_pairs']} | "
                      f"{'yes' if r['has_text'] else 'no'} |")
            print(f"\n{len(rows)} users (row 0 is the generic user, who serves every other id)")
        return 0
    if a.user is None:
        raise ConfigError(f"prlhf users {a.action} needs --user ID")
    try:
        if a.action == "export":
            print(json.dumps(export_user(a.model, a.user), indent=1, ensure_ascii=False))
        else:
            removed = remove_user(a.model, a.user)
            print(f"removed user {a.user!r} (row {removed['row']}, {removed['n_pairs']} pairs) from {a.model}; "
                  "the id is now served as the generic user")
    except KeyError as err:
        raise ConfigError(err.args[0]) from None
    return 0


def cmd_rm(argv: list[str]) -> int:
    """``prlhf rm train|eval|score``: the personalized reward model."""
    from .reward_demo import main_reward_demo

    actions = {"train": _rm_train, "eval": _rm_eval, "score": _rm_score, "demo": main_reward_demo}
    if not argv or argv[0] not in actions:
        raise ConfigError("usage: prlhf rm train --config FILE | rm eval --model DIR --data FILE --output metrics.json | "
                          "rm score --model DIR --input FILE --output FILE | rm demo [--output DIR]")
    return actions[argv[0]](argv[1:])


def _rm_train(argv: list[str]) -> int:
    from .config import PRMConfig
    from .trainers.prm import PRMTrainer

    _train_and_save(PRMTrainer(args=parse_config(PRMConfig, argv)), "personalized reward model")
    return 0


def _is_reward_folder(path: str) -> bool:
    from .reward_model import HEAD_NAME

    return (Path(path) / HEAD_NAME).is_file()


def _rm_eval(argv: list[str]) -> int:
    from .config import RMEvalConfig
    from .data import load_preference_data
    from .evaluation import evaluate_accuracy, load_user_groups, paired_difference
    from .modeling import PersonalizedLM
    from .reference import load_reference
    from .report import comparison_table, method_summary, write_report
    from .reward_model import PersonalizedRewardModel, evaluate_reward_accuracy
    from .storage import atomic_write_text, check_output_path

    a = parse_config(RMEvalConfig, _merge_repeated(argv, "--model"))
    for path, what in ((a.output, "--output"), (a.report, "--report")):
        if path:
            check_output_path(path, what)
    records = [r for path in a.data for r in load_preference_data(path)]
    groups = load_user_groups(a.users)
    load = a.load_kwargs()
    all_metrics, methods, per_user, baseline = {}, {}, {}, None
    for path in a.model:
        name = Path(path).name if Path(path).name not in all_metrics else path
        if _is_reward_folder(path):
            rm = PersonalizedRewardModel.from_pretrained(path, **load)
            metrics = evaluate_reward_accuracy(rm, records, a.batch_size, a.max_length, a.max_prompt_length)
            kind = "reward model"
        else:  # a policy: its implicit reward against its reference
            rm = PersonalizedLM.from_pretrained(path, **load)
            reference = load_reference(rm, a.reference, dtype=load["dtype"], attn_implementation=load["attn_implementation"])
            metrics = evaluate_accuracy(rm, records, reference, a.batch_size, a.max_length, a.max_prompt_length)
            kind = "policy (implicit reward)"
        pairs = metrics.pop("pairs")
        metrics["scored_as"] = kind
        if a.per_pair:
            metrics["pairs"] = pairs
        methods[name] = method_summary(metrics, pairs, None, groups)
        if baseline is None:
            baseline = (name, pairs)
        else:
            methods[name]["accuracy_difference"] = {"vs": baseline[0], **{
                group: paired_difference(pairs, baseline[1], group) for group in ("seen", "unseen")}}
        for key in ("flip_rate", "flip_rate_ci", "flip_rate_by_group", "accuracy_by_group", "accuracy_difference"):
            if key in methods[name]:
                metrics[key] = methods[name][key]
        per_user[name] = metrics["accuracy"]["per_user"]
        all_metrics[name] = metrics
        print(f"{name} ({kind}): pairs {metrics['n_pairs']} (seen {metrics['n']['seen']}, unseen {metrics['n']['unseen']})")
        del rm
    print("\n" + comparison_table(methods))
    users = sorted({u for v in per_user.values() for u in v})
    print("\n| user | " + " | ".join(per_user) + " |\n|---|" + "---|" * len(per_user))
    for uid in users:
        print(f"| {uid} | " + " | ".join(_fmt(v.get(uid)) for v in per_user.values()) + " |")
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        out = next(iter(all_metrics.values())) if len(a.model) == 1 else {"models": all_metrics}
        atomic_write_text(a.output, json.dumps(out, indent=1))
        print(f"\nwrote {a.output}")
    if a.report:
        first = next(iter(methods.values()))
        write_report(a.report, {"methods": methods, "metrics": all_metrics, "data": a.data, "n_pairs": first["n_pairs"]},
                     None, per_user, groups, title="prlhf rm eval",
                     preamble=f"Data: {', '.join(a.data)}. Reward accuracy: r(chosen) > r(rejected) on held-out pairs "
                              "(policies: their implicit reward), 95% bootstrap CIs.")
        print(f"wrote {a.report}/report.md")
    return 0


def _rm_score(argv: list[str]) -> int:
    from .config import RMScoreConfig
    from .data import read_records
    from .reward_model import PersonalizedRewardModel
    from .storage import atomic_write_text, check_output_path

    a = parse_config(RMScoreConfig, argv)
    check_output_path(a.output, "--output")
    rows = read_records(a.input)
    for i, row in enumerate(rows):
        where = f"{a.input}: record {i}" + (f" (line {row['_line']})" if "_line" in row else "")
        if not isinstance(row.get("prompt"), (str, list)):
            raise ConfigError(f"{where}: field 'prompt' is missing or not text / chat messages")
        if not isinstance(row.get("response"), str):
            raise ConfigError(f"{where}: field 'response' is missing or not text")
        for key in ("user_id", "user_text"):
            if row.get(key) is not None and not isinstance(row[key], (str, int)):
                raise ConfigError(f"{where}: field {key!r} must be text, got {type(row[key]).__name__}")
        row.pop("_line", None)
    rm = PersonalizedRewardModel.from_pretrained(a.model, **a.load_kwargs())
    start = time.perf_counter()
    rewards = rm.score([r["prompt"] for r in rows], [r["response"] for r in rows],
                       [None if r.get("user_id") is None else str(r["user_id"]) for r in rows],
                       [r.get("user_text") for r in rows], a.batch_size, a.max_length, a.max_prompt_length, a.input)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.output, "".join(json.dumps({**r, "reward": v}, ensure_ascii=False) + "\n"
                                        for r, v in zip(rows, rewards)))
    unknown = sum(1 for r in rows if r.get("user_id") is not None and str(r["user_id"]) not in rm.registry)
    print(f"scored {len(rows)} rows in {time.perf_counter() - start:.1f} s ({unknown} of unknown users, scored as the "
          f"generic user); wrote {a.output}")
    return 0


def cmd_serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="prlhf serve", description="An OpenAI-compatible server (chat and text "
                                "completions, streaming) for a personalized model: the request's 'user' selects "
                                "the user embedding.")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("--served-model-name", default=None, help="the model id in /v1/models (default: the folder's name)")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows decoded together")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long the first request of a batch waits for others")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--device", default=None, help="cpu, cuda, auto (default: cpu)")
    a = p.parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("prlhf serve needs FastAPI and uvicorn: pip install 'prlhf[serve]' "
                          "(or pip install fastapi uvicorn)") from None
    from .serve import serve

    serve(a.model, a.host, a.port, a.api_key, a.served_model_name, a.max_batch_size, a.batch_wait_ms, a.max_tokens_limit,
          a.device)
    return 0


def cmd_judge(argv: list[str]) -> int:
    if argv[:1] == ["--show-template"]:  # print a built-in template, to copy and edit (then --template FILE)
        from .judge import load_template

        if len(argv) != 2:
            raise ConfigError("usage: prlhf judge --show-template generic|psoups|prism")
        sys.stdout.write(load_template(argv[1]))
        return 0
    p = argparse.ArgumentParser(prog="prlhf judge", description="Pairwise LLM-as-judge win rates of method A against "
                                "method B over an OpenAI-compatible endpoint, from the generations.jsonl of "
                                "`prlhf eval --generate N --report DIR`.")
    p.add_argument("--generations", required=True)
    p.add_argument("--a", required=True, help="method A (its name in generations.jsonl)")
    p.add_argument("--b", required=True, help="method B")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1")
    p.add_argument("--model", required=True, help="the judge model's name at that endpoint")
    p.add_argument("--template", default="generic", help="generic, psoups, prism, or a template file of your own "
                   "(`prlhf judge --show-template psoups > mine.txt` prints one to start from)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--output", required=True, help="judge.json")
    p.add_argument("--cache", default=None, help="judgment cache (default: OUTPUT with .cache.jsonl)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-pairs", type=int, default=None)
    a = p.parse_args(argv)
    from .judge import api_key_from_env, judge
    from .storage import atomic_write_text, check_output_path

    check_output_path(a.output, "--output")
    cache = a.cache or str(Path(a.output).with_suffix(".cache.jsonl"))
    result = judge(a.generations, a.a, a.b, a.base_url, a.model, a.template, api_key_from_env(a.api_key_env), cache,
                   a.concurrency, a.max_pairs, progress=lambda i, n: logger.info("judged %d/%d", i, n))
    atomic_write_text(a.output, json.dumps(result, indent=1, ensure_ascii=False))
    w, ci = result["win_rate"], result["win_rate_ci"]
    print(f"| {a.a} vs {a.b} | pairs | invalid | wins / ties / losses | win rate per sample | per user |")
    print("|---|---|---|---|---|---|")
    print(f"| judge {a.model} ({a.template}) | {result['n']} | {result['invalid']} | {result['wins']} / {result['ties']} / "
          f"{result['losses']} | {_fmt(w['per_sample'])}{_ci_text(ci['per_sample'])} | {_fmt(w['per_user'])}"
          f"{_ci_text(ci['per_user'])} |")
    print(f"\n{result['requests']} requests, {result['cached_judgments']} judgments from the cache; wrote {a.output}")
    return 0


def _ci_text(ci) -> str:
    return "" if not ci else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def cmd_demo(argv: list[str]) -> int:
    from .demo import main_demo

    p = argparse.ArgumentParser(prog="prlhf demo", description="P-DPO vs vanilla DPO on synthetic conflicting "
                                "preferences, tiny model, offline, a few minutes on 2 CPU cores.")
    p.add_argument("--output", default="outputs/demo", help="folder for data, models, report.md, report.json, plots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablations", action="store_true", help="also T_u = 1 and alpha = 1 (the paper's ablations)")
    a = p.parse_args(argv)
    return main_demo(a.output, a.seed, a.ablations)


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "sft": cmd_sft, "eval": cmd_eval, "generate": cmd_generate, "data": cmd_data,
            "adapt": cmd_adapt, "users": cmd_users, "rm": cmd_rm, "serve": cmd_serve, "judge": cmd_judge}


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 bad input or a refused setting; 3 a non-finite loss, gradient, weight
    or log-prob; 1 anything unexpected. No traceback unless ``--debug`` is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .data import DataError
    from .guards import NonFiniteError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except NonFiniteError as err:
        if debug:
            raise
        print(f"prlhf {argv[0]}: error: {err}", file=sys.stderr)
        return 3
    except (ConfigError, DataError, ValueError, OSError, ImportError) as err:
        if debug:
            raise
        print(f"prlhf {argv[0]}: error: {_describe(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prlhf {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line, not a traceback (unless --debug)
        if debug:
            raise
        print(f"prlhf {argv[0]}: unexpected error: {type(err).__name__}: {err} (run again with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def _describe(err: BaseException) -> str:
    """An OS error raised by Python itself as 'path: what'; prlhf's own errors as they are."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
