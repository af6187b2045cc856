"""User models: user information u = (u_t text, u_p id) -> user embedding e_u (a soft prompt).

Implicit part (from the id, one module per model of the paper, Section 4):

* ``UniformUserModel``  - one shared set of T_u vectors for everybody (vanilla RLHF with a
  learned soft prompt: it cannot tell users apart);
* ``IndividualUserModel`` - e_u = e_0 + o_u: a shared generic embedding plus a per-user offset
  (the generic user, row 0, has offset 0);
* ``ClusterUserModel``  - K cluster embeddings (K x T_u x d) mixed by per-user weights w_u:
  e_u = sum_k w_uk E_k, a low-rank factorisation of the user-embedding table; the generic user
  has its own weights (row 0).

Every implicit model maps user rows (B,) to embeddings (B, T_u, d).

Explicit part: u_t is tokenized (``encode_user_text``) and embedded by the LLM's own token
embedding table in ``prlhf.modeling``; e_u = concat(implicit, explicit).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

USER_MODELS = ("none", "uniform", "individual", "cluster")
CLUSTER_WEIGHTINGS = ("softmax", "linear")
USER_INITS = ("vocab", "random")
OFFSET_INITS = ("zero", "vocab", "random")


def _init_vectors(shape: tuple[int, ...], init: str, token_embeddings: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Initial soft-prompt vectors: copies of randomly drawn token embeddings (``vocab``, as in the
    authors' code) or N(0, s^2) with s the token embeddings' std (``random``, small if unknown)."""
    n = math.prod(shape[:-1])
    if init == "vocab":
        if token_embeddings is None:
            raise ValueError("user_init='vocab' needs the LLM's token embedding table")
        idx = torch.randint(0, token_embeddings.shape[0], (n,), generator=generator)
        return token_embeddings[idx].detach().float().clone().reshape(shape)
    if init == "random":
        std = float(token_embeddings.float().std()) if token_embeddings is not None else 0.02
        return torch.randn(shape, generator=generator) * std
    raise ValueError(f"user_init must be one of {USER_INITS}, got {init!r}")


class _GatherRows(torch.autograd.Function):
    """``table[index]`` whose gradient is a sparse COO tensor holding only the gathered rows, so that
    backward, gradient clipping and a lazy optimizer cost O(rows in the batch), not O(rows)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.shape = table.shape
        return table.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(index.unsqueeze(0), grad, ctx.shape, check_invariants=False), None


def gather_rows(table: torch.Tensor, index: torch.Tensor, sparse: bool = False) -> torch.Tensor:
    """Rows ``index`` of a per-user table; with ``sparse`` (and a trainable parameter) the table's
    gradient is sparse (only the gathered rows), else dense as plain indexing gives it."""
    if sparse and isinstance(table, nn.Parameter) and table.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(table, index)
    return table[index]


class ImplicitUserModel(nn.Module):
    """Base class: ``forward(user_rows (B,)) -> (B, T_u, d)``."""

    def __init__(self, n_rows: int, n_tokens: int, hidden_size: int):
        super().__init__()
        if not 1 <= n_tokens <= 64:
            raise ValueError(f"n_user_tokens must be between 1 and 64, got {n_tokens}")
        self.n_rows, self.n_tokens, self.hidden_size = n_rows, n_tokens, hidden_size

    # Whether two different users can get different embeddings. When not, the generic term of
    # P-DPO equals the user term and the trainer skips its forward pass.
    depends_on_user: bool = True
    # Sparse gradients for the per-user table (set by the trainers for ``user_rows_update: lazy``):
    # a step then costs the same whatever the number of users not in the batch.
    sparse_rows: bool = False

    def _check(self, user_rows: torch.Tensor) -> None:
        if user_rows.numel() and (int(user_rows.min()) < 0 or int(user_rows.max()) >= self.n_rows):
            raise IndexError(f"user rows must lie in [0, {self.n_rows}), got {user_rows.tolist()}")

    # -- one user's parameters: adapting, exporting and removing single users ---------------------
    # ``per_user_param`` names the tensor that holds one slice per user; ``first_row`` is the user
    # row stored at its index 0 (the individual model keeps no offset for the generic row 0).
    per_user_param: str | None = None
    first_row: int = 0
    # smallest default learning rate for fitting one user's parameters (``prlhf.adapt``); None: no floor
    min_adapt_learning_rate: float | None = None

    def _table(self) -> nn.Parameter:
        if self.per_user_param is None:
            raise ValueError(f"the {type(self).__name__.removesuffix('UserModel').lower()} user model has no "
                             "per-user parameters (use an individual or cluster user model)")
        return getattr(self, self.per_user_param)

    def _index(self, row: int) -> int:
        if not self.first_row <= row < self.n_rows:
            raise IndexError(f"user row {row} has no own parameters in this user model (rows {self.first_row}.."
                             f"{self.n_rows - 1})")
        return row - self.first_row

    def new_user_parameters(self) -> torch.Tensor:
        """A new user's starting parameters: those that make them the generic user."""
        raise NotImplementedError

    def user_parameters(self, row: int) -> torch.Tensor:
        """A copy of one user's own parameters (row >= 1)."""
        return self._table()[self._index(row)].detach().clone()

    @torch.no_grad()
    def set_user_parameters(self, row: int, value: torch.Tensor) -> None:
        self._table()[self._index(row)] = value.to(self._table().dtype)

    @torch.no_grad()
    def add_rows(self, n: int) -> list[int]:
        """Append ``n`` users who start as the generic user; returns their rows."""
        table = self._table()
        new = self.new_user_parameters().to(table.device, table.dtype).unsqueeze(0).expand(n, *table.shape[1:])
        setattr(self, self.per_user_param, nn.Parameter(torch.cat([table.detach(), new]), requires_grad=table.requires_grad))
        first = self.n_rows
        self.n_rows += n
        return list(range(first, first + n))

    @torch.no_grad()
    def remove_row(self, row: int) -> None:
        """Delete one user's parameters; the users after it move up one row, their values unchanged."""
        table = self._table()
        i = self._index(row)
        if row == 0:
            raise ValueError("the generic user (row 0) cannot be removed")
        kept = torch.cat([table.detach()[:i], table.detach()[i + 1:]])
        setattr(self, self.per_user_param, nn.Parameter(kept, requires_grad=table.requires_grad))
        self.n_rows -= 1

    def forward_with(self, user_rows: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
        """``forward(user_rows)`` with the parameters of users ``rows`` replaced by ``values``
        (len(rows), ...): differentiable in ``values`` only, for fitting a few users with everything
        else frozen (``prlhf.adapt``)."""
        from torch.func import functional_call

        table = self._table().detach()
        index = torch.tensor([self._index(r) for r in rows], device=table.device, dtype=torch.long)
        return functional_call(self, {self.per_user_param: table.index_copy(0, index, values.to(table.dtype))}, (user_rows,))


class UniformUserModel(ImplicitUserModel):
    depends_on_user = False

    def __init__(self, n_rows, n_tokens, hidden_size, init="vocab", token_embeddings=None, generator=None):
        super().__init__(n_rows, n_tokens, hidden_size)
        g = generator or torch.Generator().manual_seed(0)
        self.embedding = nn.Parameter(_init_vectors((n_tokens, hidden_size), init, token_embeddings, g))  # (T_u, d)

    def forward(self, user_rows: torch.Tensor) -> torch.Tensor:
        self._check(user_rows)
        return self.embedding.unsqueeze(0).expand(user_rows.shape[0], -1, -1)  # (B, T_u, d)


class IndividualUserModel(ImplicitUserModel):
    """e_u = e_0 + o_u. ``offset_init``: ``zero`` (default) starts every user as the generic user;
    ``vocab`` (as the authors' code) or ``random`` start each user at its own offset, so users
    differ from the first step and the LLM can learn to tell them apart at once."""

    def __init__(self, n_rows, n_tokens, hidden_size, init="vocab", token_embeddings=None, generator=None,
                 offset_init="zero"):
        super().__init__(n_rows, n_tokens, hidden_size)
        g = generator or torch.Generator().manual_seed(0)
        self.generic = nn.Parameter(_init_vectors((n_tokens, hidden_size), init, token_embeddings, g))  # e_0 (T_u, d)
        shape = (n_rows - 1, n_tokens, hidden_size)
        if offset_init == "zero":
            offsets = torch.zeros(shape)
        elif offset_init in USER_INITS:
            offsets = _init_vectors(shape, offset_init, token_embeddings, g)
        else:
            raise ValueError(f"user_offset_init must be one of {OFFSET_INITS}, got {offset_init!r}")
        self.offsets = nn.Parameter(offsets)  # o_1..o_n (n, T_u, d)

    per_user_param, first_row = "offsets", 1

    def new_user_parameters(self) -> torch.Tensor:
        return torch.zeros(self.n_tokens, self.hidden_size)  # o_u = 0: e_u = e_0

    def forward(self, user_rows: torch.Tensor) -> torch.Tensor:
        self._check(user_rows)
        if self.offsets.shape[0] == 0:  # the generic user alone
            return self.generic.unsqueeze(0).expand(user_rows.shape[0], -1, -1)
        # only the batch's rows are read (and, with sparse_rows, receive gradient); the generic
        # user (row 0) has offset 0
        offsets = gather_rows(self.offsets, (user_rows - 1).clamp(min=0), self.sparse_rows)  # (B, T_u, d)
        offsets = offsets * (user_rows > 0).to(offsets.dtype)[:, None, None]
        return self.generic.unsqueeze(0) + offsets


class ClusterUserModel(ImplicitUserModel):
    """e_u = sum_k w_uk E_k with K cluster embeddings E (K, T_u, d) and per-user weights w (n_rows, K).

    ``weighting`` says how the weights are normalised:
    * ``softmax`` (default): w_u = softmax(logits_u), a convex mixture (each user a point in the
      simplex spanned by the clusters); logits start as N(0, 1) draws, distinct random mixtures;
    * ``linear``: w_u = logits_u, unnormalised: the plain low-rank factorisation of the
      (n_rows x T_u d) user-embedding table, as rank K.
    """

    def __init__(self, n_rows, n_tokens, hidden_size, n_clusters=10, weighting="softmax", init="vocab",
                 token_embeddings=None, generator=None):
        super().__init__(n_rows, n_tokens, hidden_size)
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be at least 1, got {n_clusters}")
        if weighting not in CLUSTER_WEIGHTINGS:
            raise ValueError(f"cluster_weighting must be one of {CLUSTER_WEIGHTINGS}, got {weighting!r}")
        g = generator or torch.Generator().manual_seed(0)
        self.n_clusters, self.weighting = n_clusters, weighting
        self.clusters = nn.Parameter(_init_vectors((n_clusters, n_tokens, hidden_size), init, token_embeddings, g))  # (K, T_u, d)
        # users start at distinct random mixtures (an even mix would give every cluster the same gradient)
        if weighting == "softmax":
            logits = torch.randn(n_rows, n_clusters, generator=g)
        else:
            logits = torch.full((n_rows, n_clusters), 1.0 / n_clusters) + 0.1 * torch.randn(n_rows, n_clusters, generator=g)
        self.user_logits = nn.Parameter(logits)  # (n_rows, K)

    per_user_param, first_row = "user_logits", 0
    # mixture logits are O(1): at the training's user learning rate (the demo's 3e-2) 30 steps leave
    # new minority users at 0.65 held-out accuracy, at 0.1 at 1.0
    min_adapt_learning_rate = 0.1

    def new_user_parameters(self) -> torch.Tensor:
        return self.user_logits.detach()[0].clone()  # the generic user's own mixture

    def weights(self, user_rows: torch.Tensor) -> torch.Tensor:
        logits = gather_rows(self.user_logits, user_rows, self.sparse_rows)  # (B, K)
        return logits.softmax(-1) if self.weighting == "softmax" else logits

    def forward(self, user_rows: torch.Tensor) -> torch.Tensor:
        self._check(user_rows)
        return torch.einsum("bk,ktd->btd", self.weights(user_rows), self.clusters)  # (B, T_u, d)


def build_user_model(
    kind: Literal["none", "uniform", "individual", "cluster"],
    n_rows: int,
    n_tokens: int,
    hidden_size: int,
    n_clusters: int = 10,
    cluster_weighting: str = "softmax",
    init: str = "vocab",
    token_embeddings: torch.Tensor | None = None,
    seed: int = 0,
    offset_init: str = "zero",
) -> ImplicitUserModel | None:
    """The implicit user model named by ``kind`` (``none`` gives no implicit part)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "uniform":
        return UniformUserModel(n_rows, n_tokens, hidden_size, init, token_embeddings, g)
    if kind == "individual":
        return IndividualUserModel(n_rows, n_tokens, hidden_size, init, token_embeddings, g, offset_init)
    if kind == "cluster":
        return ClusterUserModel(n_rows, n_tokens, hidden_size, n_clusters, cluster_weighting, init, token_embeddings, g)
    raise ValueError(f"user_model must be one of {USER_MODELS}, got {kind!r}")


def encode_user_text(tokenizer, text: str | None, max_tokens: int) -> list[int]:
    """Explicit user model, first half: u_t -> at most ``max_tokens`` token ids (no special tokens).
    The ids are embedded by the LLM's own input embedding table when the sequence is built."""
    if not text or max_tokens <= 0:
        return []
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
