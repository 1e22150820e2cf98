"""Reward models on tiny random weights in the published layouts, checked against independent references.

Preprocessing tolerance (stated once): our torch resize/crop/normalise vs PIL's uint8 pipeline differs by
PIL's 8-bit rounding: on smooth images at most 0.02 in normalised units (≈1.4/255 before dividing by the
CLIP std ≈0.27) and 0.006 on average. (On pixel noise PIL also clips between its horizontal and vertical
passes, which a float pipeline does not; real images are not pixel noise.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import conftest  # noqa: F401  (ComfyUI and the pack as texforce_pack)
from reward_builders import (AESTHETIC_HEAD_FILE, TINY_OPENCLIP, tiny_hf_clip, tiny_hps_checkpoint, tiny_imagereward,
                             tiny_owl, tiny_yunet)

from texforce_pack.rewards import (aesthetic, clip_models, detectors, diversity, hps, imagereward, mix,  # noqa: E402
                                   preprocess, weights)
from texforce_pack.rewards.base import RewardInputError  # noqa: E402

MEAN, STD = torch.tensor(preprocess.CLIP_MEAN), torch.tensor(preprocess.CLIP_STD)


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency colour fields quantised to 8 bits (like decoded images), B×H×W×3."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    return (x.permute(0, 2, 3, 1) * 255).round() / 255


def pil_reference(img: torch.Tensor, size: int = 224, rounding: str = "floor") -> torch.Tensor:
    """The reference pipeline written out with PIL: bicubic shortest side → centre crop → /255 → mean/std."""
    pil = Image.fromarray((img.numpy() * 255).round().astype(np.uint8))
    w, h = pil.size
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    pil = pil.resize((nw, nh), Image.BICUBIC)
    off = (lambda m: (m // 2)) if rounding == "floor" else (lambda m: int(round(m / 2.0)))
    top, left = off(nh - size), off(nw - size)
    arr = np.asarray(pil.crop((left, top, left + size, top + size))).astype(np.float32) / 255
    return ((torch.from_numpy(arr) - MEAN) / STD).permute(2, 0, 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_models")
    out = {"l14": tiny_hf_clip(root / "clip-vit-large-patch14", seed=1, projection_dim=768),
           "pick": tiny_hf_clip(root / "PickScore_v1", seed=2, logit_scale=4.6052),
           "clip": tiny_hf_clip(root / "clip-any", seed=3),  # seed 3: cosines of both signs for the clamp
           "hps": tiny_hps_checkpoint(root / "HPS_v2.1_compressed.pt", seed=3),
           "ir": tiny_imagereward(root / "imagereward", seed=4), "yunet": tiny_yunet(root / "yunet_final.pth", seed=5),
           "owl": tiny_owl(root / "owlvit-base-patch32", seed=6),
           "owl2": tiny_owl(root / "owlv2-base-patch16-ensemble", v2=True, seed=7), "root": root}
    return out


@pytest.fixture(scope="module")
def pickscore(models):
    return clip_models.PickScoreReward.from_folder(models["pick"])


# ---------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("h,w", [(50, 71), (300, 257), (64, 64), (97, 500)])
def test_clip_preprocessing_matches_pil_reference(h, w):
    x = smooth_images(1, h, w, seed=h)
    ours = preprocess.ClipPreprocess()(x)[0]
    ref = pil_reference(x[0])
    assert ours.shape == ref.shape == (3, 224, 224)
    d = (ours - ref).abs()
    assert d.max() <= 0.02 and d.mean() <= 0.006, (d.max(), d.mean())


def test_openclip_preprocessing_matches_open_clip_transform():
    import open_clip

    x = smooth_images(1, 97, 501, seed=5)
    pil = Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8))
    ref = open_clip.image_transform(224, is_train=False)(pil)
    d = (preprocess.ClipPreprocess(crop_rounding="round")(x)[0] - ref).abs()
    assert d.max() <= 0.02 and d.mean() <= 0.006, (d.max(), d.mean())
    assert (pil_reference(x[0], rounding="round") - ref).abs().max() < 1e-5  # our PIL reference = open_clip's


def test_preprocessing_reads_the_folder_config_handles_channels_sizes_and_is_differentiable(models):
    pre = preprocess.ClipPreprocess.from_hf_folder(models["l14"])
    assert (pre.size, pre.crop) == (224, 224) and pre.mean == preprocess.CLIP_MEAN
    x = smooth_images(2, 64, 80)
    grey = x[..., :1]
    assert torch.equal(pre(grey), pre(grey.expand(-1, -1, -1, 3)))
    assert torch.equal(pre(torch.cat([x, torch.ones_like(x[..., :1])], -1)), pre(x))  # alpha dropped
    mixed = [x[0], smooth_images(1, 120, 40)[0]]  # a list of images of different sizes
    out = pre(mixed)
    assert out.shape == (2, 3, 224, 224) and torch.allclose(out[0], pre(x[:1])[0])
    xg = x.clone().requires_grad_(True)
    pre(xg).square().sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    with pytest.raises(RewardInputError, match="B×H×W×C"):
        pre(torch.rand(2, 3, 64, 64))
    with pytest.raises(RewardInputError, match="NaN"):
        pre(torch.full((1, 8, 8, 3), float("nan")))


# ---------------------------------------------------------------- aesthetic

class Evil:
    """A pickle that would run code when loaded without weights_only."""

    def __reduce__(self):
        return (print, ("code ran",))


def hand_mlp(state: dict, e: torch.Tensor) -> torch.Tensor:
    """The LAION head written out: five affine maps (dropout is identity at inference, no activations)."""
    for i in (0, 2, 4, 6, 7):
        e = e @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return e.squeeze(-1)


def test_published_aesthetic_head_loads_with_its_key_names_and_matches_a_hand_written_mlp():
    state = torch.load(AESTHETIC_HEAD_FILE, map_location="cpu", weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                      "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                      "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16),
                      "layers.7.bias": (1,)}
    head = aesthetic.load_aesthetic_head(AESTHETIC_HEAD_FILE)
    e = F.normalize(torch.randn(6, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.testing.assert_close(head(e).squeeze(-1), hand_mlp(state, e), rtol=1e-5, atol=1e-5)


def test_aesthetic_reward_equals_clip_embedding_then_head(models):
    from transformers import CLIPModel

    reward = aesthetic.AestheticReward.from_files(models["l14"], AESTHETIC_HEAD_FILE)
    x = smooth_images(3, 224, 224, seed=1)  # already 224: preprocessing is only mean/std
    scores = reward(x, ["a", "b", "c"])
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(scores, reward(x, None))  # deterministic; prompts do not matter
    clip = CLIPModel.from_pretrained(str(models["l14"])).eval()
    pixels = ((x - MEAN) / STD).permute(0, 3, 1, 2)
    with torch.no_grad():
        emb = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    state = torch.load(AESTHETIC_HEAD_FILE, map_location="cpu", weights_only=True)
    torch.testing.assert_close(scores, hand_mlp(state, F.normalize(emb, dim=-1)), rtol=1e-4, atol=1e-4)
    # differentiable through preprocessing and CLIP (cheap to allow, useful for gradient-based rewards)
    xg = smooth_images(2, 96, 96).requires_grad_(True)
    reward(xg, None).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_aesthetic_refuses_wrong_files(models, tmp_path):
    bad = tmp_path / "head.pth"
    torch.save({"fc.weight": torch.zeros(1, 768)}, bad)
    with pytest.raises(weights.BadWeightsError, match="layers.0.weight"):
        aesthetic.load_aesthetic_head(bad)
    torch.save({"layers.0.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(weights.BadWeightsError, match="weights_only"):
        aesthetic.load_aesthetic_head(tmp_path / "evil.pth")
    with pytest.raises(weights.MissingWeightsError) as e:
        aesthetic.load_aesthetic_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert "models/reward_models" in str(e.value) and "improved-aesthetic-predictor" in str(e.value)
    # a CLIP whose embedding is not 768-dim cannot feed the published head
    with pytest.raises(weights.BadWeightsError, match="768"):
        aesthetic.AestheticReward.from_files(models["pick"], AESTHETIC_HEAD_FILE)


# ---------------------------------------------------------------- PickScore / CLIPScore

def reference_clip_logits(folder, x: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """PickScore's README computation: processor text + CLIPModel forward; returns (diag logits, logit_scale)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))(prompts, padding=True, truncation=True, max_length=77,
                                                     return_tensors="pt")
    pixels = torch.stack([pil_reference(img) for img in x])
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(**tok).pooler_output)
        cos = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    return cos, model.logit_scale.exp().detach()


def test_pickscore_equals_logit_scale_times_cosine(models, pickscore):
    x = smooth_images(3, 224, 224, seed=2)
    prompts = ["a photo of a cat", "an astronaut riding a horse", "a red cube"]
    scores = pickscore(x, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and torch.equal(scores, pickscore(x, prompts))
    cos, scale = reference_clip_logits(models["pick"], x, prompts)
    assert abs(float(scale) - 100.0) < 1e-2  # the logit scale stored in the folder is the one used
    torch.testing.assert_close(scores, scale * cos, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(pickscore(x, prompts[::-1]), scores)  # the prompt matters
    torch.testing.assert_close(pickscore(x, ["a red cube"]), pickscore(x, ["a red cube"] * 3))  # one for all
    with pytest.raises(RewardInputError, match="3 images but 2 prompts"):
        pickscore(x, prompts[:2])


def test_clipscore_is_100_times_clamped_cosine(models):
    reward = clip_models.ClipScoreReward.from_folder(models["clip"])
    x = smooth_images(4, 100, 140, seed=3)
    prompts = ["a", "b c", "a red cube", "two dogs"]
    cos, _ = reference_clip_logits(models["clip"], x, prompts)
    assert (cos > 0.01).any() and (cos < -0.01).any()  # both branches of the clamp are exercised
    torch.testing.assert_close(reward(x, prompts), 100 * cos.clamp_min(0), rtol=1e-3, atol=0.25)
    assert (reward(x, prompts) >= 0).all()


# ---------------------------------------------------------------- HPS

def test_hps_equals_open_clip_reference_and_loads_the_checkpoint_layouts(models, tmp_path):
    import open_clip

    reward = hps.HpsReward.from_checkpoint(models["hps"], model_name=TINY_OPENCLIP)
    assert reward.name == "hpsv2.1"
    x = smooth_images(2, 256, 300, seed=4)
    prompts = ["a cat", "a dog"]
    scores = reward(x, prompts)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and torch.equal(scores, reward(x, prompts))
    # reference: open_clip's own model, transform and tokenizer, HPSv2's score = diag(img @ txt.T)
    model = open_clip.create_model(TINY_OPENCLIP, pretrained=None)
    model.load_state_dict(torch.load(models["hps"], weights_only=True)["state_dict"])
    model.eval()
    tf = open_clip.image_transform(224, is_train=False)
    pixels = torch.stack([tf(Image.fromarray((i.numpy() * 255).round().astype(np.uint8))) for i in x])
    with torch.no_grad():
        ref = torch.diagonal(model.encode_image(pixels, normalize=True)
                             @ model.encode_text(open_clip.get_tokenizer(TINY_OPENCLIP)(prompts), normalize=True).T)
    torch.testing.assert_close(scores, ref, rtol=1e-3, atol=2e-3)
    # a bare state dict with DDP's "module." prefix loads too (HPS v2 name → v2)
    state = torch.load(models["hps"], weights_only=True)["state_dict"]
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "HPS_v2_compressed.pt")
    v2 = hps.HpsReward.from_checkpoint(tmp_path / "HPS_v2_compressed.pt", model_name=TINY_OPENCLIP)
    assert v2.name == "hpsv2" and torch.equal(v2(x, prompts), scores)
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, tmp_path / "HPS_bad.pt")
    with pytest.raises(weights.BadWeightsError, match="ViT-H-14"):
        hps.HpsReward.from_checkpoint(tmp_path / "HPS_bad.pt", model_name=TINY_OPENCLIP)


def test_hps_loads_the_training_checkpoint_layout_with_weights_only(models, tmp_path):
    """HPSv2's save_ckpt writes {"iterations", "name", "state_dict", "optimizer"(, "scaler")}; the compressed
    releases keep that dict. Ints, strings, optimizer and scaler state and fp16 tensors all pass weights_only."""
    state = torch.load(models["hps"], weights_only=True)["state_dict"]
    full = {"iterations": 4000, "name": "HPS_v2.1", "state_dict": {k: v.half() for k, v in state.items()},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                          "param_groups": [{"lr": 3.3e-6, "betas": (0.9, 0.98), "params": [0]}]},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 12}}
    torch.save(full, tmp_path / "HPS_v2.1_compressed.pt")
    fp16 = hps.HpsReward.from_checkpoint(tmp_path / "HPS_v2.1_compressed.pt", model_name=TINY_OPENCLIP)
    ref = hps.HpsReward.from_checkpoint(models["hps"], model_name=TINY_OPENCLIP)
    assert next(fp16.model.parameters()).dtype == torch.float32  # computed in fp32 whatever the file holds
    x = smooth_images(2, 96, 96, seed=9)
    torch.testing.assert_close(fp16(x, ["a", "b"]), ref(x, ["a", "b"]), rtol=0, atol=5e-3)


# ---------------------------------------------------------------- ImageReward

def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"], eps)


def _lin(x, sd, p):
    return x @ sd[p + "weight"].T + sd[p + "bias"]


def _attend(q, k, v, heads, key_mask=None):
    b, lq, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    a = split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5
    if key_mask is not None:
        a = a.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (a.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, lq, d)


def hand_imagereward(sd: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, vision_heads: int,
                     text_heads: int) -> torch.Tensor:
    """ImageReward's score written out from the published state dict, as BLIP's vit.py and med.py compute it:
    pre-norm ViT (LayerNorm eps 1e-6, fused qkv, exact GELU), then a post-norm BERT whose layers self-attend
    over the prompt, cross-attend to every image token and run the feed-forward; MLP on [CLS]; normalised."""
    v = "blip.visual_encoder."
    patch = sd[v + "patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=patch)
    x = torch.cat([sd[v + "cls_token"].expand(len(pixels), -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + sd[v + "pos_embed"]
    i = 0
    while f"{v}blocks.{i}.norm1.weight" in sd:
        b = f"{v}blocks.{i}."
        q, k, val = _lin(_ln(x, sd, b + "norm1.", 1e-6), sd, b + "attn.qkv.").chunk(3, dim=-1)
        x = x + _lin(_attend(q, k, val, vision_heads), sd, b + "attn.proj.")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2.", 1e-6), sd, b + "mlp.fc1.")), sd, b + "mlp.fc2.")
        i += 1
    image = _ln(x, sd, v + "norm.", 1e-6)
    t = "blip.text_encoder."
    h = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = _ln(h, sd, t + "embeddings.LayerNorm.", 1e-12)
    i = 0
    while f"{t}encoder.layer.{i}.attention.self.query.weight" in sd:
        b = f"{t}encoder.layer.{i}."
        s_ = b + "attention."
        a = _attend(_lin(h, sd, s_ + "self.query."), _lin(h, sd, s_ + "self.key."), _lin(h, sd, s_ + "self.value."),
                    text_heads, mask.bool())
        h = _ln(_lin(a, sd, s_ + "output.dense.") + h, sd, s_ + "output.LayerNorm.", 1e-12)
        c_ = b + "crossattention."
        a = _attend(_lin(h, sd, c_ + "self.query."), _lin(image, sd, c_ + "self.key."),
                    _lin(image, sd, c_ + "self.value."), text_heads)
        h = _ln(_lin(a, sd, c_ + "output.dense.") + h, sd, c_ + "output.LayerNorm.", 1e-12)
        f = _lin(F.gelu(_lin(h, sd, b + "intermediate.dense.")), sd, b + "output.dense.")
        h = _ln(f + h, sd, b + "output.LayerNorm.", 1e-12)
        i += 1
    raw = hand_mlp({k[len("mlp."):]: w for k, w in sd.items() if k.startswith("mlp.")}, h[:, 0])
    return (raw - 0.16717362830052426) / 1.0333394966054072


def bert_ids(vocab_file, prompt: str, length: int = 35) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] + the prompt's whole-word ids + [SEP], padded with [PAD] to 35 (prompts of vocabulary words only)."""
    vocab = vocab_file.read_text(encoding="utf-8").split("\n")
    ids = [vocab.index("[CLS]")] + [vocab.index(w) for w in prompt.lower().split()] + [vocab.index("[SEP]")]
    mask = [1] * len(ids) + [0] * (length - len(ids))
    return torch.tensor(ids + [vocab.index("[PAD]")] * (length - len(ids))), torch.tensor(mask)


@pytest.fixture(scope="module")
def ir_model(models):
    return imagereward.ImageRewardModel.from_files(models["ir"], models["ir"].parent / "bert-base-uncased")


def test_imagereward_maps_every_published_key_onto_the_transformers_modules(models, ir_model):
    state = torch.load(models["ir"], map_location="cpu", weights_only=True)
    vision, text, head, left_out = imagereward.map_state_dict(state)
    # only BLIP's contrastive projections and the saved position_ids are not used by the score
    assert sorted(left_out) == ["blip.text_encoder.embeddings.position_ids", "blip.text_proj.bias",
                                "blip.text_proj.weight", "blip.vision_proj.bias", "blip.vision_proj.weight"]
    assert len(vision) + len(text) + len(head) + len(left_out) == len(state)
    assert set(vision) == set(ir_model.vision.state_dict()) and set(text) == set(ir_model.text.state_dict())
    assert set(head) == set(ir_model.head.state_dict())
    # every published tensor ended up in the module the test expects, by the test's own renaming
    renames = [("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
               ("patch_embed.proj.", "embeddings.patch_embedding."), ("blocks.", "encoder.layers."),
               (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.proj.", ".self_attn.projection."),
               (".attn.qkv.", ".self_attn.qkv.")]
    loaded_v, loaded_t = ir_model.vision.state_dict(), ir_model.text.state_dict()
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            if name.startswith("norm."):
                name = "post_layernorm." + name[len("norm."):]
            for a, b in renames:
                name = name.replace(a, b)
            assert torch.equal(loaded_v[name], value), key
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            assert torch.equal(loaded_t[key[len("blip.text_encoder."):]], value), key
        elif key.startswith("mlp."):
            assert torch.equal(ir_model.head.state_dict()[key[len("mlp."):]], value), key
    assert ir_model.vision.config.num_attention_heads == 1 and ir_model.text.config.num_attention_heads == 2
    assert ir_model.vision.config.layer_norm_eps == 1e-6 and ir_model.preprocess.crop_rounding == "round"


def test_imagereward_equals_a_hand_written_blip_forward_of_the_published_weights(models, ir_model):
    sd = torch.load(models["ir"], map_location="cpu", weights_only=True)
    vocab_file = models["ir"].parent / "bert-base-uncased" / "vocab.txt"
    prompts = ["a photo of a cat", "an astronaut riding a horse", "a red cube"]
    ids, mask = zip(*[bert_ids(vocab_file, p) for p in prompts])
    ids, mask = torch.stack(ids), torch.stack(mask)
    tok = ir_model.tokenize(prompts)
    assert torch.equal(tok["input_ids"], ids) and torch.equal(tok["attention_mask"], mask)  # [CLS] first, 35 long
    # 224×224 images: preprocessing is mean/std only, so the whole model is compared tightly
    x = smooth_images(3, 224, 224, seed=11)
    scores = ir_model(x, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(scores, ir_model(x, prompts))  # deterministic
    pixels = ((x - MEAN) / STD).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = hand_imagereward(sd, pixels, ids, mask, vision_heads=1, text_heads=2)
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-4)
    assert scores.std() > 0.05 and not torch.allclose(ir_model(x, prompts[::-1]), scores, atol=1e-3)
    # other sizes: torchvision's Resize(224, bicubic) + CenterCrop(224) (PIL) as ImageReward does it
    y = smooth_images(3, 200, 335, seed=12)  # odd crop margin: torchvision rounds the offset
    ref_pixels = torch.stack([pil_reference(img, rounding="round") for img in y])
    with torch.no_grad():
        ref = hand_imagereward(sd, ref_pixels, ids, mask, vision_heads=1, text_heads=2)
    torch.testing.assert_close(ir_model(y, prompts), ref, rtol=0, atol=0.005)  # PIL uint8 rounding: ~0.002
    # differentiable through preprocessing and BLIP
    yg = y.clone().requires_grad_(True)
    ir_model(yg, prompts).sum().backward()
    assert torch.isfinite(yg.grad).all() and yg.grad.abs().sum() > 0


def test_imagereward_refuses_missing_and_wrong_files(models, tmp_path):
    good = torch.load(models["ir"], map_location="cpu", weights_only=True)
    tok = models["ir"].parent / "bert-base-uncased"
    with pytest.raises(weights.MissingWeightsError) as e:
        imagereward.ImageRewardModel.from_files(tmp_path / "ImageReward.pt", tok)
    assert "ImageReward.pt" in str(e.value) and "huggingface.co/THUDM/ImageReward" in str(e.value)
    with pytest.raises(weights.MissingWeightsError) as e:
        imagereward.ImageRewardModel.from_files(models["ir"], tmp_path / "bert-base-uncased")
    assert "bert-base-uncased/" in str(e.value) and "vocab.txt" in str(e.value) and "models/reward_models" in str(e.value)

    def saved(state, name="ImageReward.pt", med=True):
        d = tmp_path / name.replace(".", "_")
        d.mkdir(exist_ok=True)
        if med:
            (d / "med_config.json").write_text((models["ir"].parent / "med_config.json").read_text())
        torch.save(state, d / name)
        return d / name

    missing = {k: v for k, v in good.items() if k != "blip.visual_encoder.blocks.1.attn.qkv.weight"}
    with pytest.raises(weights.BadWeightsError, match="missing.*blocks|layers.1.self_attn.qkv.weight"):
        imagereward.ImageRewardModel.from_files(saved(missing, "m.pt"), tok)
    extra = {**good, "blip.visual_encoder.blocks.0.attn.q_norm.weight": torch.ones(64)}
    with pytest.raises(weights.BadWeightsError, match="unexpected"):
        imagereward.ImageRewardModel.from_files(saved(extra, "x.pt"), tok)
    with pytest.raises(weights.BadWeightsError, match="mlp.layers"):
        imagereward.ImageRewardModel.from_files(saved({"layers.0.weight": torch.zeros(1, 768)}, "a.pt"), tok)
    torch.save({"mlp.layers.0.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(weights.BadWeightsError, match="weights_only"):
        imagereward.ImageRewardModel.from_files(tmp_path / "evil.pt", tok)
    # without med_config.json the published (ViT-L/BERT-base) config is assumed: a tiny file then does not fit
    with pytest.raises(weights.BadWeightsError, match="med_config.json does not match.*hidden_size 768 vs 32"):
        imagereward.ImageRewardModel.from_files(saved(good, "n.pt", med=False), tok)
    # a wrapped {"state_dict": ...} file loads the same
    wrapped = imagereward.ImageRewardModel.from_files(saved({"state_dict": good}, "w.pt"), tok)
    x = smooth_images(2, 64, 64, seed=3)
    ref = imagereward.ImageRewardModel.from_files(models["ir"], tok)
    assert torch.equal(wrapped(x, ["a cat", "a dog"]), ref(x, ["a cat", "a dog"]))
    with pytest.raises(RewardInputError, match="2 images but 3 prompts"):
        ref(x, ["a", "b", "c"])


# ---------------------------------------------------------------- face (YuNet) and hand (OWL-ViT / OWLv2)

def kornia_face_detector(state: dict, monkeypatch):
    """kornia's own FaceDetector (decode, threshold, NMS) with the given YuNet weights instead of its download."""
    import sys

    from kornia.contrib import FaceDetector
    from kornia.contrib.face_detection import YuNet

    monkeypatch.setattr(sys.modules[YuNet.__module__], "load_state_dict_from_url", lambda *a, **k: state)
    return FaceDetector(confidence_threshold=0.0).eval()


def test_face_reward_is_the_best_kornia_face_detection_score(models, monkeypatch):
    reward = detectors.FaceReward.from_file(models["yunet"])
    x = torch.rand(3, 200, 300, 3, generator=torch.Generator().manual_seed(0))
    scores = reward(x, ["a face"] * 3)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(scores, reward(x)) and ((scores >= 0) & (scores <= 1)).all() and scores.std() > 0.01
    det = kornia_face_detector(torch.load(models["yunet"], weights_only=True), monkeypatch)
    assert detectors.yunet_size(200, 300, 640) == (448, 640)  # long side 640, sides multiples of 64
    with torch.no_grad():
        # same resized input: the reward is kornia's top detection score (RGB 0..255 in, flipped to BGR inside)
        same = [float(det(reward.bgr_input(img).flip(1))[0][:, -1].max()) for img in x]
        torch.testing.assert_close(scores, torch.tensor(same), rtol=1e-5, atol=1e-5)
        # resized by PIL instead (bilinear): within PIL's 8-bit rounding
        pil = [Image.fromarray((img.numpy() * 255).round().astype(np.uint8)).resize((640, 448), Image.BILINEAR)
               for img in x]
        ref = [float(det(torch.from_numpy(np.array(p)).permute(2, 0, 1)[None].float())[0][:, -1].max())
               for p in pil]
    torch.testing.assert_close(scores, torch.tensor(ref), rtol=0, atol=0.02)
    # different sizes per image
    assert reward([x[0], x[1, :120, :90]]).shape == (2,)


def test_face_reward_refuses_missing_and_wrong_files(tmp_path):
    with pytest.raises(weights.MissingWeightsError) as e:
        detectors.FaceReward.from_file(tmp_path / "yunet_final.pth")
    assert "yunet_final.pth" in str(e.value) and "kornia/data" in str(e.value)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(weights.BadWeightsError, match="not YuNet"):
        detectors.FaceReward.from_file(tmp_path / "bad.pth")


@pytest.mark.parametrize("key,v2", [("owl", False), ("owl2", True)])
def test_hand_reward_is_the_best_box_probability_of_the_transformers_reference(models, key, v2):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    reward = detectors.HandReward.from_folder(models[key])
    assert reward.pad_square is v2 and reward.size == 96
    x = smooth_images(3, 120, 200, seed=21)
    scores = reward(x, ["p"] * 3)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and torch.equal(scores, reward(x))
    assert ((scores > 0) & (scores < 1)).all() and scores.std() > 1e-3
    # reference: the folder's own processor (PIL) and detector; post-processing = max sigmoid over boxes
    processor = AutoProcessor.from_pretrained(str(models[key]))
    model = AutoModelForZeroShotObjectDetection.from_pretrained(str(models[key])).eval()
    if not v2:
        images, extra = [Image.fromarray((img.numpy() * 255).round().astype(np.uint8)) for img in x], {}
    else:  # OWLv2's authors pad to a square with grey 0.5 at the bottom/right before resizing (transformers 5's
        # processor pads with 0.0 instead): give it the image already padded that way, as floats in 0..1
        images = [np.pad(img.numpy(), ((0, 80), (0, 0), (0, 0)), constant_values=0.5) for img in x]
        extra = {"do_rescale": False}
    inputs = processor(text=[[detectors.HAND_QUERY]] * 3, images=images, return_tensors="pt", **extra)
    n_tok = int(reward.attention_mask.sum())
    assert reward.input_ids.shape == (1, 16) and torch.equal(inputs["input_ids"][0, :n_tok], reward.input_ids[0, :n_tok])
    with torch.no_grad():
        ref = torch.sigmoid(model(**inputs).logits[..., 0]).amax(-1)
        d_pix = (torch.cat([reward.pixels(img) for img in x]) - inputs["pixel_values"]).abs()
    assert d_pix.mean() < 0.01, d_pix.mean()  # measured: 0.004 (PIL bicubic), 0.0015 (skimage-style resize)
    torch.testing.assert_close(scores, ref, rtol=0, atol=0.02)  # measured: ≤ 0.007


def test_hand_reward_refuses_other_models(models):
    with pytest.raises(weights.BadWeightsError, match="not OWL-ViT"):
        detectors.HandReward.from_folder(models["pick"])
    with pytest.raises(weights.MissingWeightsError, match="owlv2-base-patch16-ensemble/.*google/owlv2"):
        detectors.HandReward.from_folder(models["root"] / "nothing-here")


# ---------------------------------------------------------------- diversity

def test_diversity_is_zero_for_copies_higher_for_a_varied_batch_and_needs_two_images(models):
    varied = smooth_images(4, 64, 64, seed=7)
    copies = varied[:1].expand(4, -1, -1, -1)
    for reward in (diversity.DiversityReward(),
                   diversity.DiversityReward(clip_models.ClipImageEncoder.from_folder(models["l14"]))):
        v, c = reward(varied), reward(copies)
        assert v.shape == c.shape == (4,) and torch.isfinite(v).all()
        assert torch.allclose(c, torch.zeros(4), atol=1e-5) and (v > c + 1e-4).all()
        assert torch.equal(v, reward(varied, ["p"] * 4))
        with pytest.raises(RewardInputError, match="at least 2 images"):
            reward(varied[:1])
    # pixel metric: RMS difference of 32×32 thumbnails, mean over the other images
    d = diversity.DiversityReward()(varied)
    thumbs = F.interpolate(varied.permute(0, 3, 1, 2), size=(32, 32), mode="area").flatten(1)
    ref = torch.stack([torch.stack([((thumbs[i] - thumbs[j]).square().mean().sqrt()) for j in range(4) if j != i]).mean()
                       for i in range(4)])
    torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-6)
    # an image that stands out scores highest
    odd = torch.cat([copies[:3], torch.ones_like(varied[:1])])
    assert diversity.DiversityReward()(odd).argmax() == 3
    # different sizes per image (a list) are fine
    assert diversity.DiversityReward()([varied[0], smooth_images(1, 40, 90)[0]]).shape == (2,)


# ---------------------------------------------------------------- mix

class Fixed:
    def __init__(self, name, values):
        self.name, self.values, self.calls = name, list(values), 0

    def __call__(self, images, prompts=None):
        v = torch.as_tensor(self.values[self.calls % len(self.values)], dtype=torch.float32)
        self.calls += 1
        return v


def test_mix_without_normalisation_is_the_weighted_sum():
    a, b = Fixed("a", [[1.0, 2.0, 3.0]]), Fixed("b", [[10.0, 0.0, -10.0]])
    m = mix.RewardMix([a, b], [2.0, -0.5], normalize=False)
    assert torch.equal(m(None, None), torch.tensor([2 - 5.0, 4.0, 6 + 5.0]))
    assert m.name == "mix(2×a, -0.5×b)" and set(m.last_components) == {"a", "b"}


def test_mix_normalises_each_reward_by_its_running_statistics():
    base = torch.tensor([0.0, 1.0, 2.0, 3.0])
    small, big = Fixed("small", [base]), Fixed("big", [1000.0 * base + 5.0])
    m = mix.RewardMix([small, big], [1.0, 1.0])
    z = (base - base.mean()) / (base.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(m(None), 2 * z, rtol=1e-4, atol=1e-4)  # equal weights: equal influence
    # weight 0 removes a reward, a negative weight turns it into a penalty
    m0 = mix.RewardMix([Fixed("s", [base]), Fixed("b", [-1000.0 * base])], [1.0, 0.0])
    torch.testing.assert_close(m0(None), z, rtol=1e-4, atol=1e-4)
    mn = mix.RewardMix([Fixed("s", [base])], [-3.0])
    torch.testing.assert_close(mn(None), -3 * z, rtol=1e-4, atol=1e-4)
    # statistics run over batches; state_dict round-trips them
    m2 = mix.RewardMix([Fixed("s", [[0.0, 2.0], [4.0, 6.0]])], [1.0])
    m2(None)
    second = m2(None)  # running mean 3, std sqrt(5)
    torch.testing.assert_close(second, (torch.tensor([4.0, 6.0]) - 3.0) / (5 ** 0.5 + 1e-6))
    m3 = mix.RewardMix([Fixed("s", [[4.0, 6.0]])], [1.0])
    m3.load_state_dict(m2.state_dict())
    assert m3.stats[0].count == 4 and m3.state_dict() == m2.state_dict()
    with pytest.raises(ValueError, match="is for"):
        mix.RewardMix([Fixed("other", [[1.0]])], [1.0]).load_state_dict(m2.state_dict())


def test_mix_first_single_score_nan_and_bad_arguments():
    assert torch.equal(mix.RewardMix([Fixed("a", [[7.0]])], [1.0])(None), torch.tensor([0.0]))  # std unknown yet
    out = mix.RewardMix([Fixed("a", [[1.0, float("nan"), 3.0]])], [1.0])(None)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    with pytest.raises(ValueError, match="weights"):
        mix.RewardMix([Fixed("a", [[1.0]])], [1.0, 2.0])
    with pytest.raises(RewardInputError, match="returned 2 scores"):
        mix.RewardMix([Fixed("a", [[1.0, 2.0, 3.0]]), Fixed("b", [[1.0, 2.0]])], [1.0, 1.0])(None)
    a, b = Fixed("jpeg", [[1.0]]), Fixed("jpeg", [[2.0]])
    assert mix.RewardMix([a, b], [1, 1]).names == ["jpeg#0", "jpeg#1"]


# ---------------------------------------------------------------- every reward on awkward inputs

def test_every_reward_scores_grey_and_single_channel_images(models, pickscore):
    from texforce_pack.rewards.jpeg import JpegReward

    rewards = [aesthetic.AestheticReward.from_files(models["l14"], AESTHETIC_HEAD_FILE), pickscore,
               clip_models.ClipScoreReward.from_folder(models["pick"]), diversity.DiversityReward(),
               hps.HpsReward.from_checkpoint(models["hps"], model_name=TINY_OPENCLIP), JpegReward(),
               imagereward.ImageRewardModel.from_files(models["ir"], models["ir"].parent / "bert-base-uncased"),
               detectors.FaceReward.from_file(models["yunet"]), detectors.HandReward.from_folder(models["owl2"])]
    grey = torch.full((2, 48, 48, 3), 0.5)
    for r in rewards:
        s = r(grey, ["a grey square"] * 2)
        assert s.shape == (2,) and torch.isfinite(s).all(), r.name
        s1 = r(grey[..., :1], ["a grey square"] * 2)
        assert torch.allclose(s1, s, atol=1e-5), r.name
