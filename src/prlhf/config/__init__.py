"""Every config dataclass of prlhf, one module per kind: ``training`` (SFT, P-DPO, P-RM, and the
``PersonalizationConfig`` a saved model records), ``commands`` (eval, generate, rm eval / score,
adapt, users, serve, judge, demo) and ``data`` (``prlhf data``); ``option`` is their one field
helper and ``parse`` their one YAML-and-flags reader. Each command of the ``prlhf`` CLI parses one
of them from ``--config FILE.yaml`` plus flags.

Names are imported lazily (``from prlhf.config import PDPOConfig`` loads ``training`` only), so
that the CLI starts without importing transformers' training stack.
"""

import importlib

_MODULES = {
    "commands": ("AdaptConfig", "DemoConfig", "EvalConfig", "GenerateConfig", "JudgeConfig", "LoadingOptions",
                 "RewardDemoConfig", "RMEvalConfig", "RMScoreConfig", "ServeConfig", "UsersConfig"),
    "data": ("CONVERT_CONFIGS", "ConvertConfig", "DspConvertConfig", "InspectConfig", "PrismConvertConfig",
             "PsoupsConvertConfig", "SynthConfig", "TldrConvertConfig"),
    "training": ("FULL_LEARNING_RATE", "HEALTH_EVAL_STEPS", "LAZY_ROWS_FROM", "LORA_LEARNING_RATE",
                 "PRM_FULL_LEARNING_RATE", "PRM_USER_LEARNING_RATE", "USER_LEARNING_RATE", "USER_ROWS_UPDATES", "PDPOConfig", "PersonalizationConfig",
                 "PrlhfArguments", "PRMConfig", "PSFTConfig"),
    "parse": ("ConfigError", "parse_config", "read_yaml_config"),
    "option": ("option",),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'prlhf.config' has no attribute {name!r}")
