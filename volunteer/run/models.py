"""Built-in model templates: a manifest names one and gives its config; no code ever comes from the network.

:func:`build_model` is deterministic: the same template, config and seed give bit-identical parameters on
every peer (initialisation runs under a forked, seeded torch RNG, so the caller's global RNG is untouched).
The allowed config keys and ranges live in :mod:`volunteer.run.templates`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from volunteer.errors import ManifestError
from volunteer.run.templates import Config, Task, model_template

__all__ = ["MLP", "TinyLM", "build_model", "count_parameters", "task_loss"]


class MLP(nn.Module):
    """A classifier: ``num_layers`` hidden Linear+GELU layers of ``hidden_dim``, then a linear head."""

    def __init__(self, input_dim: int, hidden_dim: int, num_layers: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.GELU()]
            width = hidden_dim
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[batch, num_classes]`` for features ``[batch, input_dim]``."""
        out: torch.Tensor = self.net(x)
        return out


class _Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then a GELU feed-forward."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        shape = (batch, length, self.n_heads, width // self.n_heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        out: torch.Tensor = x + self.ff(self.norm2(x))
        return out


class TinyLM(nn.Module):
    """A tiny causal transformer language model: token + learned position embeddings, pre-norm blocks, a
    final LayerNorm and an output head tied to the token embedding (GPT-2 style, small)."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int, n_heads: int, n_layers: int, d_ff: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[batch, length, vocab_size]`` for token ids ``[batch, length]``."""
        length = tokens.shape[1]
        if length > self.seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds the model's seq_len {self.seq_len}")
        positions = torch.arange(length, device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.embed.weight)


def build_model(template: str, config: Mapping[str, object], seed: int) -> nn.Module:
    """Build the template ``template`` with ``config`` (checked, defaults filled), initialised from ``seed``.

    Unknown templates and bad configs raise :class:`~volunteer.errors.ManifestError`.
    """
    table = model_template(template)
    resolved = table.resolve(config, "model.config")
    if type(seed) is not int or not 0 <= seed < 1 << 63:
        raise ManifestError(f"seed: expected an integer from 0 to 2**63-1, got {seed!r:.40}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _construct(template, resolved)


def _construct(template: str, c: Config) -> nn.Module:
    ints = {key: value for key, value in c.items() if type(value) is int}
    if template == "mlp":
        return MLP(ints["input_dim"], ints["hidden_dim"], ints["num_layers"], ints["num_classes"])
    if template == "tiny-lm":
        return TinyLM(
            ints["vocab_size"], ints["seq_len"], ints["d_model"], ints["n_heads"], ints["n_layers"], ints["d_ff"]
        )
    raise ManifestError(f"model template {template!r} has no builder")  # a table entry without code: a bug


def task_loss(task: Task, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy for ``task``: class logits ``[B, C]`` vs labels ``[B]``, or next-token logits
    ``[B, T, V]`` vs tokens ``[B, T]``."""
    if task is Task.LANGUAGE_MODEL:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(logits, targets)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
