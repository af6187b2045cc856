"""Hub round trip without a network: `push_to_hub` through an `HfApi`-shaped object that writes a
local folder, and `from_pretrained("owner/name")` through `huggingface_hub.snapshot_download`
reading a local Hugging Face cache; plus the model card and the loading options."""

import json
import shutil

import pytest
import torch
from conftest import build_model, collate, two_user_records

from prlhf.modeling import PersonalizedLM


class LocalHub:
    """The two `HfApi` calls `push_to_hub` makes, writing under a local folder."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None):
        self.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/0"


def margins(model, records):
    batch = collate(model, records)
    with torch.no_grad():
        return model.term_logps(batch, [(batch["user_rows"], None)])


def as_cached_repo(hub_cache, repo_id, files_dir):
    """Lay a folder out as the Hugging Face cache does for a downloaded model repository."""
    commit = "0" * 40
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_dir, repo / "snapshots" / commit)


def test_push_then_load_by_repo_id_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    model = build_model(users=("long_fan", "short_fan"))
    records = two_user_records(n_prompts=2)
    hub = LocalHub(tmp_path / "hub")
    url = model.push_to_hub("me/personalized", private=True, api=hub)
    assert url.endswith("/commit/0") and [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    pushed = tmp_path / "hub" / "me" / "personalized"
    for name in ("prlhf_config.json", "users.json", "user_model.safetensors", "manifest.json", "README.md"):
        assert (pushed / name).is_file(), name

    cache = tmp_path / "hf_cache"
    as_cached_repo(cache, "me/personalized", pushed)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    loaded = PersonalizedLM.from_pretrained("me/personalized", local_files_only=True)
    assert torch.allclose(margins(loaded, records), margins(model, records), atol=1e-6)

    with pytest.raises(FileNotFoundError, match="me/absent: no such local folder, and fetching it"):
        PersonalizedLM.from_pretrained("me/absent", local_files_only=True)


def test_model_card_describes_the_model(tmp_path):
    model = build_model(users=("a", "b"))
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: prlhf\nbase_model: \"tiny-llama\"")
    assert "| user model | individual (e_0 plus a per-user offset) |" in card
    assert "| users | 2 known" in card and "| user tokens (T_u) | 3 |" in card
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert "README.md" in manifest["files"]


def test_loading_options_dtype_and_device(tmp_path):
    model = build_model(users=("long_fan", "short_fan"))
    model.save_pretrained(tmp_path / "m")
    bf16 = PersonalizedLM.from_pretrained(tmp_path / "m", dtype="bfloat16", device="cpu")
    assert next(bf16.llm.parameters()).dtype == torch.bfloat16
    records = two_user_records(n_prompts=2)
    assert torch.allclose(margins(bf16, records).float(), margins(model, records), atol=0.5)  # bf16 rounding only
    eager = PersonalizedLM.from_pretrained(tmp_path / "m", attn_implementation="eager")
    assert eager.llm.config._attn_implementation == "eager"
    assert torch.allclose(margins(eager, records), margins(model, records), atol=1e-4)
    with pytest.raises(ValueError, match="dtype must be one of"):
        PersonalizedLM.from_pretrained(tmp_path / "m", dtype="float8")
