"""The LoRA² objective (spec §3):  L_total = L_MSE + λ_r·L_reg + λ_e·L_entropy.

L_MSE is the ε-prediction diffusion loss under a DDPM schedule; L_reg lives on
the network (:meth:`LoRA2Network.reg_loss`); the cross-attention entropy is
collected here from the q/k projections of every cross-attention (attn2).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class DDPMSchedule:
    """DDPM noise schedule (SDXL: 'scaled_linear' β from 0.00085 to 0.012, T = 1000).

        x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε,   ᾱ_t = Π_{s≤t} (1 − β_s)
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
        self.num_timesteps = num_timesteps
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0).float()

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), generator=generator).to(device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def noisy(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ε ~ N(0, I) and t ~ U{0…T−1} from `generator`; return (x_t, t, ε)."""
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        t = self.sample_timesteps(x0.shape[0], generator, x0.device)
        return self.add_noise(x0, noise, t), t, noise


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_MSE = mean ‖ε_θ(x_t, t, c) − ε‖² (in float32)."""
    return F.mse_loss(pred.float(), target.float())


def attention_entropy(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Mean entropy of softmax(q kᵀ/√d) over text tokens, per head and query.

        H = −Σ_j p_ij log p_ij,  p_i = softmax_j(q_i · k_j / √d_head)
    q: (B, Nq, heads·d), k: (B, Nk, heads·d).
    """
    b, nq, inner = q.shape
    d = inner // heads
    qh = q.float().reshape(b, nq, heads, d).transpose(1, 2)
    kh = k.float().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    logp = torch.log_softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


class CrossAttentionEntropy:
    """Collects L_entropy from every cross-attention of a model while it runs.

    Forward hooks on ``attn2.to_q`` and ``attn2.to_k`` see the projected
    queries and keys (LoRA included), independent of how the model computes
    attention.  Only a random subset of `queries` query positions is used so
    memory stays bounded: O(B·heads·queries·tokens) per layer.  The subsets come
    from this object's own generator (seeded `seed`; the training data's random
    stream is never touched) and are drawn once per layer and step: a gradient-
    checkpoint recomputation of a block sees the same queries as its forward.
    """

    def __init__(self, root: nn.Module, queries: int = 256, seed: int = 0):
        self.queries = queries
        self.generator = torch.Generator().manual_seed(int(seed))
        self.values: list[torch.Tensor] = []
        self._pending: dict[int, torch.Tensor] = {}
        self._subsets: dict[tuple[int, int], torch.Tensor] = {}
        self._handles = []
        for path, mod in root.named_modules():
            if path.split(".")[-1] != "attn2" or not hasattr(mod, "to_q") or not hasattr(mod, "to_k"):
                continue
            heads = getattr(mod, "heads", None)
            if heads is None:
                heads = max(1, mod.to_q.out_features // 64)
            self._handles.append(mod.to_q.register_forward_hook(self._on_q(id(mod))))
            self._handles.append(mod.to_k.register_forward_hook(self._on_k(id(mod), heads)))
        self.num_layers = len(self._handles) // 2

    def _on_q(self, key):
        def hook(_m, _inp, out):
            n = out.shape[1]
            if n > self.queries:
                idx = self._subsets.get((key, n))
                if idx is None:
                    idx = self._subsets[(key, n)] = torch.randperm(n, generator=self.generator)[: self.queries]
                out = out.index_select(1, idx.to(out.device))
            self._pending[key] = out
        return hook

    def _on_k(self, key, heads):
        def hook(_m, _inp, out):
            q = self._pending.pop(key, None)
            if q is not None:
                self.values.append(attention_entropy(q, out, heads))
        return hook

    def reset(self) -> None:
        """Start a new step: forget the collected values and draw new query subsets."""
        self.values.clear()
        self._pending.clear()
        self._subsets.clear()

    def loss(self) -> torch.Tensor:
        """Mean entropy over the cross-attention calls since the last :meth:`reset`."""
        if not self.values:
            return torch.zeros(())
        return torch.stack(self.values).mean()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
