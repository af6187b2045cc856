"""Where the user tokens sit in a sequence (``user_position``): the sequence layouts, plain and
packed, and their one validation.

``prefix`` (the paper's): ``[BOS] [T_u implicit slots] [user text] [prompt] [response]``;
``before_response``: ``[BOS] [prompt] [slots] [user text] [response]`` (the prompt is the same for
every user, so a packed row holds it once for several user terms); ``after_response`` (reward
models only): ``[BOS] [prompt] [response] [slots] [user text]``.
"""

from __future__ import annotations

USER_POSITIONS = ("prefix", "before_response")
# reward models may also read the user after the response: the last token is then the user's, and
# its hidden state (what the reward head reads) is the user's query over the whole response
REWARD_USER_POSITIONS = USER_POSITIONS + ("after_response",)


def shares_prompt(user_position: str) -> bool:
    """Whether the prompt comes before every user token, so that it is the same for every user
    (one packed row can hold several user terms behind it; a prompt's KV cache serves all its users)."""
    return user_position == "before_response"


def terms_per_packed_row(user_position: str, packing: bool, both_terms: bool, alpha_sampling: bool) -> int:
    """P-DPO's terms per packed row: 2 when the user and generic terms both run on one shared prompt
    (packing, a shared prompt, both terms needed, not one term drawn per pair), else 1."""
    return 2 if both_terms and packing and shares_prompt(user_position) and not alpha_sampling else 1


def check_can_generate(user_position: str) -> None:
    """Generation needs the user before the response: a reward model's layout reads it after."""
    if user_position == "after_response":
        raise ValueError("this model reads the user after the response (a reward model's layout): it cannot generate")


def build_sequence(prompt_ids: list[int], response_ids: list[int], user_text_ids: list[int], n_user_tokens: int,
                   bos_id: int | None, slot_id: int, user_position: str = "prefix"
                   ) -> tuple[list[int], list[int], list[bool], list[bool]]:
    """One sequence: (ids, labels, implicit_mask, user_mask). The user prefix (implicit slots, then
    the user's text) goes after BOS (``prefix``, the paper's layout), between the prompt and the
    response (``before_response``: the prompt is then the same for every user) or, for reward
    models, after the response (``after_response``)."""
    prefix = [slot_id] * n_user_tokens + list(user_text_ids)
    body = list(prompt_ids) + list(response_ids)
    if user_position == "after_response":
        at = len(body)
    elif user_position == "before_response":
        at = len(prompt_ids)
    else:
        at = 1 if bos_id is not None and prompt_ids[:1] == [bos_id] else 0
    ids = body[:at] + prefix + body[at:]
    start = len(prompt_ids) + (len(prefix) if at <= len(prompt_ids) else 0)  # where the response begins
    labels = [-100] * start + list(response_ids) + [-100] * (len(ids) - start - len(response_ids))
    implicit = [False] * at + [True] * n_user_tokens + [False] * (len(ids) - at - n_user_tokens)
    user = [False] * at + [True] * len(prefix) + [False] * (len(ids) - at - len(prefix))
    return ids, labels, implicit, user


def check_user_position(user_position: str, reward: bool = False, packing: bool = False, n_terms: int = 1) -> None:
    """The one check of a layout: known (``after_response`` for reward models only), packable, and
    several terms per row only where the prompt is shared (``before_response`` with packing)."""
    allowed = REWARD_USER_POSITIONS if reward else USER_POSITIONS
    if user_position not in allowed:
        raise ValueError(f"user_position must be one of {allowed}, got {user_position!r}")
    if packing and user_position == "after_response":
        raise ValueError("user_position='after_response' (reward models) has no packed layout")
    if n_terms != 1 and not (packing and user_position == "before_response"):
        raise ValueError("several terms per row need packing=True and user_position='before_response'")


def build_packed_sequence(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], user_text_ids: list[int],
                          n_user_tokens: int, bos_id: int | None, slot_id: int, user_position: str = "prefix",
                          n_terms: int = 1):
    """A shared-prompt packed sequence: ``[BOS] [user prefix] [prompt] [chosen] [rejected]``
    (``prefix``), or ``[BOS] [prompt]`` then, for each of ``n_terms`` users (P-DPO's user and
    generic terms), ``[user prefix] [chosen] [rejected]`` (``before_response``: the prompt once for
    every term).

    Returns (ids, branch, parent, implicit_mask, user_mask, preds): ``branch`` numbers the segments
    (0 the shared part; per term, 3k+1 its user prefix, 3k+2 chosen, 3k+3 rejected; in the prefix
    layout the prefix is shared: 1 chosen, 2 rejected), ``parent`` gives each token's parent segment
    (0, or its term's user prefix): a token sees earlier tokens of branch 0, of its own branch and of
    its parent. ``preds`` holds per term (chosen_pred, ref_chosen_pred, rejected_pred,
    ref_rejected_pred): for each response token, the position whose hidden state predicts it (the
    token before it: the user prefix's last token, or the prompt's, for the first one), and the
    same with the user prefix hidden (the reference: the prompt's last token for the first one)."""
    if user_position != "before_response":
        if n_terms != 1:
            raise ValueError("several terms in one packed sequence need user_position='before_response'")
        ids, _, implicit, user = build_sequence(prompt_ids, [], user_text_ids, n_user_tokens, bos_id, slot_id)
        start = len(ids)
        ids = ids + list(chosen_ids) + list(rejected_ids)
        branch = [0] * start + [1] * len(chosen_ids) + [2] * len(rejected_ids)
        implicit = implicit + [False] * (len(chosen_ids) + len(rejected_ids))
        user = user + [False] * (len(chosen_ids) + len(rejected_ids))
        chosen_pred = ([start - 1] + list(range(start, start + len(chosen_ids) - 1)))[:len(chosen_ids)]
        r0 = start + len(chosen_ids)
        rejected_pred = ([start - 1] + list(range(r0, r0 + len(rejected_ids) - 1)))[:len(rejected_ids)]
        return ids, branch, [0] * len(ids), implicit, user, [(chosen_pred, chosen_pred, rejected_pred, rejected_pred)]
    ids = list(prompt_ids)
    branch, parent, implicit, user = [0] * len(ids), [0] * len(ids), [False] * len(ids), [False] * len(ids)
    last_prompt = len(ids) - 1
    prefix = [slot_id] * n_user_tokens + list(user_text_ids)
    preds = []
    for k in range(n_terms):
        u_b, c_b, r_b = 3 * k + 1, 3 * k + 2, 3 * k + 3
        ids += prefix
        branch += [u_b] * len(prefix)
        parent += [0] * len(prefix)
        implicit += [True] * n_user_tokens + [False] * len(user_text_ids)
        user += [True] * len(prefix)
        last_user = len(ids) - 1 if prefix else last_prompt
        term = []
        for response, b in ((chosen_ids, c_b), (rejected_ids, r_b)):
            start = len(ids)
            ids += list(response)
            branch += [b] * len(response)
            parent += [u_b] * len(response)
            implicit += [False] * len(response)
            user += [False] * len(response)
            follow = list(range(start, start + len(response) - 1))
            term += [([last_user] + follow)[:len(response)], ([last_prompt] + follow)[:len(response)]]
        preds.append(tuple(term))
    return ids, branch, parent, implicit, user, preds
