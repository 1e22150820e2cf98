"""How much device memory a run needs, estimated before the first epoch from the model's shape.

An analytic count, layer by layer, of what PyTorch holds for a U-Net of ComfyUI's UNetModel layout
(comfy/ldm/modules/diffusionmodules/openaimodel.py: ResBlocks, SpatialTransformers of BasicTransformerBlocks with
GEGLU feed-forwards, Down/Upsample, skip concatenations), given its config (ComfyUI's `unet_config`):

- a sampling step: no gradient; the weights, the skip tensors the U-Net keeps for its output blocks, and the
  working set of the largest layer. Classifier-free guidance sends cond and uncond through as one batch, 2×.
- a training micro-batch: forward + backward through the U-Net to reach the conditioning (2× batch with
  guidance), the text encoders' activations (encoded once per optimizer step; with the step's samples in prompt
  order only the current micro-batch's prompts and the negative prompt hold theirs: update.py StepEncoder; not
  their weight copies, which the host has recomputed in backward), LoRA + AdamW state. Without gradient checkpointing every tensor that autograd saves for
  backward is counted; with it (one checkpoint per U-Net layer, training/hosts/comfy.py) only each layer's input,
  plus one layer recomputed during backward.
- both: the epoch's stored trajectories (images_per_epoch × (steps+1) fp32 latents, kept on the device).

Transformers (SD 3.x's MMDiT: comfy/ldm/modules/diffusionmodules/mmdit.py; Flux: comfy/ldm/flux/) are walked block by
block instead (`transformer_layers`): joint / double-stream blocks over the image tokens and the text tokens, Flux's
single-stream blocks over both, what each op saves given what carries a gradient (the text stream from the first
block; the image stream from the first joint attention, or from the first modulation when the pooled vector carries
one). T5 encoders (comfy/text_encoders/t5.py) are counted like the CLIP ones (`T5EncoderSpec`).

Attention: "efficient" (PyTorch SDPA flash/memory-efficient kernels, xformers, flash-attn, sage: what ComfyUI
uses on NVIDIA/AMD/Intel GPUs) keeps O(tokens) per head for backward; "quadratic" (ComfyUI's sub-quadratic or
split attention, its CPU default, or --use-split/quad-cross-attention) keeps each head's softmax map,
batch·heads·tokens², for backward. Without gradient ComfyUI slices the quadratic kinds only when memory is short,
so sampling counts the largest self-attention's scores and softmax whole (an upper bound where it slices).
Not counted: the VAE and the reward models (ComfyUI loads them to decode and score, and the ComfyUI host has them
offloaded for the training pass), the CUDA context, allocator fragmentation.

The counts are per-element of what autograd saves, checked against a measurement on a tiny model
(tests/test_memory_plan.py); nothing here imports ComfyUI (the host reads the model: training/hosts/comfy.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import ConfigError

GIB = 1024 ** 3


@dataclass(frozen=True)
class UNetSpec:
    """The fields of ComfyUI's unet_config that set activation sizes and parameter counts."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]  # per input ResBlock
    transformer_depth_middle: int
    transformer_depth_output: tuple[int, ...]  # per output block (read from the end, as UNetModel pops them)
    context_dim: int
    num_heads: int = -1
    num_head_channels: int = -1
    use_linear_in_transformer: bool = False
    in_channels: int = 4
    out_channels: int = 4
    adm_in_channels: int | None = None
    legacy: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "UNetSpec":
        levels = len(config["channel_mult"])
        nrb = config["num_res_blocks"]
        nrb = tuple([nrb] * levels if isinstance(nrb, int) else nrb)
        depth = config.get("transformer_depth", 1)
        depth = tuple([depth] * sum(nrb) if isinstance(depth, int) else depth)
        out_depth = config.get("transformer_depth_output")
        if out_depth is None:
            out_depth = tuple(d for level in range(levels) for d in [depth[sum(nrb[:level])]] * (nrb[level] + 1))
        middle = config.get("transformer_depth_middle")
        context = config.get("context_dim")
        if isinstance(context, (list, tuple)):
            context = context[0]
        return cls(model_channels=int(config["model_channels"]), channel_mult=tuple(config["channel_mult"]),
                   num_res_blocks=nrb, transformer_depth=depth,
                   transformer_depth_middle=depth[-1] if middle is None else int(middle),
                   transformer_depth_output=tuple(out_depth), context_dim=int(context or 0),
                   num_heads=int(config.get("num_heads", -1)),
                   num_head_channels=int(config.get("num_head_channels", -1)),
                   use_linear_in_transformer=bool(config.get("use_linear_in_transformer", False)),
                   in_channels=int(config.get("in_channels", 4)), out_channels=int(config.get("out_channels", 4)),
                   adm_in_channels=config.get("adm_in_channels"), legacy=bool(config.get("legacy", False)))

    def heads(self, ch: int) -> tuple[int, int]:
        """(heads, head width) of a transformer at ch channels, as UNetModel picks them."""
        if self.num_head_channels == -1:
            return self.num_heads, ch // self.num_heads
        return ch // self.num_head_channels, self.num_head_channels


@dataclass(frozen=True)
class TextEncoderSpec:
    """One CLIP text transformer (ComfyUI's comfy.clip_model.CLIPTextModel_)."""

    width: int
    layers: int
    heads: int
    intermediate: int
    activation: str = "quick_gelu"
    tokens: int = 77


@dataclass(frozen=True)
class T5EncoderSpec:
    """One T5 encoder stack (ComfyUI's comfy.text_encoders.t5.T5: T5-XXL on SD 3.x and Flux), run with the host's
    out-of-place residuals; `tokens` is what ComfyUI's tokenizer pads to (at least 77 on SD 3.x, 256 on Flux)."""

    width: int
    layers: int
    heads: int
    head_width: int
    intermediate: int
    gated: bool = True  # T5 v1.1 (T5-XXL): gelu(wi_0 x) * wi_1 x; else act(wi x)
    tokens: int = 77


@dataclass(frozen=True)
class TransformerSpec:
    """The shape of an SD 3.x MMDiT ("mmdit") or a Flux transformer ("flux"), from ComfyUI's unet_config."""

    kind: str
    hidden: int
    heads: int
    depth: int  # joint blocks (MMDiT) or double-stream blocks (Flux)
    single_depth: int = 0  # Flux's single-stream blocks
    mlp_ratio: float = 4.0
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    context_in: int = 4096  # the text encoders' width, projected to `hidden`
    vector_in: int | None = None  # the pooled vector (MMDiT adm_in_channels, Flux vec_in_dim)
    qk_norm: bool = False  # RMSNorm of q and k per head (SD 3.5; always on Flux)
    x_self_attn_layers: tuple[int, ...] = ()  # MMDiT blocks with an image-only self-attention too (SD 3.5 M)
    qkv_bias: bool = True
    guidance_embed: bool = False  # Flux dev's distilled guidance input

    @classmethod
    def from_config(cls, config: dict) -> "TransformerSpec":
        """From ComfyUI's unet_config of an MMDiT (comfy.supported_models.SD3) or a Flux model (image_model "flux");
        ValueError for other layouts."""
        if config.get("image_model") == "flux":
            if config.get("global_modulation") or config.get("mlp_silu_act"):
                raise ValueError("Flux 2 layouts are not walked")
            return cls(kind="flux", hidden=int(config["hidden_size"]), heads=int(config["num_heads"]),
                       depth=int(config["depth"]), single_depth=int(config["depth_single_blocks"]),
                       mlp_ratio=float(config.get("mlp_ratio", 4.0)), patch_size=int(config.get("patch_size", 2)),
                       in_channels=int(config.get("in_channels", 16)), out_channels=int(config.get("out_channels", 16)),
                       context_in=int(config["context_in_dim"]), vector_in=config.get("vec_in_dim"), qk_norm=True,
                       qkv_bias=bool(config.get("qkv_bias", False)),
                       guidance_embed=bool(config.get("guidance_embed", False)))
        if "depth" in config and "image_model" not in config:
            if config.get("context_processor_layers") or config.get("swiglu") or config.get("rmsnorm"):
                raise ValueError("this MMDiT variant is not walked")
            depth = int(config["depth"])
            embedder = (config.get("context_embedder_config") or {}).get("params", {})
            return cls(kind="mmdit", hidden=64 * depth, heads=depth, depth=depth,
                       mlp_ratio=float(config.get("mlp_ratio", 4.0)), patch_size=int(config.get("patch_size", 2)),
                       in_channels=int(config.get("in_channels", 16)),
                       out_channels=int(config.get("out_channels") or config.get("in_channels", 16)),
                       context_in=int(embedder.get("in_features", 64 * depth)),
                       vector_in=config.get("adm_in_channels"), qk_norm=config.get("qk_norm") == "rms",
                       x_self_attn_layers=tuple(config.get("x_block_self_attn_layers") or ()),
                       qkv_bias=bool(config.get("qkv_bias", True)))
        raise ValueError("not an MMDiT or Flux config")

    @property
    def mlp(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    def image_tokens(self, height: int, width: int) -> int:
        """Patches of a height × width latent (both models pad to the patch size)."""
        p = self.patch_size
        return -(-height // p) * -(-width // p)


@dataclass
class Layer:
    """One U-Net layer's memory, in bytes per sample at the layer's resolution.

    What autograd saves depends on what needs a gradient: the U-Net's weights are frozen, so only tensors
    downstream of the conditioning carry gradients; the layers before the first cross-attention keep nothing.
    Linear layers with frozen weights keep no input; convolutions, norms, SiLU/GELU, products and attention do.
    """

    name: str
    kept: float  # saved for backward, created inside the layer (its output excluded)
    output: float  # the layer's output
    output_saved: bool  # the next layer saves the output (False before a skip concatenation, or without grad)
    input: float  # what a checkpointed layer keeps: its input (torch's checkpoint keeps it, gradient or not)
    transient: float  # the working set of a no-grad forward (input and output included)
    largest: float  # its largest single saved tensor (the size of the gradient buffers in its backward)
    params: int = 0
    skip: bool = False  # an input block's output, kept until its output block
    attention_map: float = 0.0  # quadratic attention: one self-attention's softmax map (what sampling holds)


def _attention(tokens: int, keys: int, heads: int, width: int, a: int, attention: str, upcast: bool,
               queries: bool = True) -> tuple[float, float]:
    """(bytes one attention keeps for backward, its largest tensor) per sample: q (when `queries`: k/v need it),
    k and v, and the softmax map (quadratic) or the output and logsumexp (efficient kernels)."""
    qkv = (tokens * width if queries else 0) + 2 * keys * width
    if attention == "efficient":
        return (qkv + tokens * width) * a + heads * tokens * 4, tokens * width * a
    map_bytes = 4 if upcast else a  # the softmax map (fp32 when the attention upcasts), + its cast for the product
    maps = heads * tokens * keys * (map_bytes + (a if upcast else 0))
    upcast_copies = (tokens + keys) * width * 4 if upcast else 0  # q and k in fp32
    return qkv * a + maps + upcast_copies, heads * tokens * keys * map_bytes


def unet_layers(spec: UNetSpec, height: int, width: int, context_tokens: int, act_bytes: int,
                attention: str = "efficient", upcast: bool = False) -> list[Layer]:
    """Every layer UNetModel runs, in order, for a latent of height × width (per sample, bytes), as the training
    pass sees it: gradients with respect to the conditioning only."""
    a, mc = act_bytes, spec.model_channels
    emb = 4 * mc
    L, ctx = context_tokens, spec.context_dim
    layers: list[Layer] = []
    grad = False  # does the current hidden state carry a gradient (is it downstream of a cross-attention)?

    def add(name: str, kept: float, output: float, transient: float, largest: float, params: int,
            skip: bool = False, input: float = 0.0) -> None:
        layers.append(Layer(name, kept if grad else 0.0, output, grad, input, transient,
                            largest if grad else 0.0, params, skip))

    def resblock(name: str, ci: int, co: int, n: int, cat: bool = False) -> None:
        # GroupNorm out, SiLU out (the conv keeps its input); h + emb, GroupNorm out, SiLU out; a concatenated
        # input is new (the GroupNorm keeps it)
        kept = n * a * (2 * ci + 3 * co + (ci if cat else 0))
        params = 2 * ci + 9 * ci * co + co + emb * co + co + 2 * co + 9 * co * co + co + (ci * co + co if ci != co else 0)
        if cat and layers:
            layers[-1].output_saved = False  # the concatenation copies it; nothing keeps the original
        add(name, kept, n * co * a, n * a * (ci + 2 * max(ci, co) + 2 * co + (ci if cat else 0)),
            n * a * max(ci, co), params, input=n * ci * a)

    def transformer(name: str, c: int, depth: int, n: int) -> None:
        nonlocal grad
        heads, dh = spec.heads(c)
        d = heads * dh
        lin = spec.use_linear_in_transformer
        params = 2 * c + c * d + d + depth * (4 * d * d + d + 2 * d * d + 2 * ctx * d + d
                                              + d * 8 * d + 8 * d + 4 * d * d + d + 6 * d) + d * c + c
        first = not grad  # the first cross-attention: what comes before it carries no gradient
        kept = 0.0 if first else n * a * ((0 if lin else c) + d)  # GroupNorm out (conv proj_in), token-major x
        largest = n * a * 8 * d
        for block in range(depth):
            if not (first and block == 0):  # self-attention: q k v (+ map), its residual (norm2's input)
                extra, big = _attention(n, n, heads, d, a, attention, upcast)
                kept += extra + n * d * a
                largest = max(largest, big)
            extra, big = _attention(n, L, heads, d, a, attention, upcast)  # cross-attention
            # its residual (norm3's input), the GEGLU projection (8d: gelu and the product keep its halves),
            # gelu's output (4d), and the block's output when another block follows (norm1's input)
            kept += extra + n * a * (d + 8 * d + 4 * d + (d if block < depth - 1 else 0))
            largest = max(largest, big)
        kept += 0 if lin else n * d * a  # the image-major copy that the conv proj_out keeps
        grad = True
        transient = n * a * (c + c + 17 * d)  # input, GroupNorm out, the feed-forward's working set
        self_map = heads * n * n * (4 if upcast else a) if attention == "quadratic" else 0.0
        layers.append(Layer(name, kept, n * c * a, True, n * c * a, transient, largest, params,
                            attention_map=self_map))

    h, w = height, width
    n = h * w
    add("conv_in", 0.0, n * mc * a, n * a * (spec.in_channels + mc), 0.0, spec.in_channels * mc * 9 + mc, skip=True,
        input=n * spec.in_channels * a)
    chans, ch = [mc], mc
    depth = list(spec.transformer_depth)
    for level, mult in enumerate(spec.channel_mult):
        for i in range(spec.num_res_blocks[level]):
            co = mult * mc
            resblock(f"in{level}.{i}.res", ch, co, n)
            ch = co
            dep = depth.pop(0)
            if dep > 0:
                transformer(f"in{level}.{i}.attn", ch, dep, n)
            layers[-1].skip = True
            chans.append(ch)
        if level != len(spec.channel_mult) - 1:
            n_in = n
            h, w = (h + 1) // 2, (w + 1) // 2
            n = h * w
            add(f"in{level}.down", 0.0, n * ch * a, n * ch * a + n_in * ch * a, n * ch * a, 9 * ch * ch + ch,
                skip=True, input=n_in * ch * a)
            chans.append(ch)
    resblock("mid.res0", ch, ch, n)
    if spec.transformer_depth_middle >= 0:
        transformer("mid.attn", ch, spec.transformer_depth_middle, n)
        resblock("mid.res1", ch, ch, n)
    out_depth = list(spec.transformer_depth_output)
    sizes = []  # the resolution of each level
    hh, ww = height, width
    for _ in spec.channel_mult:
        sizes.append((hh, ww))
        hh, ww = (hh + 1) // 2, (ww + 1) // 2
    for level, mult in list(enumerate(spec.channel_mult))[::-1]:
        h, w = sizes[level]
        n = h * w
        for i in range(spec.num_res_blocks[level] + 1):
            skip_ch = chans.pop()
            co = mc * mult
            resblock(f"out{level}.{i}.res", ch + skip_ch, co, n, cat=True)
            ch = co
            dep = out_depth.pop()
            if dep > 0:
                transformer(f"out{level}.{i}.attn", ch, dep, n)
            if level and i == spec.num_res_blocks[level]:
                up_h, up_w = sizes[level - 1]
                n_up = up_h * up_w
                # nearest upsampling (keeps nothing) then a conv that keeps the upsampled input
                add(f"out{level}.up", n_up * ch * a, n_up * ch * a, 2 * n_up * ch * a + n * ch * a, n_up * ch * a,
                    9 * ch * ch + ch, input=n * ch * a)
    n = height * width
    # GroupNorm (keeps the last block's output), SiLU out, conv (keeps its input); not checkpointed
    add("out", 2 * n * mc * a, n * spec.out_channels * a, n * a * (mc * 2 + spec.out_channels), n * mc * a,
        2 * mc + 9 * mc * spec.out_channels + spec.out_channels)
    layers[-1].output_saved = False
    return layers


def unet_parameters(spec: UNetSpec) -> int:
    """The U-Net's parameter count from its config (a check that unet_layers walks the real architecture)."""
    mc = spec.model_channels
    emb = 4 * mc
    time = mc * emb + emb + emb * emb + emb
    label = (spec.adm_in_channels * emb + emb + emb * emb + emb) if spec.adm_in_channels else 0
    return time + label + sum(layer.params for layer in unet_layers(spec, 8, 8, 1, 1))


def _stream_kept(n: int, spec: TransformerSpec, a: int, grad: bool, vector_grad: bool, copies: bool,
                 pre_only: bool = False) -> float:
    """Bytes one stream of a joint / double-stream block keeps for backward, besides the joint attention, for n
    tokens. `grad`: the stream carries a gradient into the block; `vector_grad`: the pooled vector does (then every
    modulation keeps what it scales: the norms' outputs, the attention projection, the MLP output)."""
    d, heads = spec.hidden, spec.heads
    mod = n * d * a if vector_grad else 0.0
    kept = (n * d * a + 8 * n if grad else 0.0) + mod  # norm1's input (+ its fp32 mean/rstd), the modulated norm
    if spec.qk_norm and (grad or vector_grad):  # RMSNorm of q and k: their views of qkv (their copies on Flux)
        kept += (2 if copies else 3) * n * d * a + 2 * n * heads * 4
    if pre_only:
        return kept
    # the attention projection (gated), the residual (norm2's input), the modulated norm2, the MLP's GELU input,
    # the MLP output (gated)
    return kept + 3 * mod + n * d * a + 8 * n + n * spec.mlp * a


def _x_self_attention_kept(n: int, spec: TransformerSpec, a: int, attention: str, upcast: bool,
                           vector_grad: bool) -> tuple[float, float]:
    """(kept, largest) of SD 3.5's image-only self-attention in a joint block: its q k v (views of its qkv; with
    the qk norm, the normed q and k as well), the attention, the gated projection."""
    kept, big = _attention(n, n, spec.heads, spec.hidden, a, attention, upcast)
    if spec.qk_norm:
        kept += 2 * n * spec.hidden * a + 2 * n * spec.heads * 4
    return kept + (n * spec.hidden * a if vector_grad else 0.0), big


def _single_kept(t: int, spec: TransformerSpec, a: int, attention: str, upcast: bool, vector_grad: bool,
                 copies: bool) -> tuple[float, float]:
    """(kept, largest) of a Flux single-stream block over t tokens: its input, the modulated norm, q and k (RMSNorm),
    the attention (q k after RoPE, v), the MLP half's GELU input, the gated output. Without copies q, k, v and the
    MLP half are views of linear1's one output, which is kept whole."""
    d, m = spec.hidden, spec.mlp
    mod = t * d * a if vector_grad else 0.0
    att, big = _attention(t, t, spec.heads, d, a, attention, upcast)
    views = (2 * t * d + t * m) * a if copies else (3 * d + m) * t * a - t * d * a  # v counted by the attention
    return t * d * a + 8 * t + 2 * mod + views + 2 * t * spec.heads * 4 + att, max(big, t * m * a)


def transformer_layers(spec: TransformerSpec, height: int, width: int, text_tokens: int, act_bytes: int,
                       attention: str = "efficient", upcast: bool = False, vector_grad: bool = True,
                       copies: bool = False) -> list[Layer]:
    """Every block of an MMDiT / Flux transformer for a latent of height × width and `text_tokens` text tokens (per
    sample, bytes), as the training pass sees it: gradients from the conditioning (the text tokens, and the pooled
    vector when `vector_grad`). `copies`: the host saves copies of saved activations (Flux adds residuals in
    place), so a saved view is a tensor of its own size. Each layer's `kept` includes the inputs it saves."""
    a, d, heads = act_bytes, spec.hidden, spec.heads
    n, L = spec.image_tokens(height, width), text_tokens
    t = n + L
    flux = spec.kind == "flux"
    layers = [Layer("embed", 8 * t * (d // heads) if flux else 0.0, t * d * a, False, 0.0,
                    a * (t * d + L * spec.context_in), 0.0, _embed_parameters(spec))]
    image_grad = False  # the image stream's gradient comes from the first joint attention (or the vector's modulation)
    map_bytes = 4 if upcast else a
    for i in range(spec.depth):
        pre_only = spec.kind == "mmdit" and i == spec.depth - 1
        att, big = _attention(t, t, heads, d, a, attention, upcast)
        kept = att + _stream_kept(L, spec, a, True, vector_grad, copies, pre_only)
        kept += _stream_kept(n, spec, a, image_grad, vector_grad, copies)
        big = max(big, n * spec.mlp * a)
        if i in spec.x_self_attn_layers and (image_grad or vector_grad):
            extra, big2 = _x_self_attention_kept(n, spec, a, attention, upcast, vector_grad)
            kept, big = kept + extra, max(big, big2)
        image_grad = True
        transient = a * (9 * t * d + max(n, L) * spec.mlp)
        amap = heads * t * t * map_bytes if attention == "quadratic" else 0.0
        layers.append(Layer(f"block{i}", kept, t * d * a, False, t * d * a, transient, big,
                            _block_parameters(spec, i), attention_map=amap))
    for i in range(spec.single_depth):
        kept, big = _single_kept(t, spec, a, attention, upcast, vector_grad, copies)
        transient = a * t * (2 * (3 * d + spec.mlp) + 4 * d)
        amap = heads * t * t * map_bytes if attention == "quadratic" else 0.0
        layers.append(Layer(f"single{i}", kept, t * d * a, False, t * d * a, transient, big,
                            _single_parameters(spec), attention_map=amap))
    # the final layer: norm_final's input (the image tokens) and the modulated norm; around the model, ComfyUI's
    # calc_cond_batch keeps two latent-sized fp32 tensors (the area mask it multiplies by, the count it divides by)
    out = spec.patch_size ** 2 * spec.out_channels
    latent = 2 * height * width * spec.in_channels * 4
    layers.append(Layer("final", n * d * a + 8 * n + (n * d * a if vector_grad else 0.0) + latent, n * out * a, False,
                        n * d * a, a * n * (2 * d + out), n * d * a, d * 2 * d + 2 * d + d * out + out))
    return layers


def _mlp_embedder(i: int, d: int) -> int:
    return i * d + d + d * d + d


def _embed_parameters(spec: TransformerSpec) -> int:
    """The patch, time, pooled-vector, guidance and context embedders."""
    d, p = spec.hidden, spec.patch_size
    params = spec.in_channels * p * p * d + d + _mlp_embedder(256, d) + spec.context_in * d + d
    params += _mlp_embedder(spec.vector_in, d) if spec.vector_in else 0
    return params + (_mlp_embedder(256, d) if spec.guidance_embed else 0)


def _attention_parameters(spec: TransformerSpec, proj: bool = True) -> int:
    d = spec.hidden
    return (d * 3 * d + (3 * d if spec.qkv_bias else 0) + (d * d + d if proj else 0)
            + (2 * (d // spec.heads) if spec.qk_norm else 0))


def _block_parameters(spec: TransformerSpec, i: int) -> int:
    """A joint (MMDiT: context and x DismantledBlocks; the last context block attends only) or double-stream block."""
    d, m = spec.hidden, spec.mlp
    mlp = d * m + m + m * d + d
    if spec.kind == "flux":
        return 2 * (d * 6 * d + 6 * d + _attention_parameters(spec) + mlp)
    pre_only = i == spec.depth - 1
    context = (_attention_parameters(spec, proj=not pre_only) + (0 if pre_only else mlp)
               + (d * 2 * d + 2 * d if pre_only else d * 6 * d + 6 * d))
    self_attn = i in spec.x_self_attn_layers
    x = _attention_parameters(spec) + mlp + (_attention_parameters(spec) + d * 9 * d + 9 * d if self_attn
                                             else d * 6 * d + 6 * d)
    return context + x


def _single_parameters(spec: TransformerSpec) -> int:
    d, m = spec.hidden, spec.mlp
    return d * (3 * d + m) + 3 * d + m + (d + m) * d + d + 2 * (d // spec.heads) + d * 3 * d + 3 * d


def transformer_parameters(spec: TransformerSpec) -> int:
    """The transformer's parameter count from its config (a check that transformer_layers walks the real model)."""
    return sum(layer.params for layer in transformer_layers(spec, 2, 2, 1, 1))


def transformer_checkpointed_kept(layers: list[Layer], recompute: bool = True) -> float:
    """What a training pass keeps with one checkpoint per block (SD 3.x's joint blocks): each block's inputs, the
    final layer's own, and during backward one block recomputed at a time (`recompute`)."""
    blocks = [layer for layer in layers if layer.name.startswith(("block", "single"))]
    kept = sum(layer.input for layer in blocks) + layers[-1].kept + layers[0].kept
    return kept + (max(layer.kept for layer in blocks) if recompute else 0.0)


def t5_kept(enc: T5EncoderSpec, rows: int, act_bytes: int, attention: str) -> float:
    """Bytes a T5 encoder keeps for backward for `rows` prompts (one forward each). Per block: each RMSNorm's input
    and rsqrt, the normed input of the LoRA'd q/k/v, q, the scaled k, v and the attention's output and logsumexp
    (or softmax map), o's input, the feed-forward's activations (gated: wi_0's output, its GELU, wi_1's output);
    the relative position bias (computed once; the efficient kernels keep it as every block's mask); the final norm.
    The first block's input carries no gradient (its norm keeps nothing, its q/k/v keep their input only).

    Not the linear weights: ComfyUI's ops copy every wrapped weight per forward and each linear saves its copy for
    the gradient of its input, but the host has autograd keep a recipe instead (hosts/comfy.py WeightCopies: 19 GB
    a prompt for T5-XXL in fp32); the RMSNorms' weight copies are kept."""
    t, d, heads = enc.tokens, enc.width, enc.heads
    inner, a = enc.heads * enc.head_width, act_bytes
    attn, _ = _attention(t, t, heads, inner, a, attention, False)
    ff = (3 if enc.gated else 1) * t * enc.intermediate * a
    block = 2 * (t * d * a + t * a) + t * d * a + attn + t * inner * a + ff
    first = block - (t * d * a + t * a)
    bias = heads * t * t * a if attention == "efficient" else 0.0  # SDPA keeps its mask; the others add it
    activations = first + (enc.layers - 1) * block + bias + t * d * a + t * a
    return rows * (activations + (2 * enc.layers + 1) * d * a)  # + the norms' weights


def text_encoder_kept(enc: TextEncoderSpec | T5EncoderSpec, rows: int, act_bytes: int, attention: str) -> float:
    """Bytes a text encoder keeps for backward for `rows` prompts (every layer: the pooled output reads the last)."""
    if isinstance(enc, T5EncoderSpec):
        return t5_kept(enc, rows, act_bytes, attention)
    t, d, i = enc.tokens, enc.width, enc.intermediate
    act = 3 * i if enc.activation == "quick_gelu" else 2 * i  # fc1 out, (sigmoid out), activation out
    per_layer = t * act_bytes * (9 * d + act)
    per_layer += enc.heads * t * (4 if attention == "efficient" else t * act_bytes)
    return rows * (enc.layers * per_layer + 2 * t * d * act_bytes)


def saved_kept(layers: list[Layer]) -> float:
    """Bytes per sample that a training forward keeps for backward (no checkpointing)."""
    return sum(layer.kept + (layer.output if layer.output_saved else 0.0) for layer in layers)


def checkpointed_kept(layers: list[Layer], recompute: bool = True) -> float:
    """The same with one checkpoint per layer (the output head excepted): each layer keeps its input; backward
    recomputes one layer at a time, holding its activations meanwhile (`recompute`)."""
    *body, head = layers
    inputs = sum(layer.input for layer in body) + body[-1].output + head.kept  # the head keeps its input
    return inputs + (max(layer.kept + layer.output for layer in body) if recompute else 0.0)


@dataclass(frozen=True)
class PlanInputs:
    """Everything the estimate reads: the model's shape and precision (from the host), the run's settings. The
    diffusion model is a U-Net (`unet`) or a transformer (`transformer`, with `unet` None); the unet_* sizes are
    the diffusion model's either way."""

    unet: UNetSpec | None
    encoders: tuple[TextEncoderSpec | T5EncoderSpec, ...]
    latent: tuple[int, int, int]  # (C, h, w)
    sample_batch: int
    train_batch: int
    guidance: bool  # classifier-free guidance: cond and uncond in one 2× batch
    images_per_epoch: int
    steps: int
    act_bytes: int  # the U-Net's compute dtype (2: fp16/bf16, 4: fp32)
    unet_weight_bytes: int
    unet_parameters: int
    clip_weight_bytes: int
    clip_act_bytes: int = 2
    attention: str = "efficient"  # or "quadratic"
    upcast_attention: bool = False
    weights_cast: bool = False  # weights stored in another dtype than computed (ComfyUI manual cast): per-op copies
    lora_parameters: int = 0
    checkpointing: bool = False
    context_tokens: int = 77  # the text tokens the diffusion model attends to
    count_weights: bool = True  # False under ComfyUI's --lowvram / --novram, which stream the weights
    transformer: TransformerSpec | None = None
    vector_grad: bool = True  # a transformer's pooled vector carries a gradient (a CLIP encoder is trained)
    inplace_residuals: bool = False  # Flux: the host saves copies of saved activations and cannot checkpoint
    negative_with_grad: bool = True  # the negative prompt is encoded with gradient (not on Flux: no negative pass)

    def __post_init__(self) -> None:
        if (self.unet is None) == (self.transformer is None):
            raise ValueError("PlanInputs needs a U-Net spec or a transformer spec (one of them)")

    def unet_batch(self, batch: int) -> int:
        return batch * (2 if self.guidance else 1)

    @property
    def model_label(self) -> str:
        return "U-Net" if self.unet is not None else "transformer"

    def layers(self) -> list[Layer]:
        """The diffusion model's layers for this run's latent and text tokens."""
        c, h, w = self.latent
        if self.unet is not None:
            return unet_layers(self.unet, h, w, self.context_tokens, self.act_bytes, self.attention,
                               self.upcast_attention)
        return transformer_layers(self.transformer, h, w, self.context_tokens, self.act_bytes, self.attention,
                                  self.upcast_attention, self.vector_grad, self.inplace_residuals)

    def kept(self, layers: list[Layer], recompute: bool = True) -> float:
        """Bytes per sample the training pass keeps for backward (checkpointed or not)."""
        if not self.checkpointing:
            return saved_kept(layers)
        if self.unet is not None:
            return checkpointed_kept(layers, recompute)
        return transformer_checkpointed_kept(layers, recompute)


@dataclass
class MemoryPlan:
    """Peak bytes of a sampling step and of a training micro-batch, with the parts they add up from."""

    inputs: PlanInputs
    sampling: dict[str, float] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)

    @property
    def sampling_peak(self) -> float:
        return sum(self.sampling.values())

    @property
    def training_peak(self) -> float:
        return sum(self.training.values())

    @property
    def peak(self) -> float:
        return max(self.sampling_peak, self.training_peak)

    def describe(self) -> str:
        def parts(d: dict[str, float]) -> str:
            return ", ".join(f"{k} {v / GIB:.2f}" for k, v in d.items() if v >= 0.005 * GIB)
        return (f"sampling {self.sampling_peak / GIB:.2f} GiB ({parts(self.sampling)}); training "
                f"{self.training_peak / GIB:.2f} GiB ({parts(self.training)})")


def plan_memory(p: PlanInputs) -> MemoryPlan:
    c, h, w = p.latent
    layers = p.layers()
    weights = (p.unet_weight_bytes + p.clip_weight_bytes) if p.count_weights else 0
    trajectory = p.images_per_epoch * (p.steps + 1) * c * h * w * 4
    plan = MemoryPlan(p)

    # sampling: walk the layers, holding the skips, at each layer its working set
    alive, peak = 0.0, 0.0
    skips = [layer for layer in layers if layer.skip]
    consumed = 0
    for layer in layers:
        if layer.name.startswith("out") and layer.name.endswith(".res"):
            consumed += 1
            alive -= skips[-consumed].output
        peak = max(peak, alive + layer.transient)
        if layer.skip:
            alive += layer.output
    b_sample = p.unet_batch(p.sample_batch)
    # quadratic attention without gradient: ComfyUI slices the maps only when memory is short, so with memory
    # free the largest attention's scores and softmax are both whole (measured: SD 1.5 512² on the CPU, 2.24 GiB
    # above the weights where the maps alone are 2.15 GiB)
    maps = 2 * max(layer.attention_map for layer in layers)
    plan.sampling = {"weights": weights, f"{p.model_label} working set": b_sample * peak, "attention maps": b_sample * maps,
                     "trajectories": trajectory}

    b_train = p.unet_batch(p.train_batch)
    largest = max(layer.largest for layer in layers)
    kept = p.kept(layers)
    # weight copies: one layer's at a time when checkpointed, else every layer's (kept by autograd)
    cast_params = max(layer.params for layer in layers) if p.checkpointing else p.unet_parameters
    unet = b_train * (kept + 2 * largest)  # + the gradient buffers of the largest tensor's backward
    rows = p.train_batch + int(p.negative_with_grad)  # the micro-batch's prompts (at most) and the negative prompt
    plan.training = {
        "weights": weights,
        f"{p.model_label} activations": unet,
        f"{p.model_label} weight copies": cast_params * p.act_bytes if p.weights_cast else 0.0,
        "text encoders": sum(text_encoder_kept(e, rows, p.clip_act_bytes, p.attention) for e in p.encoders),
        "LoRA + AdamW": p.lora_parameters * 4 * 4,
        "trajectories": trajectory,
    }
    return plan


class MemoryPlanError(ConfigError):
    """The run's settings need more memory than the device has; the message says what to lower."""


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


# The plan has come out below the measured peak by up to this fraction (README's full-size table: SD 1.5 512² fp32
# on the CPU, 6% without checkpointing, 13% with it): a run whose estimate is closer than this to what is available
# may still run out of memory, and is warned about (not refused: the plan is an estimate).
UNDER_ESTIMATE = 0.15


def _resident(plan: MemoryPlan, device: str) -> float:
    """What of the plan is already in memory before the run: on the CPU the weights are in RAM."""
    return plan.training["weights"] if device.startswith("cpu") else 0.0


def close_to_limit(plan: MemoryPlan, available: float, device: str) -> str | None:
    """A warning when the run fits by the plan but by less than UNDER_ESTIMATE of what is available (None
    otherwise); call after check_fits."""
    need = plan.peak - _resident(plan, device)
    if need <= (1 - UNDER_ESTIMATE) * available:
        return None
    return (f"This run is close to the {device} memory limit: it needs about {_gib(need)} by the plan and "
            f"{_gib(available)} is available. The plan is an estimate (it has come out up to 13% below measured "
            "full-size peaks); if the run stops with an out-of-memory error, lower the batch size or the width/height, or turn "
            "gradient checkpointing on.")


def check_fits(plan: MemoryPlan, available: float, device: str, *, batch_label: str = "batch_size",
               size_label: str = "width/height", checkpointing_label: str = "gradient_checkpointing") -> None:
    """Raise MemoryPlanError when the plan's peak exceeds `available` bytes on `device` (what the device has free,
    plus what the model manager could unload). On the CPU the weights are already in RAM: only the rest has to fit
    into the available RAM, and nothing else is refused. The message gives the estimate, what is free, and the
    estimate of each way to lower it."""
    p = plan.inputs
    cpu = device.startswith("cpu")
    resident = _resident(plan, device)
    need = plan.peak - resident
    if need <= available:
        return
    phase = "a training micro-batch" if plan.training_peak >= plan.sampling_peak else "a sampling step"
    worst = plan.training if plan.training_peak >= plan.sampling_peak else plan.sampling
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(worst.items(), key=lambda kv: -kv[1]) if v >= 0.05 * GIB)
    options = []
    batch = max(p.sample_batch, p.train_batch)
    if batch > 1:
        smaller = max(1, batch // 2)
        q = dataclasses.replace(p, sample_batch=min(p.sample_batch, smaller), train_batch=min(p.train_batch, smaller))
        options.append(f"{batch_label} {batch} → {smaller}: {_gib(plan_memory(q).peak - resident)}")
    c, h, w = p.latent
    if h * w > 16:
        q = dataclasses.replace(p, latent=(c, max(1, h * 3 // 4), max(1, w * 3 // 4)))
        options.append(f"{size_label} ×3/4: {_gib(plan_memory(q).peak - resident)}")
    if not p.checkpointing and not p.inplace_residuals:
        q = dataclasses.replace(p, checkpointing=True)
        options.append(f"{checkpointing_label} on: {_gib(plan_memory(q).peak - resident)}")
    where = "RAM" if cpu else "memory"
    raise MemoryPlanError(
        f"This run does not fit in {device} {where}: {phase} needs about {_gib(need)} ({parts}), and "
        f"{_gib(available)} is available. Lower what costs most; estimates: " + "; ".join(options) + ". "
        "(An analytic estimate of the weights and the activations kept for backward; see training/memory_plan.py.)")
