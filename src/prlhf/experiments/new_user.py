"""A new user on a trained model: how much of the way from the generic user to a fully trained user
a few labelled pairs take it, next to the prompt baseline given the same pairs.

    python -m prlhf.experiments.new_user --model OUT/pdpo_without_user --full-model OUT/pdpo_all_users \\
        --baseline OUT/dpo_user_id_without_user --new-users data/unseen.jsonl --held-out-prompts data/test.jsonl \\
        --ks 0,2,4,8,16,32 --output OUT

- ``--model``: P-DPO trained without the new users. Their pairs on the prompts of
  ``--held-out-prompts`` are held out; the rest is each one's adaptation pool. For each k the new
  users are adapted from the generic user on the first k pairs of their pool (``prlhf adapt``:
  only their own parameters move), random and active choice (``learning_curves``).
- ``--full-model``: P-DPO trained with the new users' training pairs as well (every user seen): the
  accuracy a new user could reach, scored on the same held-out pairs.
- ``--baseline``: vanilla DPO with the user id in the prompt (``user_id_in_prompt``), trained
  without the new users, then trained further on the same k pairs (the random choice's), all else
  equal (same steps and batch size; its own LLM learning rate), and scored on the same pairs.

Writes ``OUTPUT/report.json`` (``new_user.accuracy_by_k``, ``new_user.fully_trained_accuracy``,
``new_user.gap_closed`` with a paired bootstrap interval at each k, ``baseline.accuracy_by_k``),
``report.md`` and a plot.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ..stats import bootstrap_ci
from ..storage import atomic_write_text


def gap_closed(hits_k: list[float], hits_0: list[float], hits_full: list[float], n_boot: int = 1000,
               seed: int = 0) -> dict:
    """The share of the gap between the generic user (k = 0) and the fully trained user that k pairs
    close, (acc_k - acc_0) / (acc_full - acc_0), with a paired bootstrap interval (the same pairs
    resampled for all three; resamples without a gap are dropped). None when there is no gap."""
    k, z, f = (np.asarray(x, dtype=np.float64) for x in (hits_k, hits_0, hits_full))
    gap = f.mean() - z.mean()
    if abs(gap) < 1e-12:
        return {"mean": None, "ci": None}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(k), size=(n_boot, len(k)))
    num, den = k[idx].mean(1) - z[idx].mean(1), f[idx].mean(1) - z[idx].mean(1)
    ok = np.abs(den) > 1e-12
    ratios = num[ok] / den[ok]
    ci = [float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))] if ok.any() else None
    return {"mean": float((k.mean() - z.mean()) / gap), "ci": ci}


def baseline_curve(baseline_dir: str, orders: dict[str, list[dict]], held_out: list[dict], ks, steps: int,
                   batch_size: int, eval_kwargs: dict, seed: int = 0, progress=None) -> dict:
    """The prompt baseline trained further on each k of the new users' pairs (the first k of each
    user's ``orders``), from its saved folder each time; held-out accuracy and per-pair hits."""
    from ..config import PDPOConfig
    from ..evaluation import evaluate_accuracy
    from ..modeling import PersonalizedLM
    from ..reference import load_reference
    from ..trainers.pdpo import PDPOTrainer
    from .cold_start import hits_in_order

    out = {"accuracy_by_k": {}, "ci_by_k": {}, "hits": {}, "seconds": {}}
    saved = json.loads((Path(baseline_dir) / "training_args.json").read_text())
    for k in ks:
        start = time.time()
        model = PersonalizedLM.from_pretrained(baseline_dir, is_trainable=k > 0)
        if not model.prlhf_config.user_id_prompt:
            raise ValueError(f"{baseline_dir}: not a prompt baseline (trained without user_id_in_prompt)")
        if k > 0:
            records = [r for uid in sorted(orders) for r in orders[uid][:k]]
            with tempfile.TemporaryDirectory() as tmp:
                args = PDPOConfig(output_dir=tmp, user_model="none", user_id_in_prompt=True, use_lora=model.prlhf_config.use_lora,
                                  learning_rate=saved.get("learning_rate", 5e-4), beta=saved.get("beta", 0.1),
                                  max_steps=steps, per_device_train_batch_size=min(batch_size, len(records)),
                                  max_length=eval_kwargs["max_length"], max_prompt_length=eval_kwargs["max_prompt_length"],
                                  save_strategy="no", report_to="none", logging_steps=max(1, steps), seed=seed,
                                  reference_cache_dir=str(Path(tmp) / "ref"), health_eval_pairs=0, disable_tqdm=True)
                PDPOTrainer(model=model, args=args, train_dataset=records).train()
        acc = evaluate_accuracy(model, held_out, load_reference(model), **eval_kwargs)
        out["accuracy_by_k"][str(k)] = acc["accuracy"]["overall"]
        out["hits"][str(k)] = hits_in_order(acc, len(held_out))
        out["ci_by_k"][str(k)] = bootstrap_ci(out["hits"][str(k)])
        out["seconds"][str(k)] = time.time() - start
        if progress:
            progress("baseline", k, out["accuracy_by_k"][str(k)])
    return out


def run(model_dir: str, full_dir: str, baseline_dir: str | None, new_users: str, held_out_prompts: str, ks=(0, 2, 4, 8, 16, 32),
        strategies=("random", "active"), steps: int = 20, batch_size: int = 16, seed: int = 0, max_length: int | None = None,
        max_prompt_length: int | None = None, progress=None) -> dict:
    from ..adapt import training_objective
    from ..data import load_preference_data
    from ..evaluation import evaluate_accuracy
    from ..modeling import PersonalizedLM
    from ..reference import load_reference
    from .cold_start import hits_in_order, learning_curves, ordered_pools, split_new_users

    start = time.time()
    model = PersonalizedLM.from_pretrained(model_dir)
    reference = load_reference(model)
    objective = training_objective(model_dir)
    records = load_preference_data(new_users)
    known = sorted({str(r["user_id"]) for r in records if r.get("user_id") in model.registry})
    if known:
        raise ValueError(f"{new_users}: users {known} are known to {model_dir}; new users must be absent from it")
    held = {json.dumps(r["prompt"]) for r in load_preference_data(held_out_prompts)}
    pools, held_out = split_new_users(records, held)
    if not held_out or not pools:
        raise ValueError(f"{new_users}: no held-out pairs on the prompts of {held_out_prompts}, or no pairs left to adapt on")
    eval_kwargs = {"max_length": max_length or objective.get("max_length", 1024),
                   "max_prompt_length": max_prompt_length or objective.get("max_prompt_length", 512), "batch_size": 16}
    # the active choice scores the pool at the same lengths as everything else (not the 1024-token default)
    score_kwargs = {"max_length": eval_kwargs["max_length"], "max_prompt_length": eval_kwargs["max_prompt_length"]}
    curves = learning_curves(model, pools, held_out, reference, ks=ks, strategies=strategies, steps=steps,
                             batch_size=batch_size, seed=seed, objective=objective, eval_kwargs=eval_kwargs,
                             score_kwargs=score_kwargs, progress=progress)

    full = PersonalizedLM.from_pretrained(full_dir)
    missing = sorted(u for u in pools if u not in full.registry)
    if missing:
        raise ValueError(f"{full_dir}: the fully trained model does not know the new users {missing}")
    acc_full = evaluate_accuracy(full, held_out, load_reference(full), **eval_kwargs)
    full_hits = hits_in_order(acc_full, len(held_out))  # built once, not per pair
    del full

    rand = curves["hits"]["random"]
    new_user = {
        "users": sorted(pools), "held_out_pairs": len(held_out), "pool_pairs": {u: len(p) for u, p in sorted(pools.items())},
        "accuracy_by_k": curves["curves"]["random"], "ci_by_k": curves["ci"]["random"],
        "accuracy_by_k_active": curves["curves"].get("active"), "ci_by_k_active": curves["ci"].get("active"),
        "generic_accuracy": curves["curves"]["random"]["0"],
        "fully_trained_accuracy": acc_full["accuracy"]["overall"], "fully_trained_ci": bootstrap_ci(full_hits),
        "gap_closed": {k: gap_closed(h, rand["0"], full_hits, seed=seed) for k, h in rand.items() if k != "0"},
        "gap_closed_active": ({k: gap_closed(h, rand["0"], full_hits, seed=seed) for k, h in curves["hits"]["active"].items()
                               if k != "0"} if "active" in curves["hits"] else None),
        "seconds_by_k": curves["seconds"],
    }
    report = {"new_user": new_user, "steps": steps, "batch_size": batch_size, "seed": seed,
              "models": {"adapted": model_dir, "fully_trained": full_dir, "baseline": baseline_dir}}
    if baseline_dir:
        orders = ordered_pools(pools, seed)
        base = baseline_curve(baseline_dir, orders, held_out, ks, steps, batch_size, eval_kwargs, seed, progress)
        report["baseline"] = {"accuracy_by_k": base["accuracy_by_k"], "ci_by_k": base["ci_by_k"],
                              "gap_closed": {k: gap_closed(h, rand["0"], full_hits, seed=seed)
                                             for k, h in base["hits"].items() if k != "0"},
                              "seconds_by_k": base["seconds"]}
    report["runtime_seconds"] = time.time() - start
    return report


def report_table(report: dict) -> str:
    """The new user's held-out accuracy by k: adapted (random, active), the prompt baseline, and the
    share of the gap to the fully trained user closed."""
    nu = report["new_user"]
    ks = sorted(nu["accuracy_by_k"], key=int)

    def cell(acc, ci=None):
        return "-" if acc is None else f"{acc:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    def gap(g):
        if not g or g.get("mean") is None:
            return "-"
        return f"{g['mean']:+.2f}" + (f" [{g['ci'][0]:+.2f}, {g['ci'][1]:+.2f}]" if g.get("ci") else "")

    rows = ["| k | adapted, random | gap closed | adapted, active | prompt baseline (+k pairs) | baseline gap closed |",
            "|---|---|---|---|---|---|"]
    base = report.get("baseline") or {}
    for k in ks:
        rows.append("| " + " | ".join([
            k, cell(nu["accuracy_by_k"][k], (nu.get("ci_by_k") or {}).get(k)), gap(nu["gap_closed"].get(k)),
            cell((nu.get("accuracy_by_k_active") or {}).get(k)),
            cell((base.get("accuracy_by_k") or {}).get(k), (base.get("ci_by_k") or {}).get(k)),
            gap((base.get("gap_closed") or {}).get(k))]) + " |")
    rows += ["", "| the new user's held-out pairs | accuracy |", "|---|---|",
             f"| generic user (k = 0) | {cell(nu['generic_accuracy'], (nu.get('ci_by_k') or {}).get('0'))} |",
             f"| fully trained (its pool pairs in training) | {cell(nu['fully_trained_accuracy'], nu.get('fully_trained_ci'))} |",
             f"| pairs held out / in the pool | {nu['held_out_pairs']} / {sum(nu['pool_pairs'].values())} ({', '.join(nu['users'])}) |"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prlhf.experiments.new_user", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="P-DPO trained without the new users")
    ap.add_argument("--full-model", required=True, help="P-DPO trained with them (every user seen)")
    ap.add_argument("--baseline", default=None, help="the prompt baseline (vanilla DPO, user id in the prompt) trained without them")
    ap.add_argument("--new-users", required=True, help="the new users' pairs (JSONL)")
    ap.add_argument("--held-out-prompts", required=True, help="a data file whose prompts are held out (test.jsonl)")
    ap.add_argument("--ks", default="0,2,4,8,16,32")
    ap.add_argument("--strategies", default="random,active")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per adaptation (and per baseline fine-tuning)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--max-prompt-length", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", required=True, help="folder for report.json, report.md and the plot")
    a = ap.parse_args(argv)
    ks = [int(k) for k in a.ks.split(",")]
    if 0 not in ks:
        ks = [0, *ks]
    begin = time.time()
    report = run(a.model, a.full_model, a.baseline, a.new_users, a.held_out_prompts, ks, tuple(a.strategies.split(",")),
                 a.steps, a.batch_size, a.seed, a.max_length, a.max_prompt_length,
                 progress=lambda s, k, acc: print(f"{s} k={k}: {acc:.3f} ({time.time() - begin:.0f} s)", flush=True))
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    table = report_table(report)
    atomic_write_text(out / "report.md", "# A new user on a trained model\n\n" + table + "\n")
    plot(report, out / "new_user.png")
    print("\n" + table + f"\n\nwrote {out / 'report.json'} ({report['runtime_seconds']:.0f} s)")
    return 0


def plot(report: dict, path: Path) -> Path:
    """Held-out accuracy against k: adapted (random, active), the prompt baseline, and the generic
    and fully trained levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nu = report["new_user"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, curve in (("adapted, random", nu["accuracy_by_k"]), ("adapted, active", nu.get("accuracy_by_k_active")),
                        ("prompt baseline", (report.get("baseline") or {}).get("accuracy_by_k"))):
        if curve:
            ks = sorted(curve, key=int)
            ax.plot([int(k) for k in ks], [curve[k] for k in ks], marker="o", label=name)
    ax.axhline(nu["fully_trained_accuracy"], color="gray", linestyle="--", label="fully trained")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("pairs of the new user (k)")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
