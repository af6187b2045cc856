"""The ``prlhf`` command: each command parses its config (``--config FILE.yaml`` plus flags, with
hyphens or underscores; flags win), makes one call into the library and prints the result.

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
    prlhf export-vllm --model DIR --output DIR2             merged LLM + user embeddings + client, for vLLM
    prlhf judge --generations FILE --a METHOD --b METHOD --base-url URL --model NAME --output judge.json

Every command takes --config FILE.yaml (its keys are the command's flags) and --help.
Exit codes: 0 done, 2 bad input or a refused setting, 3 a non-finite (NaN or inf) loss, gradient,
weight or log-prob, 1 anything unexpected. --debug shows the Python traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from .config.parse import ConfigError, parse_config

logger = logging.getLogger("prlhf")


def _positional(argv: list[str], flag: str) -> list[str]:
    """``prlhf users list ...`` / ``prlhf data inspect FILE ...``: the word after the command as ``flag``."""
    return [flag, argv[0], *argv[1:]] if argv and not argv[0].startswith("-") else argv


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


def _check_outputs(*paths_and_flags) -> None:
    from .storage import check_output_path

    for path, what in paths_and_flags:
        if path:
            check_output_path(path, what)


# -- training ------------------------------------------------------------------------------------


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
    from .config.training import PDPOConfig
    from .trainers.pdpo import PDPOTrainer

    cfg = parse_config(PDPOConfig, argv, prog="prlhf train")
    trainer = _train_and_save(PDPOTrainer(args=cfg), "personalized model")
    if cfg.push_to_hub and trainer.args.should_save:
        repo = cfg.hub_model_id or Path(cfg.output_dir).name
        url = trainer.accelerator.unwrap_model(trainer.model).push_to_hub(repo, private=cfg.hub_private_repo,
                                                                          token=cfg.hub_token)
        print(f"pushed to the Hugging Face Hub: {url}")
    return 0


def cmd_sft(argv: list[str]) -> int:
    from .config.training import PDPOConfig, PSFTConfig
    from .trainers.sft import PSFTTrainer

    pdpo_only = {f.name for f in dataclasses.fields(PDPOConfig)} - {f.name for f in dataclasses.fields(PSFTConfig)}
    cfg = parse_config(PSFTConfig, argv, ignore=pdpo_only, prog="prlhf sft")
    trainer = PSFTTrainer(args=cfg)
    trainer.train(resume_from_checkpoint=_resume_arg(cfg))
    out = trainer.save_final()
    if trainer.args.should_save:
        print(f"saved the SFT model to {out}")
    return 0


def _rm_train(argv: list[str]) -> int:
    from .config.training import PRMConfig
    from .trainers.prm import PRMTrainer

    _train_and_save(PRMTrainer(args=parse_config(PRMConfig, argv, prog="prlhf rm train")), "personalized reward model")
    return 0


# -- evaluation ------------------------------------------------------------------------------------


def cmd_eval(argv: list[str]) -> int:
    from .compare import evaluate_policies
    from .config.commands import EvalConfig

    evaluate_policies(parse_config(EvalConfig, _merge_repeated(argv, "--model"), prog="prlhf eval"))
    return 0


def _rm_eval(argv: list[str]) -> int:
    from .compare import evaluate_reward_models
    from .config.commands import RMEvalConfig

    evaluate_reward_models(parse_config(RMEvalConfig, _merge_repeated(argv, "--model"), prog="prlhf rm eval"))
    return 0


def _rm_score(argv: list[str]) -> int:
    import time

    from .config.commands import RMScoreConfig
    from .data import read_scoring_rows
    from .reward_model import PersonalizedRewardModel
    from .storage import atomic_write_text

    a = parse_config(RMScoreConfig, argv, prog="prlhf rm score")
    _check_outputs((a.output, "--output"))
    rows = read_scoring_rows(a.input)
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


# -- generation ------------------------------------------------------------------------------------


def cmd_generate(argv: list[str]) -> int:
    from .config.commands import GenerateConfig
    from .generation import run_generate

    run_generate(parse_config(GenerateConfig, argv, prog="prlhf generate"))
    return 0


# -- data ------------------------------------------------------------------------------------------

DATA_USAGE = ("usage: prlhf data convert {tldr,psoups,prism,dsp} --input PATH --output DIR [options] | "
              "data synth --output DIR [options] | data inspect FILE [--json]  (each takes --config FILE.yaml and --help)")


def cmd_data(argv: list[str]) -> int:
    from .config.data import CONVERT_CONFIGS, InspectConfig, SynthConfig

    action = argv[0] if argv else None
    if action == "inspect":
        from .data import load_preference_data
        from .inspection import format_report, inspect_pairs

        a = parse_config(InspectConfig, _positional(argv[1:], "--file"), prog="prlhf data inspect")
        stats = inspect_pairs(load_preference_data(a.file))
        print(json.dumps(stats, indent=1) if a.json else format_report(stats))
        return 0
    from .sources import CONVERTERS, synthesize, write_conversion

    if action == "synth":
        a = parse_config(SynthConfig, argv[1:], prog="prlhf data synth")
        conv = synthesize(a.n_users, a.unseen_users, a.majority_share, a.n_prompts, a.pairs_per_user,
                          tuple(a.attributes), a.test_fraction, a.seed, a.format, user_texts=a.user_texts,
                          unseen_pairs_per_user=a.unseen_pairs_per_user)
    elif action == "convert" and len(argv) > 1 and argv[1] in CONVERT_CONFIGS:
        a = parse_config(CONVERT_CONFIGS[argv[1]], argv[2:], prog=f"prlhf data convert {argv[1]}")
        conv = CONVERTERS[argv[1]](**a.converter_kwargs())
    else:
        raise ConfigError(DATA_USAGE)
    out = write_conversion(conv, a.output, overwrite=a.overwrite)
    print(conv.summary_table())
    print(f"\nwrote {out}/train.jsonl, test.jsonl" + (", unseen.jsonl" if (out / "unseen.jsonl").exists() else "")
          + ", users.json")
    return 0


# -- new users -------------------------------------------------------------------------------------


def cmd_adapt(argv: list[str]) -> int:
    from .adapt import adapt_folder, suggest_for_folder
    from .config.commands import AdaptConfig
    from .storage import atomic_write_text

    a = parse_config(AdaptConfig, argv, prog="prlhf adapt")
    _check_outputs((a.output, "--output"))
    if a.suggest is not None:
        records, n_candidates = suggest_for_folder(a)
        text = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
        if a.output:
            atomic_write_text(a.output, text)
            print(f"wrote {len(records)} of {n_candidates} candidates ({a.strategy}) to {a.output}: label each "
                  "(swap chosen and rejected where the user prefers the other) and pass the file to --data")
        else:
            sys.stdout.write(text)
        return 0
    model, result = adapt_folder(a)
    print("| user | new | pairs (total) |\n|---|---|---|")
    for uid in result.adapted_users:
        print(f"| {uid} | {'yes' if uid in result.new_users else 'no'} | {model.registry.pair_counts.get(uid)} |")
    acc = "-" if result.train_accuracy is None else f"{result.train_accuracy:.3f}"
    print(f"\nadapted {len(result.adapted_users)} users ({len(result.new_users)} new) on {result.n_pairs} pairs, "
          f"{result.steps} steps in {result.seconds:.1f} s (reference pass {result.reference_seconds:.1f} s); "
          f"training accuracy {acc}; wrote {a.output}")
    return 0


def cmd_users(argv: list[str]) -> int:
    from .config.commands import UsersConfig
    from .persistence import export_user, list_users, remove_user

    a = parse_config(UsersConfig, _positional(argv, "--action"), prog="prlhf users")
    if a.action == "list":
        rows = list_users(a.model)
        if a.json:
            print(json.dumps(rows, indent=1, ensure_ascii=False))
            return 0
        print("| user | row | pairs | text |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['user_id']} | {r['row']} | {'-' if r['n_pairs'] is None else r['n_pairs']} | "
                  f"{'yes' if r['has_text'] else 'no'} |")
        print(f"\n{len(rows)} users (row 0 is the generic user, who serves every other id)")
        return 0
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


# -- reward models, serving, judging, demos ----------------------------------------------------------

RM_USAGE = ("usage: prlhf rm train --config FILE | rm eval --model DIR --data FILE --output metrics.json | "
            "rm score --model DIR --input FILE --output FILE | rm demo [--output DIR]  (each takes --help)")


def cmd_rm(argv: list[str]) -> int:
    """``prlhf rm train|eval|score|demo``: the personalized reward model."""
    actions = {"train": _rm_train, "eval": _rm_eval, "score": _rm_score, "demo": _rm_demo}
    if not argv or argv[0] in ("-h", "--help"):
        print(RM_USAGE)
        return 0
    if argv[0] not in actions:
        raise ConfigError(f"prlhf rm: unknown action {argv[0]!r}; {RM_USAGE}")
    return actions[argv[0]](argv[1:])


def _rm_demo(argv: list[str]) -> int:
    from .config.commands import RewardDemoConfig
    from .experiments.reward_demo import main_reward_demo

    a = parse_config(RewardDemoConfig, argv, prog="prlhf rm demo")
    return main_reward_demo(a.output, a.seed, a.best_of)


def cmd_serve(argv: list[str]) -> int:
    from .config.commands import ServeConfig

    a = parse_config(ServeConfig, argv, prog="prlhf serve")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("prlhf serve needs FastAPI and uvicorn: pip install 'prlhf[serve]' "
                          "(or pip install fastapi uvicorn)") from None
    from .serve import serve

    serve(a.model, a.host, a.port, a.api_key, a.served_model_name, a.max_batch_size, a.batch_wait_ms, a.max_tokens_limit,
          a.device, a.dtype, a.continuous_batching)
    return 0


def cmd_judge(argv: list[str]) -> int:
    from .config.commands import JudgeConfig
    from .judge import api_key_from_env, judge, load_template
    from .report import fmt_interval, fmt_number
    from .storage import atomic_write_text

    a = parse_config(JudgeConfig, argv, prog="prlhf judge")
    if a.show_template is not None:  # print a built-in template, to copy and edit (then --template FILE)
        sys.stdout.write(load_template(a.show_template))
        return 0
    _check_outputs((a.output, "--output"))
    cache = a.cache or str(Path(a.output).with_suffix(".cache.jsonl"))
    result = judge(a.generations, a.a, a.b, a.base_url, a.model, a.template, api_key_from_env(a.api_key_env), cache,
                   a.concurrency, a.max_pairs, progress=lambda i, n: logger.info("judged %d/%d", i, n))
    atomic_write_text(a.output, json.dumps(result, indent=1, ensure_ascii=False))
    w, ci = result["win_rate"], result["win_rate_ci"]
    print(f"| {a.a} vs {a.b} | pairs | invalid | wins / ties / losses | win rate per sample | per user |")
    print("|---|---|---|---|---|---|")
    print(f"| judge {a.model} ({a.template}) | {result['n']} | {result['invalid']} | {result['wins']} / {result['ties']} / "
          f"{result['losses']} | {fmt_number(w['per_sample'])}{fmt_interval(ci['per_sample'])} | {fmt_number(w['per_user'])}"
          f"{fmt_interval(ci['per_user'])} |")
    print(f"\n{result['requests']} requests, {result['cached_judgments']} judgments from the cache; wrote {a.output}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    from .config.commands import DemoConfig
    from .experiments.demo import main_demo

    a = parse_config(DemoConfig, argv, prog="prlhf demo")
    return main_demo(a.output, a.seed, a.ablations)


def cmd_export_vllm(argv: list[str]) -> int:
    from .config.commands import ExportVLLMConfig
    from .export import export_for_vllm

    a = parse_config(ExportVLLMConfig, argv, prog="prlhf export-vllm")
    out = export_for_vllm(a.model, a.output, None if a.dtype == "float32" else a.dtype, a.device)
    print(f"wrote {out} (serve: vllm serve {out / 'llm'} --enable-prompt-embeds; then {out / 'vllm_client.py'})")
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "sft": cmd_sft, "eval": cmd_eval, "generate": cmd_generate, "data": cmd_data,
            "adapt": cmd_adapt, "users": cmd_users, "rm": cmd_rm, "serve": cmd_serve, "judge": cmd_judge,
            "export-vllm": cmd_export_vllm}


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 bad input or a refused setting; 3 a non-finite loss, gradient, weight
    or log-prob; 1 anything unexpected. No traceback unless ``--debug`` is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] in (["--version"], ["-V"]):
        from . import __version__

        print(f"prlhf {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] not in COMMANDS:
        print(f"prlhf: unknown command {argv[0]!r}; the commands are: {', '.join(COMMANDS)} "
              "(`prlhf --help` shows what each does)", file=sys.stderr)
        return 2
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
