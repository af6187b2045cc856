"""Batching tokenized pairs: padding, the preference collator (plain or packed layout, flat
response targets for the response-only LM head) and the SFT collator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .layout import build_packed_sequence, build_sequence, check_user_position


def pad_batch(rows: list[list], value, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    if side == "right":
        return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows])
    if side == "left":
        return torch.tensor([[value] * (width - len(r)) + list(r) for r in rows])
    raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")


def collate_sequences(seqs: list[tuple], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    ids, labels, implicit, user = zip(*seqs)
    return {
        "input_ids": pad_batch(ids, pad_id, side),
        "attention_mask": pad_batch([[1] * len(s) for s in ids], 0, side),
        "labels": pad_batch(labels, -100, side),
        "implicit_mask": pad_batch(implicit, False, side),
        "user_mask": pad_batch(user, False, side),
    }


@dataclass
class PreferenceCollator:
    """Batches tokenized pairs, in one of two layouts.

    * plain (``packing=False``, the reference implementation): 2B sequences, chosen rows 0..B-1
      then rejected rows B..2B-1, each ``[BOS] [user prefix] [prompt] [response]``;
    * packed (``packing=True``): B sequences ``[BOS] [user prefix] [prompt] [chosen] [rejected]``
      with a ``branch`` map from which the model builds a 4D attention mask (rejected does not see
      chosen) and position ids (rejected restarts where the prompt ends): the prompt is processed
      once per pair instead of twice.

    Both carry the response tokens to score as flat targets: ``target_row``/``target_col`` (the
    position whose hidden state predicts the token), ``target_ids`` and ``target_seq`` (0..B-1
    chosen of pair i, B..2B-1 rejected), so that the LM head runs at those positions only.
    ``row_pair`` maps each row to its pair, ``n_tokens`` counts response tokens per sequence (2B,),
    and ``ref_logps`` (2B,) is filled from the examples' precomputed reference log-probs when
    they have them. ``with_user=False`` leaves the user prefix out (the reference sees no user).
    """

    pad_token_id: int
    bos_token_id: int | None
    n_user_tokens: int = 0
    padding_side: str = "right"
    packing: bool = False
    with_user: bool = True
    user_position: str = "prefix"
    n_terms: int = 1  # terms packed into one row (before_response + packing only)

    def __post_init__(self):
        check_user_position(self.user_position, reward=True, packing=self.packing, n_terms=self.n_terms)

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        B = len(examples)
        n_slots = self.n_user_tokens if self.with_user else 0
        text = (lambda ex: ex["user_text_ids"]) if self.with_user else (lambda ex: [])  # noqa: E731
        layout = self.user_position if self.with_user else "prefix"  # no user: both layouts are the same sequence
        # targets: (row, position predicting the token, the same with the user hidden, token id, sequence)
        seqs, targets = [], []
        if self.packing:
            branches, parents = [], []
            for i, ex in enumerate(examples):
                ids, branch, parent, implicit, user, preds = build_packed_sequence(
                    ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], text(ex), n_slots, self.bos_token_id,
                    self.pad_token_id, layout, self.n_terms)
                seqs.append((ids, [-100] * len(ids), implicit, user))
                branches.append(branch)
                parents.append(parent)
                for k, (c_pred, c_ref, r_pred, r_ref) in enumerate(preds):
                    targets += [(i, p, q, t, 2 * B * k + i) for p, q, t in zip(c_pred, c_ref, ex["chosen_ids"]) if p >= 0]
                    targets += [(i, p, q, t, 2 * B * k + B + i) for p, q, t in zip(r_pred, r_ref, ex["rejected_ids"]) if p >= 0]
            row_pair = list(range(B))
        else:
            for j, key in enumerate(("chosen_ids", "rejected_ids")):
                for i, ex in enumerate(examples):
                    seq = build_sequence(ex["prompt_ids"], ex[key], text(ex), n_slots, self.bos_token_id, self.pad_token_id,
                                         layout)
                    seqs.append(seq)
                    start = len(ex["prompt_ids"]) if layout == "after_response" else len(seq[0]) - len(ex[key])
                    # with the user hidden, the first response token follows the prompt's last token
                    first_ref = len(ex["prompt_ids"]) - 1 if layout != "prefix" else start - 1
                    targets += [(j * B + i, start - 1 + k, first_ref if k == 0 else start - 1 + k, t, j * B + i)
                                for k, t in enumerate(ex[key]) if start - 1 + k >= 0]
            row_pair = list(range(B)) * 2
        batch = collate_sequences(seqs, self.pad_token_id, self.padding_side)
        width = batch["input_ids"].shape[1]
        lengths = [len(s[0]) for s in seqs]
        if self.packing:
            batch["branch"] = pad_batch(branches, -1, self.padding_side)
            if layout == "before_response":
                batch["parent"] = pad_batch(parents, 0, self.padding_side)
            del batch["labels"]
        shift = [width - n if self.padding_side == "left" else 0 for n in lengths]
        rows, cols, ref_cols, ids, seq = zip(*targets) if targets else ((), (), (), (), ())
        batch["target_row"] = torch.tensor(rows, dtype=torch.long)
        batch["target_col"] = torch.tensor([c + shift[r] for r, c in zip(rows, cols)], dtype=torch.long)
        if layout == "before_response":  # where the reference (user hidden) predicts each target
            batch["ref_target_col"] = torch.tensor([c + shift[r] for r, c in zip(rows, ref_cols)], dtype=torch.long)
        batch["target_ids"] = torch.tensor(ids, dtype=torch.long)
        batch["target_seq"] = torch.tensor(seq, dtype=torch.long)
        batch["n_tokens"] = torch.bincount(batch["target_seq"], minlength=2 * B * self.n_terms)
        if self.n_terms != 1:
            batch["n_terms"] = torch.tensor(self.n_terms)
        batch["row_pair"] = torch.tensor(row_pair, dtype=torch.long)
        batch["user_rows"] = torch.tensor([ex["user_row"] for ex in examples], dtype=torch.long)  # (B,)
        batch["index"] = torch.tensor([ex.get("index", -1) for ex in examples], dtype=torch.long)
        has_ref = ["ref_logps" in ex for ex in examples]
        if any(has_ref):
            if not all(has_ref):
                raise ValueError("a batch mixes examples with and without precomputed reference log-probs")
            batch["ref_logps"] = torch.tensor([ex["ref_logps"][0] for ex in examples] + [ex["ref_logps"][1] for ex in examples],
                                              dtype=torch.float32)
        return batch


@dataclass
class SFTCollator:
    """Batches prompt -> chosen sequences without any user input (the SFT step builds pi_SFT)."""

    pad_token_id: int
    bos_token_id: int | None
    padding_side: str = "right"

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        seqs = [build_sequence(ex["prompt_ids"], ex["chosen_ids"], [], 0, self.bos_token_id, self.pad_token_id) for ex in examples]
        return collate_sequences(seqs, self.pad_token_id, self.padding_side)
