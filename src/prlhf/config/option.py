"""The one field helper of every config dataclass."""

import copy
from dataclasses import field


def option(default, help: str, **kw):
    """A config field with its help text (the ``--help`` of the command, the docs of the YAML key);
    ``kw`` goes to argparse through ``HfArgumentParser`` (e.g. ``choices``). Flags are spelled with
    underscores (the YAML key) and with hyphens. A list default is copied for each instance."""
    metadata = {"help": help, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)
