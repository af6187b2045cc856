"""New users after training: few-shot adaptation and active questions.

* ``adapt_users``: add the users of a few labelled pairs to a trained model and fit only their own
  parameters (individual model: their offset o_u; cluster model: their K mixture logits) with the
  LLM, e_0, the clusters and every other user frozen. New users start as the generic user (k = 0
  is the generic behaviour); a user who already exists continues from their current parameters
  (preference drift) unless ``reset``. The reference log-probs of the new pairs are computed
  once; the optimizer holds state for the adapted users' rows only.
* ``suggest_pairs``: which unlabelled candidate comparisons would tell the most about a new user:
  those on which a committee of known users (the seen users' embeddings, or the cluster
  embeddings) disagrees most about the preferred response.

What a saved model holds about its users (list, export, removal) lives with the model folders, in
``prlhf.persistence``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import load_preference_data, tokenize_dataset
from .evaluation import pair_margins
from .guards import check_finite
from .losses import preference_loss, sft_term
from .modeling import PersonalizedLM
from .persistence import resolve_saved_model
from .reference import load_reference, pair_reference_logps
from .scoring import packing_supported
from .users import UserRegistry

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.json"


@dataclass
class AdaptResult:
    """What ``adapt_users`` did."""

    new_users: list[str]
    adapted_users: list[str]
    n_pairs: int
    steps: int
    seconds: float
    reference_seconds: float
    loss: list[float] = field(default_factory=list)  # per step
    train_accuracy: float | None = None  # implicit-reward accuracy on the adaptation pairs at the end

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def training_objective(directory: str | os.PathLike | None) -> dict:
    """The objective a saved model was trained with (``training_args.json`` beside the weights):
    beta, loss type, ``sft_weight``, lengths and the user learning rate; {} when unknown."""
    if directory is None:
        return {}
    path = Path(directory) / TRAINING_ARGS_NAME
    if not path.is_file():
        return {}
    try:
        args = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        logger.warning("%s: not valid JSON; adaptation uses its own defaults", path)
        return {}
    keys = ("beta", "loss_type", "label_smoothing", "sft_weight", "max_length", "max_prompt_length", "user_learning_rate")
    return {k: args[k] for k in keys if k in args}


class _AdaptingUserModel(nn.Module):
    """The frozen user model with the rows being adapted replaced by a trainable tensor."""

    def __init__(self, base: nn.Module, rows: list[int], values: nn.Parameter):
        super().__init__()
        self.base = base
        self.rows = rows
        self.values = values
        self.n_tokens, self.hidden_size, self.n_rows = base.n_tokens, base.hidden_size, base.n_rows

    depends_on_user = True

    def forward(self, user_rows: torch.Tensor) -> torch.Tensor:
        return self.base.forward_with(user_rows, self.rows, self.values)


@contextmanager
def _frozen(model):
    """Every parameter of the model frozen for the duration; requires_grad flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()  # no dropout: the adapted users see the LLM as it serves
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _check_adaptable(model) -> None:
    um = model.user_model
    if um is None or getattr(um, "per_user_param", None) is None:
        kind = model.prlhf_config.user_model
        raise ValueError(f"adapting users needs an individual or cluster user model; this model's user model is "
                         f"{kind!r}, which has no per-user parameters")


def adapt_users(model, records: list[dict], reference=None, steps: int = 30, learning_rate: float | None = None,
                batch_size: int = 16, reset: bool = False, beta: float | None = None, loss_type: str | None = None,
                sft_weight: float | None = None, max_length: int | None = None, max_prompt_length: int | None = None,
                seed: int = 0, objective: dict | None = None, ref_cache: dict | None = None,
                name: str = "adaptation data") -> AdaptResult:
    """Fit the users of ``records`` (labelled pairs with a ``user_id``) in ``model``, in place.

    Only the users' own parameters move: the LLM, the generic user e_0, the clusters and every
    other user stay bit-identical. Users absent from the model are added (starting as the generic
    user); present users continue from their parameters, or restart as the generic user with
    ``reset``. ``reference`` is pi_SFT (None for a LoRA model: its base, adapters disabled).
    ``objective`` holds the training's beta / loss type / lengths / user learning rate
    (``training_objective``); the keyword arguments override it. The default learning rate is the
    training's user learning rate, at least the user model's ``min_adapt_learning_rate`` (0.1 for the
    cluster model's mixture logits). ``steps`` optimizer steps (Adam) of ``batch_size`` pairs, the
    pairs reshuffled every pass. ``ref_cache`` (``(user_id, prompt, chosen, rejected)`` -> reference
    log-probs) may be shared between calls on the same pairs.
    """
    _check_adaptable(model)
    objective = dict(objective or {})
    beta = beta if beta is not None else objective.get("beta", 0.1)
    loss_type = loss_type or objective.get("loss_type", "sigmoid")
    label_smoothing = objective.get("label_smoothing", 0.0)
    sft_weight = sft_weight if sft_weight is not None else objective.get("sft_weight", 0.0)
    lr = learning_rate
    if lr is None:  # the training's user learning rate, raised to the user model's floor
        lr = max(objective.get("user_learning_rate") or 1e-2, model.user_model.min_adapt_learning_rate or 0.0)
    max_length = max_length if max_length is not None else objective.get("max_length", 1024)
    max_prompt_length = max_prompt_length if max_prompt_length is not None else objective.get("max_prompt_length", 512)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, rec in enumerate(records):
        if rec.get("user_id") is None or str(rec.get("user_id")) == "":
            raise ValueError(f"{name}: record {i}: field 'user_id' is missing: adaptation fits named users (the "
                             "generic user is trained with the model)")
    start = time.time()
    registry: UserRegistry = model.registry
    um = model.user_model
    order: list[str] = []
    for rec in records:
        uid = str(rec["user_id"])
        if uid not in order:
            order.append(uid)
    new_users = [u for u in order if u not in registry]
    if new_users:
        rows = um.add_rows(len(new_users))
        for uid, row in zip(new_users, rows):
            if registry.add(uid) != row:
                raise RuntimeError("the user registry and the user model disagree on row numbers")
    for rec in records:  # a user's text, when the data gives one and the model has none yet
        uid, text = str(rec["user_id"]), rec.get("user_text")
        if text and uid not in registry.user_texts:
            registry.user_texts[uid] = text
    rows = [registry.row(u) for u in order]
    if reset:
        for row in rows:
            um.set_user_parameters(row, um.new_user_parameters())
    counts: dict[str, int] = {}
    for rec in records:
        counts[str(rec["user_id"])] = counts.get(str(rec["user_id"]), 0) + 1
    for uid, n in counts.items():
        previous = 0 if (reset or uid in new_users) else registry.pair_counts.get(uid, 0)
        registry.pair_counts[uid] = previous + n

    settings = model.tokenize_settings(max_length, max_prompt_length)
    examples = tokenize_dataset(records, model.tokenizer, settings, registry, name)
    result = AdaptResult(new_users, order, len(examples), steps, 0.0, 0.0)
    if not examples or steps == 0:
        result.seconds = time.time() - start
        return result
    t_ref = time.time()
    key = lambda rec: (str(rec["user_id"]), json.dumps(rec["prompt"]), json.dumps(rec["chosen"]), json.dumps(rec["rejected"]))  # noqa: E731
    missing = [ex for ex in examples if ref_cache is None or key(records[ex["index"]]) not in ref_cache]
    computed = (pair_reference_logps(model, missing, reference, batch_size, packing=packing_supported(model.llm))
                if missing else torch.zeros(0, 2))
    if ref_cache is not None:
        for ex, lp in zip(missing, computed):
            ref_cache[key(records[ex["index"]])] = lp
        ref_all = torch.stack([ref_cache[key(records[ex["index"]])] for ex in examples])
    else:
        ref_all = computed
    for ex, lp in zip(examples, ref_all.tolist()):
        ex["ref_logps"] = tuple(lp)
    result.reference_seconds = time.time() - t_ref

    collate = model.collator(packing=packing_supported(model.llm))
    values = nn.Parameter(torch.stack([um.user_parameters(r) for r in rows]).float())
    optimizer = torch.optim.Adam([values], lr=lr)
    rng = random.Random(seed)
    queue: list[int] = []
    with _frozen(model):
        adapting = _AdaptingUserModel(um, rows, values)
        model.user_model = adapting
        try:
            for _ in range(steps):
                if len(queue) < min(batch_size, len(examples)):
                    perm = list(range(len(examples)))
                    rng.shuffle(perm)
                    queue.extend(perm)
                chunk = [examples[i] for i in queue[:batch_size]]
                del queue[:batch_size]
                batch = {k: v.to(model.device) for k, v in collate(chunk).items()}
                B = len(chunk)
                lp = model.term_logps(batch, [(batch["user_rows"], None)])[0]
                ref = batch["ref_logps"].to(lp.dtype)
                losses, _, _ = preference_loss(lp[:B], lp[B:], ref[:B], ref[B:], beta, loss_type, label_smoothing)
                if sft_weight:
                    losses = losses + sft_weight * sft_term(lp[:B], batch["n_tokens"][:B])
                loss = losses.mean()
                check_finite({"adaptation loss": loss.detach()}, "user adaptation")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                result.loss.append(loss.item())
            with torch.no_grad():
                margins = pair_margins(model, examples, [ex["user_row"] for ex in examples], reference, batch_size,
                                       ref_cache={ex["index"]: ex["ref_logps"] for ex in examples})
            result.train_accuracy = sum(m > 0 for m in margins) / len(margins)
        finally:
            model.user_model = um
    check_finite({"adapted user parameters": values.detach()}, "user adaptation")
    for row, value in zip(rows, values.detach()):
        um.set_user_parameters(row, value)
    result.seconds = time.time() - start
    return result


# -- active questions ------------------------------------------------------------------------------


class _CommitteeUserModel(nn.Module):
    """Serves fixed embeddings: user row k gets ``embeddings[k]`` (committee member k)."""

    depends_on_user = True

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = embeddings
        self.n_rows, self.n_tokens, self.hidden_size = embeddings.shape

    def forward(self, user_rows: torch.Tensor) -> torch.Tensor:
        return self.embeddings[user_rows]


def committee_embeddings(model, max_members: int = 32, seed: int = 0) -> tuple[torch.Tensor, str]:
    """The known preferences a new user is compared against: the cluster embeddings E_k (cluster
    model), else up to ``max_members`` seen users' embeddings (individual model)."""
    _check_adaptable(model)
    um = model.user_model
    with torch.no_grad():
        if hasattr(um, "clusters"):
            return um.clusters.detach().clone(), "clusters"
        rows = list(range(1, um.n_rows))
        if not rows:
            raise ValueError("the model knows no users to compare a new user with")
        if len(rows) > max_members:
            rows = sorted(random.Random(seed).sample(rows, max_members))
        return um(torch.tensor(rows, device=um._table().device)).detach().clone(), "seen users"


def disagreement_scores(model, candidates: list[dict], reference=None, max_members: int = 32, beta: float = 0.1,
                        batch_size: int = 16, max_length: int | None = 1024, max_prompt_length: int | None = 512,
                        seed: int = 0) -> list[float]:
    """Per candidate pair: the variance, across the committee (``committee_embeddings``), of the
    preference probability sigma(beta * margin) for its first response; high when known users
    confidently disagree about it (query by committee). Labels in the candidates are ignored.
    Candidates the tokenizer leaves empty get -1."""
    from .evaluation import pair_margins

    embeddings, _ = committee_embeddings(model, max_members, seed)
    unlabeled = [dict(c, user_id=None) for c in candidates]
    settings = model.tokenize_settings(max_length, max_prompt_length)
    examples = tokenize_dataset(unlabeled, model.tokenizer, settings, model.registry, "candidates")
    um = model.user_model
    ref_cache: dict = {}
    margins = []
    model.eval()
    model.user_model = _CommitteeUserModel(embeddings)
    try:
        with torch.no_grad():
            for k in range(embeddings.shape[0]):
                margins.append(pair_margins(model, examples, [k] * len(examples), reference, batch_size, ref_cache))
    finally:
        model.user_model = um
    m = torch.tensor(margins)  # (members, n examples)
    var = torch.sigmoid(beta * m).var(dim=0, unbiased=False)
    scores = [-1.0] * len(candidates)
    for ex, v in zip(examples, var.tolist()):
        scores[ex["index"]] = v
    return scores


def suggest_pairs(model, candidates: list[dict], n: int, reference=None, strategy: str = "active", seed: int = 0,
                  **score_kwargs) -> list[int]:
    """Indices of the ``n`` candidates to ask a new user about: ``active`` ranks by committee
    disagreement (``disagreement_scores``) and takes at most one pair per prompt while others
    remain; ``random`` draws uniformly (the baseline)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if strategy == "random":
        order = list(range(len(candidates)))
        random.Random(seed).shuffle(order)
        return order[:n]
    if strategy != "active":
        raise ValueError(f"strategy must be 'active' or 'random', got {strategy!r}")
    scores = disagreement_scores(model, candidates, reference, seed=seed, **score_kwargs)
    ranked = sorted((i for i in range(len(candidates)) if scores[i] >= 0), key=lambda i: (-scores[i], i))
    picked, prompts = [], set()
    for i in ranked:  # diversity first: one pair per prompt
        p = json.dumps(candidates[i]["prompt"])
        if p not in prompts:
            picked.append(i)
            prompts.add(p)
        if len(picked) == n:
            return picked
    for i in ranked:
        if i not in picked:
            picked.append(i)
            if len(picked) == n:
                break
    return picked


# -- the commands: a model folder in, a model folder (or suggested pairs) out ------------------------


def adapt_folder(cfg) -> tuple:
    """``prlhf adapt``: adapt the users of ``cfg.data`` (an ``AdaptConfig``) in the model folder
    ``cfg.model`` and write the result to ``cfg.output`` (with ``adaptation.json``, and the
    training's ``training_args.json``). Returns (model, ``AdaptResult``)."""
    torch.manual_seed(cfg.seed)
    records = load_preference_data(cfg.data)
    source = resolve_saved_model(cfg.model)
    load = {"dtype": getattr(cfg, "dtype", "float32")}
    model = PersonalizedLM.from_pretrained(source, device=getattr(cfg, "device", None), **load)
    objective = training_objective(source)
    result = adapt_users(model, records, load_reference(model, cfg.reference, **load), steps=cfg.steps,
                         learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, reset=cfg.reset, beta=cfg.beta,
                         sft_weight=cfg.sft_weight, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                         seed=cfg.seed, objective=objective, name=cfg.data)
    extra = {"adaptation.json": json.dumps({**result.to_dict(), "data": cfg.data, "from": str(cfg.model)}, indent=1)}
    if (Path(source) / TRAINING_ARGS_NAME).is_file():
        extra[TRAINING_ARGS_NAME] = (Path(source) / TRAINING_ARGS_NAME).read_text(encoding="utf-8")
    model.save_pretrained(cfg.output, extra_files=extra)
    return model, result


def suggest_for_folder(cfg) -> tuple[list[dict], int]:
    """``prlhf adapt --suggest N``: the ``cfg.suggest`` candidate pairs of ``cfg.candidates`` to ask
    a new user about, ranked, as records (``user_id`` = ``cfg.user`` when given, ``suggest_rank``,
    ``candidate_index``). Returns (records, number of candidates)."""
    torch.manual_seed(cfg.seed)
    candidates = load_preference_data(cfg.candidates)
    load = {"dtype": getattr(cfg, "dtype", "float32")}
    model = PersonalizedLM.from_pretrained(cfg.model, device=getattr(cfg, "device", None), **load)
    objective = training_objective(resolve_saved_model(cfg.model))
    picked = suggest_pairs(model, candidates, cfg.suggest, load_reference(model, cfg.reference, **load), cfg.strategy, cfg.seed,
                           beta=cfg.beta or objective.get("beta", 0.1), batch_size=cfg.batch_size,
                           max_length=cfg.max_length or objective.get("max_length", 1024),
                           max_prompt_length=cfg.max_prompt_length or objective.get("max_prompt_length", 512))
    out = []
    for rank, i in enumerate(picked):
        rec = {k: v for k, v in candidates[i].items() if k not in ("index", "_line")}
        if cfg.user is not None:
            rec["user_id"] = cfg.user
        rec.update(suggest_rank=rank + 1, candidate_index=i)
        out.append(rec)
    return out, len(candidates)


__all__ = ["AdaptResult", "adapt_users", "training_objective", "suggest_pairs", "disagreement_scores",
           "committee_embeddings", "adapt_folder", "suggest_for_folder"]
