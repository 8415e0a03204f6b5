"""A GPT-style decoder-only transformer in plain PyTorch.

The network maps a batch of token ids of shape (B, T) to next-token logits of shape
(B, T, vocab_size). Each block applies LayerNorm before its sub-layer (pre-LN) and adds
the result back to the residual stream:

    x = x + attention(ln_1(x))
    x = x + mlp(ln_2(x))

Generation can keep the keys and values of the tokens it has already processed in a
`KVCache`, so that each new token runs the network on that token alone and attends over
the cached keys and values (see `Transformer.generate`).

Shapes in comments use B = batch size, T = sequence length, C = n_embd, H = n_head and
D = C // H (the width of one head).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerConfig:
    vocab_size: int
    block_size: int  # maximum context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # bias in the Linear and LayerNorm layers

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), "
                "because each head gets n_embd // n_head channels"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class LayerKVCache:
    """Keys and values of one attention layer for the positions 0..length-1 processed so far.

    The buffers, (B, H, block_size, D) each, are allocated at the first `append` with the
    dtype and device of the keys it receives, so the cache follows autocast and the device.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k and v (B, H, T, D) as positions length..length+T-1.

        Returns the keys and values of all positions so far, (B, H, length + T, D) each.
        """
        B, H, T, D = k.shape
        start, end = self.length, self.length + T
        if end > self.block_size:
            raise ValueError(
                f"KV cache overflow: it has room for block_size={self.block_size} positions, "
                f"{start} are cached and {T} more were appended"
            )
        if self.keys is None:
            self.keys = k.new_empty(B, H, self.block_size, D)
            self.values = v.new_empty(B, H, self.block_size, D)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """The `LayerKVCache` of every block of a Transformer, all at the same length."""

    def __init__(self, config: TransformerConfig) -> None:
        self.block_size = config.block_size
        self.layers = [LayerKVCache(config.block_size) for _ in range(config.n_layer)]

    @property
    def length(self) -> int:
        """Number of positions cached, 0..block_size."""
        return self.layers[0].length


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position attends only to itself and earlier ones."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # One matrix computes queries, keys and values for all heads at once.
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        """Attend from the T positions of x (B, T, C); with `cache`, also over the cached ones.

        With a cache of S positions, x contains positions S..S+T-1, and its keys and values
        are added to the cache.
        """
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)

        # Split the channels into heads: (B, T, C) -> (B, H, T, D).
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0

        if cache is None:
            # softmax(q k^T / sqrt(D)) v with the upper triangle masked out, so that
            # position t attends to positions 0..t only.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            start = cache.length
            k, v = cache.append(k, v)  # each (B, H, start + T, D)
            # Query i is position start + i and attends to positions 0..start + i. A single
            # query attends to everything, so it needs no mask.
            mask = None
            if T > 1:
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        # y: (B, H, T, D)

        # Concatenate the heads again: (B, H, T, D) -> (B, T, C).
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network with a hidden layer 4 times the model width."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """One transformer layer: attention then MLP, each with pre-LayerNorm and a residual."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """Decoder-only language model: embeddings, a stack of blocks and a tied output head."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config

        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

        # Weight tying: the output head scores each token by the dot product of the final
        # hidden state with that token's input embedding. Both layers then learn one
        # shared table, which saves vocab_size * n_embd parameters and usually lowers
        # the loss (Press and Wolf, 2017, "Using the Output Embedding to Improve Language
        # Models").
        self.head.weight = self.token_embedding.weight

        self.apply(self._init_weights)
        # Each block adds two projections to the residual stream, so the stream's variance
        # grows with depth. Scaling the init of those projections by 1 / sqrt(2 * n_layer)
        # keeps it roughly constant at initialisation (GPT-2, Radford et al., 2019).
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Number of distinct parameters; the tied head and embedding count once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute next-token logits for every position, and their loss if `targets` is given.

        idx: token ids (B, T) with T <= block_size. targets: ids (B, T) of the token that
        follows each position; positions marked -100 are left out of the loss.
        kv_cache: the cache of the S tokens that precede idx, with S + T <= block_size. idx
        then contains positions S..S+T-1, and their keys and values are added to the cache.
        Returns logits (B, T, vocab_size) and the mean cross-entropy over the targets
        (None without targets).
        """
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.block_size:
            cached = f" after {start} cached positions" if start else ""
            raise ValueError(
                f"sequence length {T}{cached} exceeds block_size {self.config.block_size}; "
                "crop the input to the last block_size tokens"
            )

        positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.token_embedding(idx) + self.position_embedding(positions)  # (B, T, C)
        x = self.dropout(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, None if kv_cache is None else kv_cache.layers[layer])
        x = self.ln_f(x)
        logits = self.head(x)  # (B, T, vocab_size)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-100
            )
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Extend the token ids `idx` (B, T) by `max_new_tokens` generated tokens.

        Returns the ids (B, T + max_new_tokens). `stream` describes the arguments.
        """
        new_ids = list(
            self.stream(
                idx,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                use_cache=use_cache,
            )
        )
        return torch.cat([idx, *new_ids], dim=1)

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield, one at a time, `max_new_tokens` tokens (B, 1) that continue the ids `idx` (B, T).

        Each step feeds at most the last block_size tokens. `sample_next_token` turns the
        logits of the last position into a token with `temperature` (0: the most likely
        token), `top_k` and `top_p`. `generator` makes the sampling reproducible. Call
        `eval()` first unless dropout is wanted.

        With `use_cache`, the keys and values of earlier tokens stay in a KVCache: the
        prompt runs through the network once, then each step runs the new token alone,
        so a step costs time linear in the number of cached tokens. Without the cache,
        each step runs the whole context again. Both give the same tokens, up to
        floating-point rounding, which can only matter when two tokens are almost tied.

        Once the context exceeds block_size, each step re-encodes the last block_size
        tokens without the cache. The position embeddings are absolute, so sliding the
        window by one token moves every token to a new position and changes every cached
        key and value. From then on a step costs as much as without the cache.
        """
        check_sampling_arguments(temperature, top_k, top_p)
        if idx.size(1) == 0:
            raise ValueError("idx must contain at least one token to continue, got shape (B, 0)")
        block_size = self.config.block_size
        cache = KVCache(self.config) if use_cache else None

        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= block_size:
                # The tokens not cached yet: the prompt at the first step, then the last token.
                logits, _ = self(idx[:, cache.length :], kv_cache=cache)
            else:
                logits, _ = self(idx[:, -block_size:])
            next_id = sample_next_token(
                logits[:, -1, :], temperature, top_k, top_p, generator
            )  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
            yield next_id


def check_sampling_arguments(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError unless the arguments are valid for `sample_next_token`."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token id per row from next-token logits (B, vocab_size); returns (B, 1).

    temperature 0 picks the most likely token (greedy decoding) and ignores top_k, top_p
    and the generator. Otherwise the logits are divided by temperature, then top_k keeps
    the k most likely tokens, and top_p (nucleus sampling, Holtzman et al., 2020, "The
    Curious Case of Neural Text Degeneration") keeps the most likely tokens whose
    probabilities sum to at least top_p. The token is drawn from the rest.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)

    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # Probability of the tokens ranked before each token. A token is dropped when those
        # already reach top_p, so the most likely token always stays.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, sorted_ids, drop_sorted)  # unsort
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
