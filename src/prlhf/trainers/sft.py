"""``PSFTTrainer``: the SFT step that builds pi_SFT (prompt -> chosen, user-agnostic)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch.nn.functional as F
from transformers import Trainer

from ..base_models import load_model_and_tokenizer
from ..collate import SFTCollator
from ..config.training import PSFTConfig
from ..data import TokenizeSettings, load_preference_data, tokenize_dataset
from ..guards import check_finite
from ..scoring import position_ids_from_mask, score_targets
from ..storage import save_folder
from ..users import UserRegistry
from .base import ResumableTrainer, load_records


class PSFTTrainer(ResumableTrainer):
    """Supervised fine-tuning on prompt -> chosen, user-agnostic: the mean token NLL of chosen responses."""

    def __init__(self, model=None, args: PSFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        args = args or PSFTConfig()
        tokenizer = processing_class
        if model is None:
            model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code,
                                                        **args.load_kwargs())
            if args.use_lora:
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **args.lora_kwargs()))
        if tokenizer is None:
            raise ValueError("PSFTTrainer needs processing_class (the tokenizer) when a model is given")
        settings = TokenizeSettings(args.max_length, args.max_prompt_length, 0, 0)
        registry = UserRegistry()
        train = tokenize_dataset(load_records(train_dataset if train_dataset is not None else args.train_file, "train"),
                                 tokenizer, settings, registry, args.train_file or "train_dataset")
        eval_source = eval_dataset if eval_dataset is not None else args.eval_file
        evals = tokenize_dataset(load_preference_data(eval_source), tokenizer, settings, registry, args.eval_file or "eval_dataset") if eval_source is not None else None
        collator = SFTCollator(tokenizer.pad_token_id, tokenizer.bos_token_id, args.padding_side)
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, **kwargs)
        self.model_accepts_loss_kwargs = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints and saves as whole folders, atomically, with ``manifest.json``."""
        output_dir = output_dir or self.args.output_dir
        state_dict = self.full_state_dict()
        if self.args.should_save:
            weights = state_dict if state_dict is not None else dict(self.model.named_parameters())
            trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
            check_finite({n: p for n, p in weights.items() if n in trainable}, f"the weights to save in {output_dir}")
            save_folder(output_dir, lambda tmp: Trainer._save(self, str(tmp), state_dict=state_dict))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean token NLL of the chosen responses. Training applies the LM head at the response
        positions only (``response_logits_only``); evaluation, which returns logits, at every position."""
        mask = inputs["attention_mask"]
        labels = inputs["labels"][:, 1:]
        llm = self.accelerator.unwrap_model(model)
        # the head at response positions calls the model's parts, not its forward: only where no distributed wrapper
        # (DDP) or sharding (FSDP, DeepSpeed) needs the forward call
        if self.args.response_logits_only and not return_outputs and model is llm and not self.sharded():
            T = inputs["input_ids"].shape[1]
            rows, cols = (labels != -100).nonzero(as_tuple=True)  # position (row, col) predicts labels[row, col]
            token_logps = score_targets(llm, llm.get_input_embeddings()(inputs["input_ids"]), {"attention_mask": mask},
                                        rows * T + cols, labels[rows, cols])
            return -token_logps.mean()
        logits = model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return (loss, {"logits": logits}) if return_outputs else loss

    def save_final(self, output_dir: str | None = None) -> str:
        """Save pi_SFT as a plain model folder (LoRA adapters merged), usable as ``model_name_or_path``."""
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        state_dict = self.full_state_dict()
        if state_dict is not None and hasattr(model, "merge_and_unload"):
            raise ValueError(f"saving {output_dir}: merging the LoRA adapters of a sharded run (FSDP, DeepSpeed) is not "
                             "supported; train pi_SFT without LoRA when sharding, or without sharding")
        if self.args.should_save:
            if hasattr(model, "merge_and_unload"):
                model = copy.deepcopy(model).merge_and_unload()
            check_finite(state_dict if state_dict is not None else dict(model.named_parameters()),
                         f"the weights to save in {output_dir}")

            def write(tmp: Path) -> None:
                model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
                self.processing_class.save_pretrained(tmp)
                (tmp / "training_args.json").write_text(self.args.to_json_string())

            save_folder(output_dir, write)
        return output_dir
