"""The LoRA² objective (spec §3):  L_total = L_MSE + λ_r·L_reg + λ_e·L_entropy.

L_MSE is the diffusion loss under a DDPM schedule (ε- or v-prediction, optionally
min-SNR weighted, squared or pseudo-Huber error); L_reg lives on the network
(:meth:`LoRA2Network.reg_loss`); the cross-attention entropy is collected here
from the q/k projections of every cross-attention (attn2).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


from .config import LOSS_TYPES


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ᾱ rescaled so the last timestep has SNR 0 (Lin et al. 2023, "Common diffusion noise schedules and
    sample steps are flawed"): √ᾱ is shifted so its last value is 0 and scaled so its first is unchanged,

        √ᾱ'_t = (√ᾱ_t − √ᾱ_{T−1}) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_{T−1}).
    """
    a = alphas_cumprod.double().sqrt()
    first, last = a[0].clone(), a[-1].clone()
    a = (a - last) * first / (first - last)
    return (a ** 2).to(alphas_cumprod.dtype)


class DDPMSchedule:
    """DDPM noise schedule (SDXL: 'scaled_linear' β from 0.00085 to 0.012, T = 1000).

        x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε,   ᾱ_t = Π_{s≤t} (1 − β_s)

    ``zero_terminal_snr`` rescales ᾱ so that ᾱ_{T−1} = 0 (see :func:`rescale_zero_terminal_snr`).
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 zero_terminal_snr: bool = False):
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
        self.num_timesteps = num_timesteps
        alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        self.alphas_cumprod = alphas_cumprod.float()

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor | None) -> "DDPMSchedule":
        """The schedule of a discrete sampler's σ_t (k-diffusion's form, σ_t² = (1−ᾱ_t)/ᾱ_t):
        ᾱ_t = 1/(1+σ_t²), T = len(σ); None: the default SDXL schedule."""
        schedule = cls()
        if sigmas is not None:
            sigmas = sigmas.detach().float().cpu().clone()
            schedule.alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)
            schedule.num_timesteps = int(sigmas.shape[0])
        return schedule

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR_t = ᾱ_t / (1 − ᾱ_t) (float32; ∞ never occurs since ᾱ_t < 1)."""
        a = self.alphas_cumprod.to(t.device)[t].float()
        return a / (1 - a)

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0 (the v-prediction target)."""
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), generator=generator).to(device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def noisy(self, x0: torch.Tensor, generator: torch.Generator,
              noise_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ε ~ N(0, I) and t ~ U{0…T−1} from `generator`; return (x_t, t, ε).

        ``noise_offset`` > 0 adds offset · N(0, 1) per sample and channel to ε (constant over the image;
        drawn after t, so a zero offset leaves the random stream as it was)."""
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        t = self.sample_timesteps(x0.shape[0], generator, x0.device)
        if noise_offset:
            shift = torch.randn((*x0.shape[:2], *([1] * (x0.dim() - 2))), generator=generator)
            noise = noise + noise_offset * shift.to(x0.device, x0.dtype)
        return self.add_noise(x0, noise, t), t, noise


#: optimizer steps whose data loss makes up L_ref (the loss level L_reg is measured against)
LOSS_REF_STEPS = 20


def loss_reference(network) -> torch.Tensor:
    """L_ref: the mean detached data loss of the first :data:`LOSS_REF_STEPS` optimizer steps recorded so far
    (:func:`record_loss`), 0 before the first one — so L_reg starts with the second step.

    Kept in the network's persistent buffer ``loss_ref`` = (sum, count), so it is saved and restored with the
    network's state and a resumed run goes on with the same L_ref.  It sets the unit of L_reg: the loss the
    run started from, whatever its scale (an ε-loss near 0.1, a teacher-matching loss of 10⁻⁴).  On several
    processes each records its own batches; the gradients they average are unaffected by the difference."""
    ref = network.loss_ref.detach()
    return (ref[0] / ref[1]).float() if float(ref[1]) > 0 else torch.zeros((), device=ref.device)


@torch.no_grad()
def record_loss(network, data_loss) -> None:
    """Add one optimizer step's data loss (the mean over its micro-batches) to L_ref, for the first
    :data:`LOSS_REF_STEPS` steps."""
    ref = network.loss_ref
    if float(ref[1]) < LOSS_REF_STEPS:
        ref[0] += torch.as_tensor(data_loss).detach().float().to(ref.device, ref.dtype)
        ref[1] += 1


def lora2_loss(data_loss: torch.Tensor, network, config, entropy: torch.Tensor | None = None, record: bool = True):
    """L_total = L_data + λ_r·L_reg + λ_e·L_entropy with the scale-free regularizer

        L_reg = L_ref · (mean_ℓ |ln ν_ℓ − ln ν_aim| + β · mean_ℓ (‖A_ℓ‖² + ‖B_ℓ‖²)/numel_ℓ)

    L_ref (:func:`loss_reference`) is the data loss at the start of the run, a constant.  Scaling the data
    loss by c scales L_ref and so every gradient by c: with Adam (or any scale-invariant optimizer) training
    is unchanged, and λ_r and β mean the same for every loss scale — the price of a rank position is a share
    of the starting loss (docs/method.md, "Scale-free L_reg").  ``record``: this call is one optimizer step, whose
    data loss goes into L_ref after L_reg is computed (a trainer that accumulates micro-batches passes False
    and calls :func:`record_loss` once per step with their mean).  Returns (total, L_reg, entropy)."""
    rank_term, weight_term = network.reg_loss()
    scale = loss_reference(network).to(rank_term.device)
    reg = scale * (rank_term + config.beta * weight_term)
    reg = reg.to(data_loss.device, data_loss.dtype)
    ent = data_loss.new_zeros(()) if entropy is None else entropy.to(data_loss.device, data_loss.dtype)
    total = data_loss + config.lambda_r * reg + config.lambda_e * ent
    if record:
        record_loss(network, data_loss)
    return total, reg, ent


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_MSE = mean ‖ε_θ(x_t, t, c) − ε‖² (in float32)."""
    return F.mse_loss(pred.float(), target.float())


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1)
    for v-prediction.  ε-prediction at SNR 0 (zero terminal SNR) gets weight 1, the limit of min(1, γ/SNR)."""
    snr = snr.float()
    if prediction_type == "v_prediction":
        return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    return torch.clamp(gamma / snr, max=1.0)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "mse", huber_c: float = 0.1,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of (weight ·) the per-sample mean error, in float32.

    ``mse``: d²; ``huber``: the pseudo-Huber error 2c(√(d² + c²) − c) (≈ d² for |d| ≪ c, ≈ 2c|d| for |d| ≫ c),
    d = pred − target.  Without weights, ``mse`` equals :func:`mse_loss`."""
    if loss_type == "mse" and weights is None:  # the plain loss, computed exactly as before the options existed
        return F.mse_loss(pred.float(), target.float())
    d = pred.float() - target.float()
    if loss_type == "huber":
        err = 2 * huber_c * ((d.square() + huber_c ** 2).sqrt() - huber_c)
    elif loss_type == "mse":
        err = d.square()
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    per_sample = err.reshape(err.shape[0], -1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()


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

    ``enabled`` False (or inside :meth:`paused`) makes the hooks do nothing: model calls outside training
    (samples drawn during a run) neither record values nor draw query subsets.
    """

    def __init__(self, root: nn.Module, queries: int = 256, seed: int = 0):
        self.queries = queries
        self.enabled = True
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
            if not self.enabled:
                return
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
            if not self.enabled:
                return
            q = self._pending.pop(key, None)
            if q is not None:
                self.values.append(attention_entropy(q, out, heads))
        return hook

    @contextlib.contextmanager
    def paused(self):
        """Within the block the hooks neither record nor advance the generator; the state before it is kept."""
        was = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = was

    def reset(self, keep_subsets: bool = False) -> None:
        """Start a new step: forget the collected values and draw new query subsets (``keep_subsets``: the
        next micro-batch of the same optimizer step uses the same queries)."""
        self.values.clear()
        self._pending.clear()
        if not keep_subsets:
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
