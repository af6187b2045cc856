"""Data sources of the paper, each one loader returning the canonical record shape.

``tldr`` (Reddit TL;DR, conflicting length preferences), ``psoups`` (P-SOUPS profiles),
``prism`` (PRISM participants with their text), ``dsp`` (domain-specific preferences) and
``synthetic`` (the embedded default data). Every converter returns a ``Conversion``
(train / test / unseen records, users, counts) written by ``write_conversion``.
"""

from .common import Conversion, write_conversion
from .dsp import convert_dsp
from .prism import convert_prism
from .psoups import convert_psoups
from .synthetic import synthesize
from .tldr import convert_tldr

CONVERTERS = {"tldr": convert_tldr, "psoups": convert_psoups, "prism": convert_prism, "dsp": convert_dsp}

__all__ = ["CONVERTERS", "Conversion", "convert_dsp", "convert_prism", "convert_psoups", "convert_tldr",
           "synthesize", "write_conversion"]
