"""The trainers, each a ``transformers.Trainer``: ``pdpo.PDPOTrainer`` (P-DPO), ``sft.PSFTTrainer``
(the SFT step that builds pi_SFT), ``prm.PRMTrainer`` (the personalized reward model); what they
share lives in ``base`` (resume, non-finite guard, sharding), ``preference`` (pairwise metrics,
health signal, the user model's learning rate) and ``callbacks``."""
