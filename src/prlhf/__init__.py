"""prlhf: Personalized RLHF (P-RLHF) and personalized DPO (P-DPO) for any Hugging Face causal LM.

Li, Zhou, Lipton, Leqi. "Personalized Language Modeling from Personalized Human Feedback",
arXiv 2402.05133.
"""

__version__ = "0.1.0"

from .config import PDPOConfig, PSFTConfig
from .data import DataError, load_preference_data
from .losses import personalized_loss, preference_loss, sequence_logps
from .modeling import PersonalizationConfig, PersonalizedLM
from .trainer import PDPOTrainer, PSFTTrainer
from .users import UserRegistry

__all__ = [
    "DataError",
    "PDPOConfig",
    "PDPOTrainer",
    "PSFTConfig",
    "PSFTTrainer",
    "PersonalizationConfig",
    "PersonalizedLM",
    "UserRegistry",
    "load_preference_data",
    "personalized_loss",
    "preference_loss",
    "sequence_logps",
]
