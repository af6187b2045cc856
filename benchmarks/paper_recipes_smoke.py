"""The paper-scale recipes (recipes/tldr_*, psoups_*, prism_*) for a few steps on SmolLM2-135M-Instruct,
each with its own settings, as its YAML header documents it (`prlhf sft` then `prlhf train`).

    python benchmarks/paper_recipes_smoke.py [--tldr FILE] [--dsp FILE] [--steps 3] [--work DIR] [--json OUT]

Data: the TL;DR recipes convert the shared TL;DR comparisons (batch 13) as their headers say; P-SOUPS and
PRISM have no offline data, so a small file in each one's own input format is written, its texts taken
from the DSP file (queries and the domains' answers: real text, synthetic users). What is changed from
each recipe, and why, is in the JSON (`overrides`): the base model (SmolLM2 instead of a 1-7B model that
is not on this machine), the step count, no gradient accumulation, float32 on CPU, one evaluation at the
end on 16 held-out pairs, and reference log-probs of the visited pairs only (``lazy_reference``). Every
other setting (learning rates, schedule, user model, T_u, alpha, beta, lengths) is the recipe's own.

Not a unit test: SmolLM2 is too slow for the suite; tests/test_recipes.py runs the same commands on tiny-llama.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

from prlhf.runs import benchmark_record, documented_commands

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SHARED = ROOT.parent / "shared" / "data"
OVERRIDES = ["--max_steps", "{steps}", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
             "--bf16", "false", "--use_cpu", "true", "--save_strategy", "no", "--report_to", "none",
             "--disable_tqdm", "true", "--logging_steps", "1"]
TRAIN_OVERRIDES = ["--lazy_reference", "true", "--eval_steps", "{steps}", "--eval_strategy", "steps"]


def paper_recipes() -> list[Path]:
    return sorted(p for p in RECIPES.glob("*.yaml") if p.name.startswith(("tldr_", "psoups_", "prism_")))


def psoups_input(dsp: list[dict], folder: Path, n: int = 40) -> Path:
    """RLPHF's P-SOUPS layout (P1A.json ... P3B.json: user_input, completion_a preferred, completion_b),
    texts from DSP: each profile prefers one domain's answer over another's."""
    folder.mkdir(parents=True, exist_ok=True)
    sentence = {"P1A": "Generate a response that can be easily understood by an elementary school student.",
                "P1B": "Generate a response that only a PhD Student in that specific field could understand.",
                "P2A": "Generate a response that is concise and to the point, without being verbose.",
                "P2B": "Generate a response that is very informative, without missing any background information.",
                "P3A": "Generate a response that is friendly, witty, funny, and humorous, like a close friend.",
                "P3B": "Generate a response in an unfriendly manner."}
    domains = {"P1A": ("entertainment", "academy"), "P1B": ("academy", "entertainment"),
               "P2A": ("business", "literature"), "P2B": ("literature", "business"),
               "P3A": ("entertainment", "business"), "P3B": ("business", "entertainment")}
    for pid, (win, lose) in domains.items():
        rows = [{"user_input": f"{r['query']} {sentence[pid]}", "completion_a": r["responses"][win],
                 "completion_b": r["responses"][lose]} for r in dsp[:n]]
        (folder / f"{pid}.json").write_text(json.dumps(rows))
    return folder


def prism_input(dsp: list[dict], folder: Path, n_users: int = 20, per_user: int = 3) -> Path:
    """PRISM's survey.jsonl and conversations.jsonl (its documented schema), texts from DSP: each
    participant favours one domain's answers in the opening turn."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    doms = ("academy", "business", "entertainment", "literature")
    survey, convs = [], []
    for u in range(n_users):
        fav = doms[u % 4]
        survey.append({"user_id": f"user{u}", "self_description": f"I like answers in the style of {fav}.",
                       "system_string": "Be helpful.", "stated_prefs": {"values": 50 + u, "fluency": 80},
                       "age": "25-34 years old", "gender": "Female" if u % 2 else "Male",
                       "location": {"reside_country": "United Kingdom"}, "education": "University Bachelors Degree"})
        for c in range(per_user):
            row = dsp[(u * per_user + c) % len(dsp)]
            hist = [{"turn": 0, "role": "user", "content": row["query"], "model_name": None, "score": None,
                     "if_chosen": None, "within_turn_id": None}]
            order = rng.sample(doms, 4)
            for k, d in enumerate(order):
                hist.append({"turn": 0, "role": "model", "content": row["responses"][d], "model_name": f"model_{d}",
                             "score": 90 if d == fav else 40 - 5 * k, "if_chosen": d == fav, "within_turn_id": k})
            convs.append({"conversation_id": f"c{u}_{c}", "user_id": f"user{u}", "conversation_type": "unguided",
                          "opening_prompt": row["query"], "conversation_history": hist})
    (folder / "survey.jsonl").write_text("".join(json.dumps(r) + "\n" for r in survey))
    (folder / "conversations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in convs))
    return folder


def prlhf(args: list[str], cwd: Path, log) -> tuple[int, float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "prlhf.cli", *args], cwd=cwd, capture_output=True, text=True)
    log.write(f"$ prlhf {shlex.join(args)}\n{proc.stdout}{proc.stderr}\n")
    log.flush()
    return proc.returncode, time.perf_counter() - start, proc.stderr[-2000:]


def small_eval(path: Path, n: int = 16) -> Path:
    """The first pair of each user, then the next ones, up to n: every user group is represented."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_user: dict = {}
    for r in rows:
        by_user.setdefault(r.get("user_id"), []).append(r)
    picked = []
    while len(picked) < n and any(by_user.values()):
        for rs in by_user.values():
            if rs and len(picked) < n:
                picked.append(rs.pop(0))
    out = path.with_name(path.stem + "_smoke.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tldr", default=str(SHARED / "tldr" / "comparisons_batch13.jsonl"))
    ap.add_argument("--dsp", default=str(SHARED / "dsp" / "domain_preference_shared.json"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="base model of the SFT steps")
    ap.add_argument("--work", default="outputs/paper_recipes_smoke")
    ap.add_argument("--json", default=None, help="report JSON (e.g. docs/runs/paper_recipes_smoke/report.json)")
    a = ap.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipes").unlink(missing_ok=True)
    (work / "recipes").symlink_to(RECIPES)
    log = open(work / "log.txt", "w")
    dsp = json.loads(Path(a.dsp).read_text())
    data_cmds = [
        ["data", "convert", "tldr", "--input", a.tldr, "--output", "data/tldr_top10", "--overwrite", "--label", "length",
         "--long-share", "0.7", "--top-k", "10"],
        ["data", "convert", "tldr", "--input", a.tldr, "--output", "data/tldr_top40", "--overwrite", "--label", "length",
         "--long-share", "0.7", "--top-k", "40"],
        ["data", "convert", "psoups", "--input", str(psoups_input(dsp, work / "raw" / "psoups")), "--output",
         "data/psoups", "--overwrite", "--profiles", str(SHARED / "psoups" / "profiles")],
        ["data", "convert", "prism", "--input", str(prism_input(dsp, work / "raw" / "prism")), "--output", "data/prism",
         "--overwrite", "--unseen-fraction", "0.1", "--user-fields", "stated_prefs,self_description,demographics"],
    ]
    for cmd in data_cmds:
        rc, _, err = prlhf(cmd, work, log)
        if rc:
            raise SystemExit(f"`prlhf {shlex.join(cmd)}` failed:\n{err}")
    sft, train = [], []
    for path in paper_recipes():
        for cmd in documented_commands(path):
            if cmd not in sft + train:
                (sft if cmd[0] == "sft" else train).append(cmd)
    steps = str(a.steps)
    results = []
    for cmd in sft + train:
        import yaml

        cfg = yaml.safe_load((RECIPES / Path(cmd[cmd.index("--config") + 1]).name).read_text())
        argv = list(cmd) + [x.replace("{steps}", steps) for x in OVERRIDES]
        if cmd[0] == "sft":
            argv += ["--model_name_or_path", a.model]
        else:
            eval_file = cfg.get("eval_file")
            if eval_file and (work / eval_file).is_file():
                argv += ["--eval_file", str(small_eval(work / eval_file))]
            argv += [x.replace("{steps}", steps) for x in TRAIN_OVERRIDES]
        print(f"prlhf {shlex.join(argv)}", flush=True)
        rc, seconds, err = prlhf(argv, work, log)
        entry = {"recipe": Path(cmd[cmd.index("--config") + 1]).name, "command": f"prlhf {shlex.join(cmd)}",
                 "overrides": argv[len(cmd):], "returncode": rc, "seconds": round(seconds, 1)}
        state = work / cfg["output_dir"] / "trainer_state.json"
        if cmd[0] == "train" and state.is_file():
            history = json.loads(state.read_text())["log_history"]
            entry["loss"] = [h["loss"] for h in history if "loss" in h]
            evals = [h for h in history if "eval_flip_rate" in h or "eval_loss" in h]
            if evals:
                entry["last_eval"] = {k: v for k, v in evals[-1].items()
                                      if k.startswith(("eval_rewards/accuracies", "eval_flip_rate", "eval_loss"))
                                      and "accuracies_user/" not in k}
        if rc:
            entry["error"] = err[-600:]
        results.append(entry)
        print(f"  rc {rc}, {seconds:.0f} s" + (f", losses {entry.get('loss')}" if "loss" in entry else ""), flush=True)
    report = {"steps": a.steps, "model": a.model, "tldr": a.tldr, "dsp_texts": a.dsp,
              "machine": {"platform": platform.platform(), "python": platform.python_version()},
              "recipes": results, "all_ran": all(r["returncode"] == 0 for r in results)}
    if a.json:
        from prlhf.storage import atomic_write_text

        atomic_write_text(a.json, json.dumps({**report, "run": benchmark_record()}, indent=1))
        print(f"wrote {a.json}")
    print(f"{sum(r['returncode'] == 0 for r in results)}/{len(results)} recipes ran")
    return 0 if report["all_ran"] else 1


if __name__ == "__main__":
    sys.exit(main())
