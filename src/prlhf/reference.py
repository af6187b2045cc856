"""Reference log-probs computed once and cached on disk.

P-DPO's reference pi_SFT(y|x) sees no user input and never changes during training, so its
log-probs of every chosen and rejected response are computed in one pass before training (no
gradients, the LM head at response positions only, chosen and rejected packed on one shared
prompt) and stored in ``<cache dir>/<key>.safetensors``. The key is a SHA-256 over

* the reference weights (every tensor of the state dict; LoRA adapters excluded: with adapters
  disabled the reference is the base model),
* the tokenizer (vocabulary, special tokens, chat template),
* the tokenized data (prompt, chosen and rejected token ids of every pair, in order: this also
  covers the truncation settings, which are recorded in the file's metadata for people),
* the compute dtype and the layout version,

so a second run on the same model and data (another seed, another user model, another alpha)
reuses the file, and any change of weights, tokenizer, data or truncation computes afresh. Files
are written to a temporary name and moved into place, so an interrupted pass leaves nothing half
written.

This module is the one home of pi_SFT for training, evaluation and adaptation alike: its log-probs
of a batch (``reference_pair_logps``: the user positions hidden), of a data set
(``compute_reference_logps``, ``precompute_reference_logps`` with the disk cache), one in-memory
memo (``memoized_reference``), which model it is (``training_reference``, ``load_reference``),
what a saved model records about it (``reference_record``), and when two models share it
(``reference_identity``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base_models import cache_dir, load_model_and_tokenizer, portable_path
from .guards import NonFiniteError
from .scoring import score_targets, sum_per_sequence
from .storage import atomic_write_with

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$PRLHF_REFERENCE_CACHE``, else ``$PRLHF_CACHE/reference_logps`` (default ``~/.cache/prlhf/reference_logps``)."""
    return Path(os.environ.get("PRLHF_REFERENCE_CACHE") or cache_dir() / "reference_logps")


def fingerprint_module(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights (names, dtypes, shapes, bytes), LoRA adapter tensors excluded."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer", "").replace("base_model.model.", "")
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint_tokenizer(tokenizer) -> str:
    """SHA-256 of a tokenizer's vocabulary, special tokens and chat template."""
    state = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_examples(examples: list[dict]) -> str:
    """SHA-256 of the tokenized pairs (prompt, chosen, rejected ids), in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]]).encode())
    return h.hexdigest()


def cache_key(reference_fp: str, tokenizer_fp: str, data_fp: str, dtype: str) -> str:
    parts = {"version": CACHE_VERSION, "reference": reference_fp, "tokenizer": tokenizer_fp, "data": data_fp, "dtype": dtype}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def compute_reference_logps(score: Callable[[list[dict]], torch.Tensor], examples: list[dict], batch_size: int,
                            desc: str = "reference log-probs", disable_progress: bool = False) -> torch.Tensor:
    """(N, 2) chosen / rejected log-probs of ``examples``; ``score(chunk)`` returns (2B,) for a chunk.

    Pairs are batched longest first (less padding); progress is shown."""
    from tqdm.auto import tqdm

    order = sorted(range(len(examples)), key=lambda i: -(len(examples[i]["prompt_ids"]) + len(examples[i]["chosen_ids"])
                                                          + len(examples[i]["rejected_ids"])))
    out = torch.empty(len(examples), 2, dtype=torch.float32)
    with tqdm(total=len(examples), desc=desc, unit="pair", leave=False, disable=disable_progress) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            lp = score([examples[i] for i in idx]).float().cpu()
            out[idx, 0], out[idx, 1] = lp[:len(idx)], lp[len(idx):]
            bar.update(len(idx))
    return out


# -- pi_SFT's log-probs of a batch, of a data set, once ----------------------------------------------


@torch.no_grad()
def reference_pair_logps(model: nn.Module, batch: dict, reference: nn.Module | None = None, full_logits: bool = False,
                         policy_is_reference: bool = False) -> torch.Tensor:
    """log pi_SFT(y | x) of chosen and rejected (2B,) of a collated preference batch of ``model`` (a
    ``PersonalizedLM``; plain or packed), user positions masked out; ``reference`` a frozen LM, or
    None for the model's base with its LoRA adapters disabled, or, with ``policy_is_reference``
    (before training), the model's LLM as it is."""
    B = batch["user_rows"].shape[0]
    first = batch["target_seq"] < 2 * B  # one term's targets: the reference sees no user
    col = batch.get("ref_target_col", batch["target_col"])  # before_response: the first token follows the prompt
    flat = (batch["target_row"] * batch["input_ids"].shape[1] + col)[first]

    def run(llm):
        embeds = llm.get_input_embeddings()(batch["input_ids"])
        token_logps = score_targets(llm, embeds, batch, flat, batch["target_ids"][first], hide_user=True,
                                    full_logits=full_logits)
        return sum_per_sequence(token_logps, batch["target_seq"][first], 2 * B)

    if reference is not None:
        return run(reference)
    if model.is_lora:
        with model.llm.disable_adapter():
            return run(model.llm)
    if not policy_is_reference:
        raise ValueError("a reference model is needed unless the policy is a LoRA model")
    return run(model.llm)


def memoized_reference(memo: dict, keys: list, compute: Callable[[], torch.Tensor], device=None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(2B,) reference log-probs of B pairs named by ``keys`` (hashable): from ``memo`` (key ->
    (chosen, rejected)) when every key is in it, else ``compute()`` (2B,) once and remembered."""
    if not all(k in memo for k in keys):
        ref = compute()
        B = len(keys)
        for j, k in enumerate(keys):
            memo[k] = (ref[j].item(), ref[B + j].item())
    return torch.tensor([memo[k][0] for k in keys] + [memo[k][1] for k in keys], dtype=dtype, device=device)


def pair_reference_logps(model: nn.Module, examples: list[dict], reference: nn.Module | None, batch_size: int,
                         packing: bool = False, full_logits: bool = False, policy_is_reference: bool = False,
                         desc: str = "reference log-probs", disable_progress: bool = True, device=None,
                         context: Callable = contextlib.nullcontext) -> torch.Tensor:
    """(N, 2) log pi_SFT of chosen and rejected of tokenized ``examples``, in batches of the
    model's own collator (``packing``: chosen and rejected on one shared prompt), each batch
    scored inside ``context()`` (a trainer's autocast)."""
    collate = model.collator(packing=packing, with_user=False)
    device = model.device if device is None else device

    def score(chunk):
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        with context():
            return reference_pair_logps(model, batch, reference, full_logits=full_logits,
                                        policy_is_reference=policy_is_reference)

    return compute_reference_logps(score, examples, batch_size, desc, disable_progress=disable_progress)


def precompute_reference_logps(model: nn.Module, datasets: dict[str, list[dict] | None], reference: nn.Module | None,
                               batch_size: int, cache_dir: str | None, dtype_tag: str = "", meta: dict | None = None,
                               once: Callable[[str], object] = lambda desc: contextlib.nullcontext(),
                               **score_kwargs) -> tuple[int, float]:
    """Fill ``ref_logps`` (chosen, rejected) of every tokenized example of ``datasets`` (name ->
    examples) with log pi_SFT, computed in one pass (``reference``, or when None the model's LLM as
    it is now / its LoRA base: ``policy_is_reference``) or read from the disk cache in ``cache_dir``
    (None: ``default_cache_dir()``; "none": no disk cache). ``dtype_tag`` is added to the weights'
    dtype in the cache key (mixed precision), ``meta`` to the file's metadata; ``once(desc)``
    wraps each data set's computation (a distributed run's ``main_process_first``);
    ``score_kwargs`` go to ``pair_reference_logps``. Returns (cache hits, seconds computing)."""
    datasets = {name: examples for name, examples in datasets.items() if examples}
    hits, total = 0, 0.0
    if not datasets:
        return hits, total
    module = reference if reference is not None else model.llm
    dtype = str(next(module.parameters()).dtype) + dtype_tag
    directory = None if cache_dir is not None and cache_dir.lower() == "none" else Path(cache_dir) if cache_dir else default_cache_dir()
    # the weights and the tokenizer are hashed once for all data sets
    model_fp, tok_fp = (fingerprint_module(module), fingerprint_tokenizer(model.tokenizer)) if directory else ("", "")
    meta = {**(meta or {}), "dtype": dtype}
    was_training = model.training
    model.eval()
    try:
        for name, examples in datasets.items():
            desc = f"reference log-probs ({name})"
            key = cache_key(model_fp, tok_fp, fingerprint_examples(examples), dtype) if directory else ""
            compute = lambda: pair_reference_logps(model, examples, reference, batch_size, desc=desc,  # noqa: E731
                                                   policy_is_reference=True, **score_kwargs)
            with once(desc):
                logps, hit, seconds = cached_reference_logps(examples, key, compute, directory, meta)
            where = f"{directory}/{key}.safetensors"
            logger.info("%s: reference log-probs of %d pairs %s", name, len(examples),
                        f"read from {where}" if hit else f"computed in {seconds:.1f} s" + (f", cached as {where}" if directory else ""))
            hits += int(hit)
            total += seconds
            for ex, (c, r) in zip(examples, logps.tolist()):
                ex["ref_logps"] = (c, r)
    finally:
        model.train(was_training)
    return hits, total


def cached_reference_logps(examples: list[dict], key: str, compute: Callable[[], torch.Tensor], directory: Path | None,
                           metadata: dict | None = None) -> tuple[torch.Tensor, bool, float]:
    """(logps (N, 2), hit, seconds computing): read ``<directory>/<key>.safetensors`` or compute
    and write it atomically."""
    path = Path(directory) / f"{key}.safetensors" if directory is not None else None
    if path is not None and path.is_file():
        try:
            logps = load_file(str(path))["logps"]
        except Exception as err:  # noqa: BLE001 - a damaged file is recomputed, not trusted
            logger.warning("%s: unreadable reference cache (%s); recomputing", path, err)
        else:
            if logps.shape == (len(examples), 2) and bool(torch.isfinite(logps).all()):
                return logps, True, 0.0
            if logps.shape == (len(examples), 2):
                logger.warning("%s: holds non-finite (NaN or inf) log-probs; recomputing", path)
            else:
                logger.warning("%s: holds %s log-probs for %d pairs; recomputing", path, tuple(logps.shape), len(examples))
    start = time.perf_counter()
    logps = compute()
    seconds = time.perf_counter() - start
    bad = (~torch.isfinite(logps)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteError(f"non-finite reference log-probs (NaN or inf) for {len(bad)} of {len(examples)} pairs "
                             f"(first: pair {bad[0]}); the reference model's weights or dtype are broken, nothing was cached")
    if path is not None:
        meta = {k: str(v) for k, v in {**(metadata or {}), "pairs": len(examples), "seconds": f"{seconds:.2f}"}.items()}
        atomic_write_with(path, lambda tmp: save_file({"logps": logps.contiguous()}, tmp, metadata=meta), ".safetensors")
    return logps, False, seconds


# -- which model pi_SFT is --------------------------------------------------------------------------


def training_reference(ref_path: str | None, reference_model=None, trust_remote_code: bool = False, **load_kwargs):
    """pi_SFT for training: the given object, else the model at ``ref_path`` (with LoRA too: the
    given pi_SFT, not the base), else None (the policy's own start: its LoRA base with adapters
    disabled, or the precomputed pass over the policy before the first step)."""
    if reference_model is None and ref_path is not None:
        reference_model, _ = load_model_and_tokenizer(ref_path, trust_remote_code=trust_remote_code, **load_kwargs)
    return reference_model


def reference_record(model: nn.Module, reference_model, ref_path: str | None) -> str | None:
    """What ``prlhf_config.reference_model_name_or_path`` records: the given path; for a reference
    object, the folder or hub id it was loaded from (None, with a warning, when it has none);
    None for LoRA without a reference (its base, adapters disabled); else the base model, the
    policy's starting point."""
    if ref_path is not None:
        return portable_path(ref_path)
    if reference_model is not None:
        name = getattr(reference_model, "name_or_path", None) or getattr(getattr(reference_model, "config", None), "_name_or_path", None)
        if not name:
            logger.warning("the reference model passed to PDPOTrainer records no name_or_path: the saved model "
                           "cannot name its reference, so `prlhf eval` will need --reference")
            return None
        return portable_path(name)
    return None if model.is_lora else model.prlhf_config.base_model_name_or_path


def reference_identity(model: nn.Module, reference: str | None = None) -> tuple:
    """What a model's reference log-probs on given records depend on besides the records and the
    truncation: the reference (a path, or the LoRA base) and the prompt text (the user-id
    baseline rewrites prompts). Models with equal identities can share ``ref_cache``."""
    cfg = model.prlhf_config
    ref = reference or cfg.reference_model_name_or_path
    return ("reference", ref, cfg.user_id_prompt) if ref else ("lora-base", cfg.base_model_name_or_path, cfg.user_id_prompt)


def load_reference(model: nn.Module, reference: str | None = None, trust_remote_code: bool = False,
                   **load_kwargs):
    """pi_SFT for a saved model: the given path, else the one recorded at training time; None
    for LoRA models trained without a reference (their base with adapters disabled)."""
    path = reference or model.prlhf_config.reference_model_name_or_path
    if path is None:
        if model.is_lora:
            return None  # its base with the adapters disabled, as in training
        raise ValueError("this model records no reference model: pass --reference PATH (the SFT model)")
    ref, _ = load_model_and_tokenizer(path, trust_remote_code=trust_remote_code, **load_kwargs)
    return ref.to(model.device).eval()
