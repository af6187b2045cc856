"""Configs of the commands that are not training runs (``prlhf eval``, ``generate``, ``rm eval``,
``rm score``, ``adapt``, ``users``, ``serve``, ``judge``, ``demo``): each command is a thin shell
that parses one of these from ``--config FILE.yaml`` plus flags (YAML keys are the field names;
flags are spelled with hyphens or underscores; flags win)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..base_models import DTYPES
from .option import option

GENERATE_PROMPTS = ("own", "shared")  # `prlhf eval --generate-prompts`: whose held-out prompts each user answers


@dataclass
class LoadingOptions:
    """How saved models are loaded for evaluation and generation."""

    dtype: str = option("float32", "float32 (default), bfloat16, float16 or auto (the checkpoint's own)")
    attn_implementation: str | None = option(None, "sdpa, eager, flash_attention_2, ... (default: transformers' choice)")
    device: str = option("auto", "auto (a GPU when there is one), cpu, cuda, cuda:1, mps, ...")
    repetition_penalty: float | None = option(None, "transformers' repetition_penalty for generation (> 1 discourages "
                                             "repeats; small models loop under greedy decoding)")
    no_repeat_ngram_size: int | None = option(None, "never repeat an n-gram of this size in generations")

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.repetition_penalty is not None and not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"--repetition-penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size is not None and self.no_repeat_ngram_size < 1:
            raise ValueError(f"--no-repeat-ngram-size must be >= 1, got {self.no_repeat_ngram_size}")

    def load_kwargs(self) -> dict:
        return {"dtype": self.dtype, "attn_implementation": self.attn_implementation, "device": self.device}

    def generation_kwargs(self) -> dict:
        kw = {}
        if self.repetition_penalty is not None:
            kw["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size is not None:
            kw["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return kw


@dataclass
class EvalConfig(LoadingOptions):
    """``prlhf eval``: implicit-reward accuracy (seen, generic, unseen, per user, with bootstrap CIs)
    of one or several saved models, and optionally generations with their lengths, user-match rate
    and user-swap flip rate."""

    model: list[str] = option(None, "folder(s) written by `prlhf train` (repeat --model, or list several, to compare; "
                             "the first is the baseline of the paired differences)")
    data: list[str] = option(None, "preference pairs (JSONL) to score, e.g. test.jsonl unseen.jsonl")
    output: str | None = option(None, "metrics.json to write")
    reference: str | None = option(None, "pi_SFT (default: the one recorded at training time)")
    users: str | None = option(None, "users.json of the data (groups for generation lengths)")
    generate: int = option(0, "generate for N held-out prompts per user")
    generate_prompts: str = option("own", "own: each user's own held-out prompts; shared: the same N prompts (drawn from "
                                   "every user's) for each user, so group lengths compare on the same posts")
    train_data: str | None = option(None, "training pairs whose chosen responses define each user's (or group's) TF-IDF "
                                   "centroid for the user-match rate (default: train.jsonl beside --users)")
    max_new_tokens: int = option(64, "new tokens per generation at most")
    report: str | None = option(None, "folder for report.md, report.json, plots and generations.jsonl")
    batch_size: int = option(8, "pairs (or prompts) per batch")
    max_length: int = option(1024, "maximum prompt + response tokens per sequence")
    max_prompt_length: int = option(512, "maximum prompt tokens")
    per_pair: bool = option(False, "also write each pair's margin into metrics.json")
    max_pairs_per_user: int | None = option(None, "score at most the first N pairs of each user")

    def __post_init__(self):
        super().__post_init__()
        if not self.model:
            raise ValueError("--model is required (a folder written by `prlhf train`)")
        if not self.data:
            raise ValueError("--data is required (preference pairs to score)")
        for name in ("generate", "max_new_tokens", "batch_size", "max_length", "max_prompt_length"):
            if getattr(self, name) < (0 if name == "generate" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.generate_prompts not in GENERATE_PROMPTS:
            raise ValueError(f"--generate-prompts must be one of {', '.join(GENERATE_PROMPTS)}, got {self.generate_prompts!r}")


@dataclass
class GenerateConfig(LoadingOptions):
    """``prlhf generate``: personalized generation for one prompt or a JSONL file of prompts."""

    model: str | None = option(None, "folder written by `prlhf train` (or a Hub repository owner/name), or any causal LM "
                              "(served alike for every user)")
    user: str | None = option(None, "user id (unknown or omitted: the generic user)")
    user_text: str | None = option(None, "the user's text (explicit user model)")
    prompt: str | None = option(None, "one prompt")
    input: str | None = option(None, "JSONL of records with 'prompt' and 'user_id' (and optional 'user_text')")
    output: str | None = option(None, "JSONL to write (batch mode)")
    batch_size: int = option(8, "prompts per generate() call")
    max_new_tokens: int = option(64, "new tokens per generation at most")
    do_sample: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling")
    seed: int = option(0, "random seed")
    best_of: int = option(1, "personalized best-of-n: sample N responses per prompt and keep the one --reward-model "
                         "scores highest for the prompt's user (sampling implied)")
    reward_model: str | None = option(None, "reward model folder written by `prlhf rm train` (for --best-of)")

    def __post_init__(self):
        super().__post_init__()
        if not self.model:
            raise ValueError("--model is required (a folder written by `prlhf train`, or any causal LM)")
        if (self.prompt is None) == (self.input is None):
            raise ValueError("give either --prompt or --input")
        if self.best_of < 1:
            raise ValueError(f"--best-of must be >= 1, got {self.best_of}")
        if self.best_of > 1 and not self.reward_model:
            raise ValueError("--best-of N needs --reward-model DIR (a folder written by `prlhf rm train`)")


@dataclass
class RMEvalConfig(LoadingOptions):
    """``prlhf rm eval``: reward accuracy of saved reward models (``prlhf rm train``) on held-out
    pairs, in the ``metrics.json`` shape of ``prlhf eval``; a policy folder among ``--model`` is
    scored by its implicit reward, so P-RM and P-DPO accuracies sit side by side."""

    model: list[str] = option(None, "reward model folder(s) written by `prlhf rm train`, or policy folders written by "
                             "`prlhf train` (implicit reward); the first is the baseline of the paired differences")
    data: list[str] = option(None, "preference pairs (JSONL) to score, e.g. test.jsonl unseen.jsonl")
    output: str | None = option(None, "metrics.json to write")
    report: str | None = option(None, "folder for report.md, report.json and the per-user plot")
    users: str | None = option(None, "users.json of the data (user groups for the flip rate and the plot)")
    reference: str | None = option(None, "pi_SFT of policy folders (default: the one recorded at training time)")
    batch_size: int = option(16, "pairs per batch")
    max_length: int = option(1024, "maximum prompt + response tokens per sequence")
    max_prompt_length: int = option(512, "maximum prompt tokens")
    per_pair: bool = option(False, "also write each pair's margin into metrics.json")

    def __post_init__(self):
        super().__post_init__()
        if not self.model:
            raise ValueError("--model is required (a folder written by `prlhf rm train`)")
        if not self.data:
            raise ValueError("--data is required (preference pairs to score)")
        for name in ("batch_size", "max_length", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


@dataclass
class RMScoreConfig(LoadingOptions):
    """``prlhf rm score``: the reward of each (prompt, response, user) row of a JSONL file."""

    model: str | None = option(None, "reward model folder written by `prlhf rm train`")
    input: str | None = option(None, "JSONL rows with 'prompt', 'response' and optional 'user_id', 'user_text'")
    output: str | None = option(None, "JSONL to write: the input rows, each with 'reward' added")
    batch_size: int = option(16, "rows per batch")
    max_length: int = option(1024, "maximum prompt + response tokens per row")
    max_prompt_length: int = option(512, "maximum prompt tokens")

    def __post_init__(self):
        super().__post_init__()
        for name in ("model", "input", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        for name in ("batch_size", "max_length", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


@dataclass
class AdaptConfig:
    """``prlhf adapt``: few-shot adaptation (add the users of a few labelled pairs to a trained model
    and fit only their own parameters, everything else frozen), or, with ``suggest``, pick the
    candidate comparisons to ask a new user about."""

    model: str | None = option(None, "a trained model folder (individual or cluster user model)")
    data: str | None = option(None, "labelled pairs of the users to adapt (JSONL or JSON, the usual preference format)")
    output: str | None = option(None, "adaptation: the model folder to write (may be --model itself); --suggest: the "
                                "JSONL file to write (default: standard output)")
    steps: int = option(30, "optimizer steps")
    reset: bool = option(False, "users the model already knows restart as the generic user instead of continuing "
                         "from their current parameters")
    learning_rate: float | None = option(None, "Adam learning rate of the users' parameters (default: the training's "
                                         "user learning rate, else 1e-2; at least 0.1 for a cluster model's mixture "
                                         "logits)")
    batch_size: int = option(16, "pairs per batch")
    beta: float | None = option(None, "default: the training's beta (training_args.json), else 0.1")
    sft_weight: float | None = option(None, "default: the training's")
    max_length: int | None = option(None, "default: the training's, else 1024")
    max_prompt_length: int | None = option(None, "default: the training's, else 512")
    reference: str | None = option(None, "pi_SFT (default: the one the model records)")
    seed: int = option(0, "random seed")
    suggest: int | None = option(None, "pick N comparisons to ask a new user about")
    candidates: str | None = option(None, "with --suggest: unlabelled candidate pairs (prompt, chosen, rejected; the "
                                    "order of the two responses carries no label)")
    strategy: str = option("active", "with --suggest: committee disagreement (active) or uniform choice (random)",
                           choices=["active", "random"])
    user: str | None = option(None, "with --suggest: the user id written into the suggested records")
    dtype: str = option("float32", "float32 (default), bfloat16, float16 or auto (the checkpoint's own)")
    device: str = option("auto", "auto (a GPU when there is one), cpu, cuda, cuda:1, mps, ...")

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model is required (a trained model folder)")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.suggest is not None and not self.candidates:
            raise ValueError("--suggest needs --candidates PAIRS.jsonl")
        if self.suggest is None and (not self.data or not self.output):
            raise ValueError("adaptation needs --data NEW_USERS.jsonl and --output DIR2 (or --suggest N --candidates FILE)")


@dataclass
class ExportVLLMConfig:
    """``prlhf export-vllm``: a trained model as a plain LLM (LoRA merged) plus its users' embeddings
    and a client, for serving engines that take prompt embeddings (vLLM ``--enable-prompt-embeds``)."""

    model: str | None = option(None, "folder written by `prlhf train`")
    output: str | None = option(None, "folder to write (llm/, users.safetensors, prlhf_export.json, vllm_client.py, README.md)")
    dtype: str = option("float32", "dtype of the merged weights: float32 (default), bfloat16, float16 or auto")
    device: str = option("cpu", "where to merge: cpu (default), cuda, ...")

    def __post_init__(self):
        if not self.model or not self.output:
            raise ValueError("usage: prlhf export-vllm --model DIR --output DIR2")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


@dataclass
class UsersConfig:
    """``prlhf users list|export|remove``: what a trained model holds about its users: list them,
    export one user's data as JSON, or remove (forget) one user."""

    action: str | None = option(None, "list, export or remove (also the first word after `prlhf users`)",
                                choices=["list", "export", "remove"])
    model: str | None = option(None, "a trained model folder")
    user: str | None = option(None, "the user id (export, remove)")
    json: bool = option(False, "list: print JSON instead of a table")

    def __post_init__(self):
        if self.action is None:
            raise ValueError("usage: prlhf users list|export|remove --model DIR [--user ID]")
        if not self.model:
            raise ValueError("--model is required")
        if self.action != "list" and self.user is None:
            raise ValueError(f"prlhf users {self.action} needs --user ID")


@dataclass
class ServeConfig:
    """``prlhf serve``: an OpenAI-compatible server (chat and text completions, streaming) for a
    personalized model; the request's ``user`` selects the user embedding."""

    model: str | None = option(None, "a model folder written by `prlhf train`, or any causal LM")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/ routes")
    served_model_name: str | None = option(None, "the model id in /v1/models (default: the folder's name)")
    max_batch_size: int = option(16, "rows decoded together at most")
    batch_wait_ms: float = option(5.0, "how long the first request of a new batch waits for others")
    max_tokens_limit: int = option(1024, "largest max_tokens a request may ask for")
    continuous_batching: bool = option(True, "rows join the running batch between tokens as others finish (false: a "
                                       "batch runs to its end before the next starts)")
    dtype: str = option("float32", "float32 (default), bfloat16, float16 or auto (the checkpoint's own)")
    device: str = option("auto", "auto (a GPU when there is one), cpu, cuda, cuda:1, mps, ...")

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model is required")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch_size", "max_tokens_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms}")


@dataclass
class JudgeConfig:
    """``prlhf judge``: pairwise LLM-as-judge win rates of method A against method B over an
    OpenAI-compatible endpoint, from the generations.jsonl of `prlhf eval --generate N --report DIR`."""

    generations: str | None = option(None, "generations.jsonl written by `prlhf eval --generate N --report DIR`")
    a: str | None = option(None, "method A (its name in generations.jsonl)")
    b: str | None = option(None, "method B")
    base_url: str | None = option(None, "e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1")
    model: str | None = option(None, "the judge model's name at that endpoint")
    template: str = option("generic", "generic, psoups, prism, or a template file of your own "
                           "(`prlhf judge --show-template psoups > mine.txt` prints one to start from)")
    api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the key")
    output: str | None = option(None, "judge.json to write")
    cache: str | None = option(None, "judgment cache (default: OUTPUT with .cache.jsonl)")
    concurrency: int = option(4, "requests in flight at once")
    max_pairs: int | None = option(None, "judge at most this many pairs")
    show_template: str | None = option(None, "print a built-in template (generic, psoups, prism) and exit")

    def __post_init__(self):
        if self.show_template is not None:
            return
        for name in ("generations", "a", "b", "base_url", "model", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')} is required")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be positive, got {self.concurrency}")


@dataclass
class DemoConfig:
    """``prlhf demo``: P-DPO vs vanilla DPO on synthetic conflicting preferences, tiny model,
    offline, a few minutes on 2 CPU cores."""

    output: str = option("outputs/demo", "folder for data, models, report.md, report.json, plots")
    seed: int = option(0, "random seed")
    ablations: bool = option(False, "also T_u = 1 and alpha = 1 (the paper's ablations)")


@dataclass
class RewardDemoConfig:
    """``prlhf rm demo``: a P-RM against a vanilla reward model, and personalized best-of-n, on the
    demo's task."""

    output: str = option("outputs/reward_demo", "folder for data, models, report.md, report.json, findings.json")
    seed: int = option(0, "random seed")
    best_of: int = option(8, "samples per prompt for best-of-n")
