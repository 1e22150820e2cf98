"""A pure-torch Host (training/host.py) for the RL core's unit tests: the ONLY fake host in the project.

It is small enough to run many epochs on a CPU in seconds, and built so that the prompt really controls
the image (the thing DESIGN.md §3 says tiny random models fail at):
- text encoder: words hashed (crc32, stable across processes) to token ids, an embedding, two
  self-attention layers whose q/k/v/out projections carry a LoRA (up initialised to zero, as PEFT does,
  or small random for gradient tests);
- denoiser: a conv net on the VP latent with a timestep embedding and cross-attention to the text
  tokens, fan-in initialised, the cross-attention output ×`text_strength` (default 10) so conditioning
  moves ε̂ by O(1) rather than O(1e-8);
- decoder: a fixed 1×1 colour map, nearest upsampling ×8 and a sigmoid, images B×H×W×3 in 0..1.
All frozen weights have requires_grad=False; only LoRA parameters are trainable.

`linear=True` swaps the denoiser and decoder for linear maps (ε̂ = W x + P·pooled text, image = the
latent itself, channels-last): then the final latent is an affine function of the LoRA'd text features
plus noise, and the exact gradient of a linear reward is known by back-propagating through the chain,
which is what the unbiasedness test compares the DDPO estimate against. The real ComfyUI host
(training/hosts/comfy.py) is tested against real comfy objects by the tests/test_train_* suite.
"""
from __future__ import annotations

import math
import zlib
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from texforce_pack.training.ddim import scaled_linear_alphas_cumprod


class LoraLinear(nn.Module):
    """y = W x + b + (alpha/rank)·up(down(x)); W, b frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gen: torch.Generator, up_std: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(base.in_features)
        self.down = nn.Parameter((torch.rand(rank, base.in_features, generator=gen) * 2 - 1) * bound)
        self.up = nn.Parameter(torch.randn(base.out_features, rank, generator=gen) * up_std)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled:
            y = y + self.scale * F.linear(F.linear(x, self.down), self.up)
        return y


class ToyTextEncoder(nn.Module):
    def __init__(self, dim: int, tokens: int, vocab: int, layers: int, rank: int, alpha: float,
                 gen: torch.Generator, up_std: float):
        super().__init__()
        self.tokens, self.vocab = tokens, vocab
        self.embed = nn.Parameter(torch.randn(vocab, dim, generator=gen), requires_grad=False)
        self.pos = nn.Parameter(torch.randn(tokens, dim, generator=gen) * 0.5, requires_grad=False)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.ModuleDict()
            for name in ("q", "k", "v", "out"):
                lin = nn.Linear(dim, dim)
                _fan_in_(lin, gen)
                block[name] = LoraLinear(lin, rank, alpha, gen, up_std)
            self.layers.append(block)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.tokens, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = p.lower().split()[: self.tokens]
            for j, w in enumerate(words):
                ids[i, j] = 1 + zlib.crc32(w.encode("utf-8")) % (self.vocab - 1)
        return ids

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        h = self.embed[self.token_ids(prompts)] + self.pos
        d = h.shape[-1]
        for block in self.layers:
            x = F.layer_norm(h, (d,))
            q, k, v = block["q"](x), block["k"](x), block["v"](x)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
            h = h + block["out"](att @ v)
        h = F.layer_norm(h, (d,))
        return {"cross_attn": h, "pooled": h.mean(dim=1)}


class ToyDenoiser(nn.Module):
    def __init__(self, channels: int, hidden: int, text_dim: int, gen: torch.Generator, text_strength: float):
        super().__init__()
        self.hidden, self.text_strength = hidden, text_strength
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(2 * 8, hidden)
        self.to_q = nn.Linear(hidden, hidden)
        self.to_k = nn.Linear(text_dim, hidden)
        self.to_v = nn.Linear(text_dim, hidden)
        self.film = nn.Linear(text_dim, 2 * hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                _fan_in_(m, gen)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = x.shape
        freqs = torch.exp(torch.arange(8, dtype=torch.float32) * -math.log(1000.0) / 8)
        ang = t.float()[:, None] * freqs[None, :]
        temb = self.time(torch.cat([ang.sin(), ang.cos()], dim=1))
        h = F.silu(self.conv_in(x) + temb[:, :, None, None])
        seq = h.flatten(2).transpose(1, 2)  # B × hw × hidden
        att = torch.softmax(self.to_q(seq) @ self.to_k(ctx).transpose(1, 2) / math.sqrt(self.hidden), dim=-1)
        text = (att @ self.to_v(ctx)).transpose(1, 2).reshape(b, self.hidden, hh, ww)
        scale, shift = self.film(pooled).chunk(2, dim=1)
        h = h + self.text_strength * text
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = F.silu(self.conv_mid(h))
        return self.conv_out(h)


def _fan_in_(m: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        fan_in = m.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1) * bound * math.sqrt(3))
        if m.bias is not None:
            m.bias.copy_((torch.rand(m.bias.shape, generator=gen) * 2 - 1) * bound)


def _batch(cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    return {k: torch.cat([uncond[k].expand(b, *uncond[k].shape[1:]), cond[k]], dim=0) for k in cond}


class ToyHost:
    """The Host protocol on the toy models above (CPU, fp32)."""

    def __init__(self, seed: int = 0, *, dim: int = 32, tokens: int = 8, vocab: int = 97, layers: int = 2,
                 channels: int = 4, hidden: int = 32, lora_rank: int = 4, lora_alpha: float = 4.0,
                 text_strength: float = 10.0, lora_up_std: float = 0.0, linear: bool = False):
        gen = torch.Generator().manual_seed(seed)
        self.device = torch.device("cpu")
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self.channels = channels
        self.encoder = ToyTextEncoder(dim, tokens, vocab, layers, lora_rank, lora_alpha, gen, lora_up_std)
        self.denoiser = ToyDenoiser(channels, hidden, dim, gen, text_strength)
        self.color = torch.randn(3, channels, generator=gen) / math.sqrt(channels)
        self.linear = linear
        self.lin_w = 0.3 * torch.randn(channels, channels, generator=gen) / math.sqrt(channels)
        self.lin_p = torch.randn(dim, channels, generator=gen) / math.sqrt(dim)
        self.in_training = False
        self.calls = {"encode": 0, "predict": 0, "decode": 0}

    # --- Host protocol ------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.channels, height // 8, width // 8)

    def decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        """decode() with gradients (linear mode only): for the exact-gradient reference in tests."""
        assert self.linear
        return latents.float().permute(0, 2, 3, 1)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.calls["encode"] += 1
        return self.encoder(list(prompts))

    @contextmanager
    def predictor(self, cond, uncond, guidance: float):
        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.calls["predict"] += 1
            b = x.shape[0]
            c = _batch(cond, uncond, b)
            if self.linear:
                text = (c["pooled"] @ self.lin_p)[:, :, None, None]
                eps = torch.einsum("oc,bchw->bohw", self.lin_w, torch.cat([x, x])) + text
                eps_u, eps_c = eps.float().chunk(2)
                return eps_u + guidance * (eps_c - eps_u)
            eps = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), c["cross_attn"], c["pooled"])
            eps_u, eps_c = eps.float().chunk(2)
            return eps_u + guidance * (eps_c - eps_u)

        yield predict

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.calls["decode"] += 1
        if self.linear:
            return latents.detach().float().permute(0, 2, 3, 1).contiguous().cpu()
        with torch.no_grad():
            rgb = torch.einsum("oc,bchw->bohw", self.color, latents.float())
            rgb = F.interpolate(rgb, scale_factor=8, mode="nearest")
            return torch.sigmoid(rgb).permute(0, 2, 3, 1).contiguous().cpu()

    def lora_modules(self) -> dict[str, LoraLinear]:
        return {name: m for name, m in self.encoder.named_modules() if isinstance(m, LoraLinear)}

    def set_schedule(self, timesteps: torch.Tensor) -> None:
        pass

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.lora_modules().values() for p in (m.down, m.up)]

    @contextmanager
    def lora_enabled(self, enabled: bool):
        mods = self.lora_modules().values()
        before = [m.enabled for m in mods]
        for m in mods:
            m.enabled = enabled
        try:
            yield
        finally:
            for m, e in zip(mods, before):
                m.enabled = e

    @contextmanager
    def training(self):
        prev = self.in_training
        self.in_training = True
        try:
            with torch.enable_grad():
                yield
        finally:
            self.in_training = prev

    def lora_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in self.lora_modules().items():
            out[f"{name}.lora_down"] = m.down.detach().clone()
            out[f"{name}.lora_up"] = m.up.detach().clone()
        return out

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        mods = self.lora_modules()
        expected = {f"{n}.lora_{s}" for n in mods for s in ("down", "up")}
        if set(state) != expected:
            raise ValueError(f"LoRA state keys differ: missing {sorted(expected - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - expected)[:3]}")
        with torch.no_grad():
            for name, m in mods.items():
                m.down.copy_(state[f"{name}.lora_down"])
                m.up.copy_(state[f"{name}.lora_up"])

    # --- test helpers -------------------------------------------------------------------------
    def frozen_parameters(self) -> list[torch.Tensor]:
        lora = {id(p) for p in self.trainable_parameters()}
        params = list(self.encoder.parameters()) + list(self.denoiser.parameters())
        return [p for p in params if id(p) not in lora]
