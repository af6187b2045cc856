"""The model card (``README.md``) written with every saved personalized model: what it was built
from (base model, reference, user model, users), how it was trained (data, settings) and, when
known, its last training metrics, in the Hugging Face model-card layout (YAML metadata first)."""

from __future__ import annotations

import json


def model_card(config, n_users: int, n_user_texts: int = 0, training: dict | None = None,
               metrics: dict | None = None, kind: str = "policy") -> str:
    """Markdown for a personalized model. ``config`` is its ``PersonalizationConfig``; ``training``
    holds settings worth reporting (data file, steps, beta, alpha, ...); ``metrics`` the last logged
    training metrics; ``kind`` "policy" or "reward" (a P-RM: the same folder plus a reward head)."""
    reward = kind == "reward"
    base = config.base_model_name_or_path
    kind = {"none": "none (vanilla DPO)", "uniform": "uniform (one shared soft prompt: vanilla DPO)",
            "individual": "individual (e_0 plus a per-user offset)",
            "cluster": f"cluster ({config.n_clusters} cluster embeddings mixed per user, {config.cluster_weighting})"}
    lines = ["---", "library_name: prlhf", f"base_model: {json.dumps(base)}",
             "tags:", "- prlhf", "- p-rm" if reward else "- p-dpo", "- personalization"] + (["- lora"] if config.use_lora else []) + ["---", "",
             f"# Personalized {'reward model on ' if reward else ''}{base.rstrip('/').split('/')[-1]}", "",
             ("A personalized reward model (P-RM)" if reward else "A causal LM personalized with P-RLHF / P-DPO")
             + " (Li et al., *Personalized Language Modeling from Personalized Human Feedback*, "
             "[arXiv 2402.05133](https://arxiv.org/abs/2402.05133)) by prlhf: a user model turns each user into a soft prompt prepended to "
             "the input embeddings" + ("; a scalar head on the last token's hidden state gives r(x, y, u)." if reward else "."),
             "",
             "| | |", "|---|---|",
             f"| base model | `{base}` |",
             f"| weights | {'LoRA adapter on the base model' if config.use_lora else 'full model'} |",
             *([] if reward else [f"| reference (pi_SFT) | `{config.reference_model_name_or_path or (base + ' (adapters disabled)' if config.use_lora else base)}` |"]),
             f"| user model | {kind.get(config.user_model, config.user_model)} |",
             f"| user tokens (T_u) | {config.n_implicit_tokens} |",
             f"| users | {n_users} known (unknown ids get the generic user e_0){f'; {n_user_texts} with a text' if n_user_texts else ''} |"]
    for key, value in (training or {}).items():
        if value is not None:
            lines.append(f"| {key} | `{value}` |")
    if metrics:
        lines += ["", "## Last training metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    if reward:
        code = ["from prlhf.reward_model import PersonalizedRewardModel", "",
                "rm = PersonalizedRewardModel.from_pretrained(\"<this folder>\")",
                "print(rm.score([\"Your prompt\"], [\"A response\"], user_ids=[\"<a user id>\"]))"]
        command = "prlhf rm score --model <this folder> --input rows.jsonl --output scored.jsonl"
    else:
        code = ["from prlhf import PersonalizedLM", "", "model = PersonalizedLM.from_pretrained(\"<this folder>\")",
                "print(model.generate([\"Your prompt\"], user_ids=[\"<a user id>\"])[0])"]
        command = "prlhf generate --model <this folder> --user <id> --prompt ..."
    lines += ["", "## Use", "", "```python", *code, "```", "",
              f"or `{command}`; `users.json` lists the users, `manifest.json` the SHA-256 of every file.", ""]
    return "\n".join(lines)
