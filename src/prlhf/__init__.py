"""prlhf: Personalized RLHF (P-RLHF) and personalized DPO (P-DPO) for any Hugging Face causal LM.

Li, Zhou, Lipton, Leqi. "Personalized Language Modeling from Personalized Human Feedback",
arXiv 2402.05133.

Names are imported lazily, so that ``import prlhf`` (and the CLI) start fast.
"""

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "PDPOConfig": "config",
    "PSFTConfig": "config",
    "DataError": "data",
    "load_preference_data": "data",
    "evaluate_accuracy": "evaluation",
    "personalized_loss": "losses",
    "preference_loss": "losses",
    "PersonalizationConfig": "config",
    "PersonalizedLM": "modeling",
    "load_model_and_tokenizer": "base_models",
    "PDPOTrainer": "trainers.pdpo",
    "PSFTTrainer": "trainers.sft",
    "UserRegistry": "users",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'prlhf' has no attribute {name!r}")
