"""Configs of ``prlhf data``: one per converter (``convert tldr|psoups|prism|dsp``), ``synth`` and
``inspect``; YAML keys are the field names, flags are spelled with hyphens or underscores."""

from __future__ import annotations

from dataclasses import dataclass

from .option import option


def _names(values) -> tuple[str, ...]:
    """A list option given as a YAML list, as several values, or comma-separated: one tuple."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(v.strip() for value in values for v in str(value).split(",") if v.strip())


@dataclass
class ConvertConfig:
    """What every ``prlhf data convert`` takes."""

    input: str | None = option(None, "local file or folder (or a hub data set name when reachable)")
    output: str | None = option(None, "folder for train.jsonl, test.jsonl, unseen.jsonl, users.json")
    test_fraction: float = option(0.1, "share of prompts held out for test.jsonl")
    seed: int = option(0, "random seed")
    overwrite: bool = option(False, "replace the conversion in a non-empty --output folder")

    def __post_init__(self):
        for name in ("input", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")

    def converter_kwargs(self) -> dict:
        """The keyword arguments of the source's converter (``prlhf.sources.CONVERTERS``)."""
        return {k: v for k, v in vars(self).items() if k not in ("output", "overwrite")}


@dataclass
class TldrConvertConfig(ConvertConfig):
    """``prlhf data convert tldr``: OpenAI summarize_from_feedback comparisons (Reddit TL;DR)."""

    label: str = option("human", "human: the worker's choice; length: the paper's conflicting length preferences",
                        choices=["human", "length"])
    long_share: float = option(0.7, "share of workers preferring longer summaries (--label length)")
    length_unit: str = option("words", "words or chars", choices=["words", "chars"])
    top_k: int = option(10, "the k most frequent workers are seen users (0: all)")
    sft_only: bool = option(False, "keep comparisons of two supervised (sup, not ppo) policies")
    max_prompt_chars: int | None = option(None, "truncate posts to this many characters")
    pool_users: int | None = option(None, "merge the seen workers into N pooled users of their preference "
                                    "(--label length): more pairs per user")
    worker_half: int | None = option(None, "keep one of two disjoint halves of the workers (ranked by comparisons, "
                                     "alternately assigned): choose settings on one half, report on the other",
                                     choices=[1, 2])
    hub_split: str = option("validation", "split of the hub data set")

    def converter_kwargs(self) -> dict:
        kw = super().converter_kwargs()
        if kw["top_k"] == 0:
            kw["top_k"] = None
        return kw


@dataclass
class PsoupsConvertConfig(ConvertConfig):
    """``prlhf data convert psoups``: P-SOUPS (RLPHF P1A.json ... P3B.json, or uid/prompt/chosen/rejected rows)."""

    unseen_users: list[str] | None = option(None, "users kept out of training (several, or comma-separated)")
    keep_preference_prompt: bool = option(False, "keep the 'Generate a response that ...' sentence")
    profiles: str | None = option(None, "folder with pref1A.txt ... pref3B.txt (profile descriptions)")
    user_text: str = option("none", "none or profile", choices=["none", "profile"])
    format: str = option("chat", "chat or text", choices=["chat", "text"])

    def converter_kwargs(self) -> dict:
        kw = super().converter_kwargs()
        kw["unseen_users"] = _names(kw["unseen_users"])
        kw["profiles_dir"] = kw.pop("profiles")
        return kw


@dataclass
class PrismConvertConfig(ConvertConfig):
    """``prlhf data convert prism``: PRISM (a folder with survey.jsonl and conversations.jsonl)."""

    unseen_fraction: float = option(0.1, "share of participants kept out of training")
    user_fields: list[str] | None = option(["stated_prefs", "self_description", "demographics"],
                                           "survey fields in user_text: stated_prefs, self_description, demographics, "
                                           "system_string (several, or comma-separated)")
    skip_ties: bool = option(False, "skip pairs whose responses got the same score")
    max_users: int | None = option(None, "only the first N participants of survey.jsonl")

    def converter_kwargs(self) -> dict:
        kw = super().converter_kwargs()
        kw["user_fields"] = _names(kw["user_fields"])
        return kw


@dataclass
class DspConvertConfig(ConvertConfig):
    """``prlhf data convert dsp``: Domain-Specific Preference JSON (query, responses per domain)."""

    unseen_users: list[str] | None = option(None, "users kept out of training (several, or comma-separated)")
    rejected_per_query: int = option(1, "rejected responses per query and user")
    rejected_pool: str = option("all", "where rejected responses come from: other domains, 'normal', or both",
                                choices=["all", "domains", "normal"])
    format: str = option("chat", "chat or text", choices=["chat", "text"])
    query_half: int | None = option(None, "keep one of two disjoint halves of the queries (odd / even records): "
                                    "choose settings on one half, report on the other", choices=[1, 2])

    def converter_kwargs(self) -> dict:
        kw = super().converter_kwargs()
        kw["unseen_users"] = _names(kw["unseen_users"])
        return kw


@dataclass
class SynthConfig:
    """``prlhf data synth``: synthetic users with conflicting preferences (no download)."""

    output: str | None = option(None, "folder for train.jsonl, test.jsonl, unseen.jsonl, users.json")
    n_users: int = option(20, "seen users")
    unseen_users: int = option(4, "unseen users")
    majority_share: float = option(0.7, "share of users with the majority's preference")
    n_prompts: int = option(150, "prompts")
    pairs_per_user: int = option(40, "pairs of each seen user")
    attributes: list[str] | None = option(["length"], "length, tone (several, or comma-separated)")
    test_fraction: float = option(0.2, "share of prompts held out for test.jsonl")
    format: str = option("text", "chat or text", choices=["chat", "text"])
    seed: int = option(0, "random seed")
    user_texts: bool = option(False, "give every user a profile text consistent with their preference (the explicit "
                              "user model)")
    unseen_pairs_per_user: int | None = option(None, "pairs of each unseen user (default: --pairs-per-user)")
    overwrite: bool = option(False, "replace the data in a non-empty --output folder")

    def __post_init__(self):
        if not self.output:
            raise ValueError("--output is required")
        self.attributes = list(_names(self.attributes))


@dataclass
class InspectConfig:
    """``prlhf data inspect FILE``: users, pairs per user, agreement, accuracy ceilings."""

    file: str | None = option(None, "preference pairs (JSONL or JSON); also the word after `prlhf data inspect`")
    json: bool = option(False, "print JSON instead of a table")

    def __post_init__(self):
        if not self.file:
            raise ValueError("usage: prlhf data inspect FILE [--json]")


CONVERT_CONFIGS = {"tldr": TldrConvertConfig, "psoups": PsoupsConvertConfig, "prism": PrismConvertConfig,
                   "dsp": DspConvertConfig}
