"""Serving beyond one machine: a trained personalized model as a plain LLM plus its users' embeddings,
for engines that take input embeddings instead of token ids (vLLM >= 0.11, ``--enable-prompt-embeds``).

``prlhf export-vllm --model DIR --output DIR2`` writes (``export_for_vllm``)::

    DIR2/llm/                    the LLM with LoRA adapters merged, and its tokenizer (safetensors)
    DIR2/users.safetensors       each user's implicit embedding (T_u, d), and the generic user's
    DIR2/prlhf_export.json       the layout: user position, T_u, user-text and user-id-prompt settings, users' texts
    DIR2/vllm_client.py          a client (``python -m prlhf.export``): a request's user -> its prompt embeddings -> vLLM
    DIR2/README.md               the two commands

``UserPromptEmbedder(DIR2)`` builds, for a prompt and a user (an id, a text, or neither: the generic
user), exactly the (T, d) input embeddings ``PersonalizedLM.generate`` feeds the LLM, from the tokenizer,
the LLM's token-embedding matrix (read alone from the safetensors files) and the users' embeddings: it
needs neither the LLM in memory nor the user model, so one embedder can sit in front of any number of
engine replicas. Positions start at 0, as vLLM numbers prompt embeddings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

EXPORT_CONFIG = "prlhf_export.json"
USERS_FILE = "users.safetensors"
GENERIC_KEY = "__generic__"


def _embedding_key(llm, folder: Path) -> tuple[str, str]:
    """(safetensors file, tensor name) of the input embedding matrix in a saved LLM folder."""
    from safetensors import safe_open

    weight = llm.get_input_embeddings().weight
    names = [n for n, p in llm.named_parameters(remove_duplicate=False) if p is weight]
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    for name in names:
        file = weight_map.get(name) if weight_map is not None else "model.safetensors"
        if file and (folder / file).is_file():
            with safe_open(str(folder / file), framework="pt") as f:
                if name in f.keys():
                    return file, name
    raise ValueError(f"{folder}: the input embedding matrix ({', '.join(names)}) is not among the saved tensors")


def export_for_vllm(model_dir: str | os.PathLike, output: str | os.PathLike, dtype: str | None = None,
                    device: str | None = None) -> Path:
    """Write ``output`` (see the module docstring) from a folder written by ``prlhf train``; atomic."""
    from safetensors.torch import save_file

    from .modeling import PersonalizedLM
    from .storage import check_output_path, save_folder

    check_output_path(output, "--output")
    load = {"dtype": dtype} if dtype else {}
    model = PersonalizedLM.from_pretrained(model_dir, device=device, **load)
    cfg = model.prlhf_config
    if cfg.user_position not in ("prefix", "before_response"):
        raise ValueError(f"{model_dir}: user_position {cfg.user_position!r} cannot generate (a reward model's layout)")
    users = list(model.registry.ids)
    with torch.no_grad():
        implicit = {}
        if model.user_model is not None and model.n_implicit_tokens > 0:
            rows = model.user_rows_for([None, *users])
            for s in range(0, len(rows), 4096):
                block = model.user_model(rows[s:s + 4096]).float().cpu()
                for k, uid in enumerate(([GENERIC_KEY] + users)[s:s + 4096]):
                    implicit[uid] = block[k].contiguous()
    llm = model.merged_llm()

    def write(tmp: Path) -> None:
        llm.save_pretrained(tmp / "llm", safe_serialization=True)
        model.tokenizer.save_pretrained(tmp / "llm")
        file, name = _embedding_key(llm, tmp / "llm")
        save_file(implicit or {GENERIC_KEY: torch.zeros(0, llm.get_input_embeddings().weight.shape[1])},
                  str(tmp / USERS_FILE), metadata={"format": "pt"})
        config = {"format": 1, "source": str(Path(model_dir).resolve()), "user_model": cfg.user_model,
                  "user_position": cfg.user_position, "n_implicit_tokens": int(model.n_implicit_tokens),
                  "max_user_text_tokens": int(cfg.max_user_text_tokens), "user_id_prompt": cfg.user_id_prompt,
                  "embedding_file": file, "embedding_key": name, "users": users,
                  "user_texts": dict(model.registry.user_texts), "hidden_size": int(llm.get_input_embeddings().weight.shape[1])}
        (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=1))
        (tmp / "vllm_client.py").write_text(CLIENT_SCRIPT)
        (tmp / "README.md").write_text(README.format(name=Path(output).name, source=Path(model_dir).name,
                                                     n_users=len(users), position=cfg.user_position,
                                                     t_u=int(model.n_implicit_tokens)))

    return save_folder(output, write)


class UserPromptEmbedder:
    """Prompt embeddings for a user, from an export folder (``export_for_vllm``): the same (T, d)
    tensor ``PersonalizedLM.prompt_embeds`` gives, without the LLM (only its embedding matrix)."""

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu"):
        from safetensors import safe_open
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        path = self.folder / EXPORT_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder}: no {EXPORT_CONFIG} (write the folder with `prlhf export-vllm`)")
        self.config = json.loads(path.read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder / "llm"))
        with safe_open(str(self.folder / "llm" / self.config["embedding_file"]), framework="pt", device=str(device)) as f:
            self.embedding = f.get_tensor(self.config["embedding_key"])
        self.users = {k: v.to(device=device, dtype=self.embedding.dtype)
                      for k, v in load_file(str(self.folder / USERS_FILE)).items()}
        self.user_texts = dict(self.config.get("user_texts") or {})

    def implicit(self, user_id: str | None) -> torch.Tensor:
        """The user's implicit embedding (T_u, d); the generic user's for None and unknown ids."""
        key = str(user_id) if user_id is not None and str(user_id) in self.users else GENERIC_KEY
        return self.users[key]

    def __call__(self, prompt, user_id: str | None = None, user_text: str | None = None) -> torch.Tensor:
        from .data import tokenize_prompt, with_user_id
        from .layout import build_sequence
        from .user_models import encode_user_text

        cfg, tok = self.config, self.tokenizer
        text = user_text or (self.user_texts.get(str(user_id)) if user_id is not None else None)
        text_ids = encode_user_text(tok, text, cfg["max_user_text_tokens"])
        prompt_ids = tokenize_prompt(tok, with_user_id(prompt, user_id, cfg["user_id_prompt"]))
        n = cfg["n_implicit_tokens"]
        ids, _, implicit, _ = build_sequence(prompt_ids, [], text_ids, n, tok.bos_token_id, tok.pad_token_id,
                                             cfg["user_position"])
        embeds = self.embedding[torch.tensor(ids, device=self.embedding.device)].clone()
        if n:
            at = implicit.index(True)
            embeds[at:at + n] = self.implicit(user_id)
        return embeds


def encode_embeds(embeds: torch.Tensor) -> str:
    """A tensor as vLLM's Completions API takes ``prompt_embeds``: ``torch.save``'d, base64."""
    import base64
    import io

    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


def complete(client, model: str, embedder: UserPromptEmbedder, prompt, user: str | None = None,
             user_text: str | None = None, **kwargs) -> str:
    """One completion from a vLLM server (``vllm serve DIR2/llm --enable-prompt-embeds``) for a user:
    ``client`` an ``openai.OpenAI`` pointed at it; the prompt embeddings built here."""
    out = client.completions.create(model=model, prompt="", extra_body={"prompt_embeds": encode_embeds(
        embedder(prompt, user, user_text))}, **kwargs)
    return out.choices[0].text


def main(argv: list[str] | None = None) -> int:
    """``python -m prlhf.export --folder DIR2 --user ID --prompt TEXT``: a personalized completion from
    a vLLM server that serves ``DIR2/llm`` with ``--enable-prompt-embeds``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m prlhf.export", description=main.__doc__.split("\n")[0].strip("`"))
    ap.add_argument("--folder", required=True, help="the folder written by `prlhf export-vllm`")
    ap.add_argument("--base-url", default="http://localhost:8000/v1", help="the vLLM server's OpenAI-compatible URL")
    ap.add_argument("--model", default=None, help="the model name vLLM serves (default: FOLDER/llm)")
    ap.add_argument("--user", default=None, help="user id (unknown or omitted: the generic user)")
    ap.add_argument("--user-text", default=None, help="the user's text (a new user from a text alone)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    a = ap.parse_args(argv)
    from openai import OpenAI

    client = OpenAI(base_url=a.base_url, api_key="EMPTY")
    embedder = UserPromptEmbedder(a.folder)
    print(complete(client, a.model or str(Path(a.folder) / "llm"), embedder, a.prompt, a.user, a.user_text,
                   max_tokens=a.max_tokens, temperature=a.temperature))
    return 0


CLIENT_SCRIPT = '''"""A personalized completion from a vLLM server for a user of this folder:

    vllm serve ./llm --enable-prompt-embeds              # on the GPU machine (vLLM >= 0.11)
    python vllm_client.py --user USER_ID --prompt "..."  # any machine with: pip install prlhf openai

The request's user selects its embedding (unknown: the generic user; --user-text alone: a new user
from a text); the prompt embeddings are built here (prlhf.export.UserPromptEmbedder, no LLM) and
sent as the Completions API's prompt_embeds. Options: python -m prlhf.export --help.
"""
import sys
from pathlib import Path

from prlhf.export import main

if __name__ == "__main__":
    sys.exit(main(["--folder", str(Path(__file__).resolve().parent), *sys.argv[1:]]))
'''

README = """# {name}: `{source}` exported for vLLM

Written by `prlhf export-vllm`: the LLM with its LoRA adapters merged (`llm/`), the implicit
embeddings of {n_users} users and of the generic user (`users.safetensors`, {t_u} user tokens each,
placed `{position}`), and the layout (`prlhf_export.json`).

Serve (vLLM >= 0.11, a GPU machine):

    vllm serve ./llm --enable-prompt-embeds

Ask for a user (this machine or any other with `pip install prlhf openai`):

    python vllm_client.py --base-url http://localhost:8000/v1 --user USER_ID --prompt "Q: the sea"

Offline, in Python:

    from vllm import LLM, SamplingParams
    from prlhf.export import UserPromptEmbedder
    embed = UserPromptEmbedder(".")
    llm = LLM("./llm", enable_prompt_embeds=True)
    out = llm.generate([{{"prompt_embeds": embed(prompt, user)}} for prompt, user in requests],
                       SamplingParams(max_tokens=64, temperature=0))

`UserPromptEmbedder(folder)(prompt, user_id, user_text)` is the (T, d) tensor prlhf's own
generation feeds the LLM for that user (unknown or no user: the generic user; a user text alone:
the generic user's embedding with that text), so greedy answers equal `prlhf generate`'s.
"""


if __name__ == "__main__":
    raise SystemExit(main())
