"""Saving and loading personalized models: one folder (base weights or LoRA adapter, tokenizer,
``user_model.safetensors``, ``users.json``, ``prlhf_config.json``, the ``README.md`` model card and
``manifest.json``), written atomically as a whole and verified on load; Hub upload and download
through ``huggingface_hub``.

This module sits below ``prlhf.modeling``: it knows a personalized model by its attributes (``llm``,
``tokenizer``, ``user_model``, ``registry``, ``prlhf_config``), and ``load_personalized`` is given
the class to build."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base_models import load_model_and_tokenizer, resolve_device
from .card import model_card
from .config.training import PersonalizationConfig
from .guards import check_finite
from .storage import MANIFEST_NAME, MODEL_SUFFIXES, IntegrityError, read_manifest, recover_folder, save_folder, verify_manifest
from .user_models import ClusterUserModel, IndividualUserModel, build_user_model
from .users import UserRegistry

logger = logging.getLogger(__name__)

CONFIG_NAME = "prlhf_config.json"
USER_MODEL_NAME = "user_model.safetensors"
USERS_NAME = "users.json"


def save_personalized(model: nn.Module, save_directory: str | os.PathLike, state_dict: dict | None = None,
                    extra_files: dict[str, str] | None = None, card_training: dict | None = None,
                    card_metrics: dict | None = None, extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
                    card_kind: str = "policy") -> None:
    """Write the base model (or LoRA adapter), tokenizer, user model (safetensors), user
    registry, ``prlhf_config.json``, ``extra_files`` ({name: text}), ``extra_tensors`` ({file name:
    {tensor name: tensor}}, as safetensors: e.g. a reward head) and ``manifest.json`` (each file's
    SHA-256) as one folder, atomically: a kill leaves the old folder or the new one. Non-finite
    weights are refused (``NonFiniteError``), never written.

    ``state_dict``: the model's full state dict (keys ``llm.*`` and ``user_model.*``) to write
    instead of the parameters held by ``model``: what a sharded run (FSDP, DeepSpeed ZeRO-3)
    gathers, where each process holds only its shard."""
    if state_dict is None:
        check_finite({n: p for n, p in model.named_parameters() if p.requires_grad}, f"the weights to save in {save_directory}")
        llm_state, user_state = None, model.user_model.state_dict() if model.user_model is not None else {}
    else:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        check_finite({n: v for n, v in state_dict.items() if n in trainable}, f"the weights to save in {save_directory}")
        llm_state = {k[len("llm."):]: v for k, v in state_dict.items() if k.startswith("llm.")}
        user_state = {k[len("user_model."):]: v for k, v in state_dict.items() if k.startswith("user_model.")}

    def write(tmp: Path):
        model.llm.save_pretrained(tmp, **({"state_dict": llm_state} if llm_state is not None else {}))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        if model.user_model is not None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in user_state.items()}
            save_file(tensors, str(tmp / USER_MODEL_NAME), metadata={"format": "pt", "kind": model.prlhf_config.user_model})
        model.registry.save(tmp / USERS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(asdict(model.prlhf_config), indent=1))
        for name, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name), metadata={"format": "pt"})
        card = model_card(model.prlhf_config, len(model.registry), len(model.registry.user_texts), card_training, card_metrics,
                          card_kind)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")

    save_folder(Path(save_directory), write)


def load_personalized(model_cls: type, directory: str | os.PathLike, trust_remote_code: bool = False,
                    is_trainable: bool = False, device: str | torch.device | None = None,
                    **load_kwargs) -> nn.Module:
    """Restore a model written by ``save_pretrained`` from a local folder or a Hub repository
    (``owner/name``, fetched with ``huggingface_hub.snapshot_download``; ``revision`` and
    ``local_files_only`` pass through); every file is checked against ``manifest.json`` first
    (``IntegrityError`` naming the file when one differs)."""
    revision, local_files_only = load_kwargs.pop("revision", None), load_kwargs.pop("local_files_only", False)
    directory = resolve_saved_model(directory, revision=revision, local_files_only=local_files_only)
    recover_folder(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory}: not a folder")
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory}: not a prlhf model ({CONFIG_NAME} missing)")
    if not verify_manifest(directory):
        logger.warning("%s: no %s (saved by prlhf 0.1?): files are not verified", directory, MANIFEST_NAME)
    config = read_config(cfg_path)
    registry = UserRegistry.load(directory / USERS_NAME)
    if config.use_lora:
        from peft import PeftModel

        base, _ = load_model_and_tokenizer(config.base_model_name_or_path, trust_remote_code=trust_remote_code,
                                           **load_kwargs)
        llm = PeftModel.from_pretrained(base, str(directory), is_trainable=is_trainable)
        tokenizer = _load_tokenizer(directory, trust_remote_code)
    else:
        llm, tokenizer = load_model_and_tokenizer(str(directory), trust_remote_code=trust_remote_code, verify_files=False,
                                                  **load_kwargs)
    table = llm.get_input_embeddings().weight
    user_model = build_user_model(
        config.user_model, registry.n_rows, config.n_user_tokens, table.shape[1], config.n_clusters,
        config.cluster_weighting, "random", None, config.seed,
    )
    if user_model is not None:
        _load_user_weights(user_model, directory, registry)
    model = model_cls(llm, tokenizer, registry, config, user_model)
    if device is not None:
        model.to(resolve_device(device))
    model.eval()
    return model


def push_personalized(model: nn.Module, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload personalized model (prlhf)", revision: str | None = None,
                api=None) -> str:
    """Save this model (the same folder as ``save_pretrained``: weights, user model, registry,
    config, model card, manifest) and upload it with ``huggingface_hub``: ``create_repo`` then
    ``upload_folder``. ``api`` is an ``HfApi`` (default: a new one). Returns the commit URL."""
    import tempfile

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prlhf-push-") as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 revision=revision)


def load_weights_into(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load a checkpoint's weights into this model in place (used to resume training)."""
    directory = Path(directory)
    if model.is_lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.llm, load_file(str(directory / "adapter_model.safetensors")))
    else:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype=next(model.llm.parameters()).dtype)
        model.llm.load_state_dict(loaded.state_dict())
    if model.user_model is not None:
        _load_user_weights(model.user_model, directory, model.registry)


def resolve_saved_model(name_or_path: str | os.PathLike, revision: str | None = None,
                        local_files_only: bool = False) -> Path:
    """A local folder as it is; ``owner/name`` that is not a local path: the Hub repository's
    snapshot (downloaded, or from the local Hugging Face cache when offline)."""
    path = Path(name_or_path)
    text = str(name_or_path)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, local_files_only=local_files_only))
    except Exception as err:  # noqa: BLE001 - offline, missing repo, auth: one clear message
        raise FileNotFoundError(f"{text}: no such local folder, and fetching it from the Hugging Face Hub failed "
                                f"({type(err).__name__}: {err})") from None


def read_config(path: Path) -> PersonalizationConfig:
    """``prlhf_config.json``, with an error naming the file and the field that is wrong."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise IntegrityError(f"{path}: expected a JSON object")
    known = {f.name for f in fields(PersonalizationConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise IntegrityError(f"{path}: unknown field(s) {unknown} (saved by a newer prlhf?)")
    return PersonalizationConfig(**raw)


def _load_user_weights(user_model: nn.Module, directory: Path, registry: UserRegistry) -> None:
    """The user model's tensors, checked against the module (and so against ``users.json``)."""
    path = directory / USER_MODEL_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: {USER_MODEL_NAME} is missing (the config names a user model)")
    try:
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for damaged files
        raise IntegrityError(f"{path}: unreadable safetensors file ({err})") from None
    expected = user_model.state_dict()
    if set(state) != set(expected):
        raise IntegrityError(f"{path}: holds tensors {sorted(state)}, the user model expects {sorted(expected)}")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise IntegrityError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)} but {directory / USERS_NAME} has "
                f"{registry.n_rows} rows (generic user + {registry.n_rows - 1} users) and the config expects "
                f"{tuple(expected[name].shape)}: users.json and the weights do not belong together")
    user_model.load_state_dict(state)


def _load_tokenizer(directory: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# -- what a model folder holds about its users: list, export, removal ------------------------------------------------------------------------------


def _read_folder(directory: Path, with_tensors: bool = True) -> tuple[dict, UserRegistry, dict[str, torch.Tensor]]:
    """Config, registry and (``with_tensors``) user-model tensors of a saved model; only the files
    read are checked against the manifest (the base weights are not hashed to list users)."""
    recover_folder(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory}: not a prlhf model ({CONFIG_NAME} missing)")
    read = [CONFIG_NAME, USERS_NAME] + ([USER_MODEL_NAME] if with_tensors else [])
    if not verify_manifest(directory, names=read):
        logger.warning("%s: no %s: files are not verified", directory, MANIFEST_NAME)
    config = read_config(directory / CONFIG_NAME)
    registry = UserRegistry.load(directory / USERS_NAME)
    path = directory / USER_MODEL_NAME
    tensors = load_file(str(path)) if with_tensors and path.is_file() else {}
    return config, registry, tensors


# user model kind -> its class, which names the per-user tensor and the row stored at its index 0
_PER_USER = {"individual": IndividualUserModel, "cluster": ClusterUserModel}


def list_users(directory: str | os.PathLike) -> list[dict]:
    """One row per user of a saved model: id, row, pair count, whether a text is stored."""
    _, registry, _ = _read_folder(Path(directory), with_tensors=False)
    return [{"user_id": uid, "row": registry.row(uid), "n_pairs": registry.pair_counts.get(uid),
             "has_text": uid in registry.user_texts} for uid in registry.ids]


def _export(directory: Path, config, registry: UserRegistry, tensors: dict, user_id: str) -> dict:
    if user_id not in registry:
        raise KeyError(f"{directory}: no user {user_id!r} (the model knows {len(registry)} users; "
                       f"`prlhf users list --model {directory}` lists them)")
    row = registry.row(user_id)
    parameters: dict = {}
    cls = _PER_USER.get(config.user_model)
    if cls is not None and cls.per_user_param in tensors:
        value = tensors[cls.per_user_param][row - cls.first_row].float()
        parameters[cls.per_user_param] = value.tolist()
        if config.user_model == "cluster":
            w = value.softmax(-1) if config.cluster_weighting == "softmax" else value
            parameters["cluster_weights"] = w.tolist()
    return {"user_id": user_id, "row": row, "user_model": config.user_model, "parameters": parameters,
            "user_text": registry.user_texts.get(user_id), "n_pairs": registry.pair_counts.get(user_id),
            "model": str(directory)}


def export_user(directory: str | os.PathLike, user_id: str) -> dict:
    """Everything the model folder holds about one user, as JSON-ready data: their own
    parameters (individual: the offset o_u, T_u x d; cluster: the K mixture logits and weights),
    their text and their pair count."""
    directory = Path(directory)
    return _export(directory, *_read_folder(directory), user_id)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # files are replaced, never changed in place: a hard link is a safe copy
    except OSError:
        shutil.copy2(src, dst)


def remove_user(directory: str | os.PathLike, user_id: str) -> dict:
    """Forget one user: their parameters, registry entry, text and counts are deleted and the
    folder is rewritten atomically (a kill leaves the old folder or the new one). The id is served
    as the generic user from then on; every other user's parameters keep their values (they move
    up one row). The shared weights were trained on the user's pairs too: removing those needs
    retraining without them. Returns what was removed (``export_user``)."""
    directory = Path(directory)
    config, registry, tensors = _read_folder(directory)
    removed = _export(directory, config, registry, tensors, user_id)
    row = registry.remove(user_id)
    cls = _PER_USER.get(config.user_model)
    if cls is not None and cls.per_user_param in tensors:
        t = tensors[cls.per_user_param]
        i = row - cls.first_row
        tensors[cls.per_user_param] = torch.cat([t[:i], t[i + 1:]]).contiguous()
    manifest = read_manifest(directory)
    if manifest is not None:
        saved = sorted(manifest["files"])
    else:  # a folder from before manifests: its top-level model files
        saved = sorted(e.name for e in directory.iterdir() if e.is_file() and e.name.endswith(MODEL_SUFFIXES))
    changed = {USERS_NAME, USER_MODEL_NAME, MANIFEST_NAME}

    def write(tmp: Path) -> None:
        # the rest of the saved model, unchanged (other entries, such as checkpoints, are carried over by save_folder)
        for rel in saved:
            if rel in changed:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(directory / rel, tmp / rel)
        registry.save(tmp / USERS_NAME)
        if tensors:
            save_file(tensors, str(tmp / USER_MODEL_NAME), metadata={"format": "pt", "kind": config.user_model})

    save_folder(directory, write)
    return removed
