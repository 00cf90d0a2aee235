"""Backbones: weight interop matches transformers / timm / official-layout weights on tiny random models; the seeded
builder and the input size keep the numbers they had."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from safetensors.torch import save_file

from xr0_lib.augment import make_eval_transform
from xr0_lib.models.vit import create_backbone, interpolate_pos_embed
from xr0_lib.models.interop import add_registers, hf_pos_interp
from xr0_lib.models.backbones import ModelConfig, build_backbone, export_hf, load_backbone, preprocess_config, save_backbone
from xr0_lib.models.inference import inference_model

TOL = 1e-4


def _randomize(model, seed=0):
    "Random values everywhere (zero-initialised tokens and unit layer-scales would hide mistakes)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _hf_model(registers: int, swiglu: bool = False, size: int = 42, hidden: int = 32):
    kw = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=size,
              use_swiglu_ffn=swiglu, layerscale_value=0.5)
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)
        m = transformers.Dinov2WithRegistersModel(cfg)
    else:
        m = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    return _randomize(m).eval()


def _compare(ours, hf, x, registers, masks=None):
    with torch.no_grad():
        ref = hf(pixel_values=x, bool_masked_pos=masks).last_hidden_state
        f = ours.forward_features(x, masks=masks)
    B, h, w = x.shape[0], x.shape[2] // 14, x.shape[3] // 14
    assert f["patch"].shape == (B, h, w, ours.embed_dim)
    assert (f["cls"] - ref[:, 0]).abs().max() < TOL
    assert f["registers"].shape == (B, registers, ours.embed_dim)
    if registers: assert (f["registers"] - ref[:, 1:1 + registers]).abs().max() < TOL
    assert (f["patch_tokens"] - ref[:, 1 + registers:]).abs().max() < TOL
    assert (f["patch"].reshape(B, h * w, -1) - ref[:, 1 + registers:]).abs().max() < TOL


SIZES = [(42, 42), (56, 56), (28, 56)]   # saved grid 3x3, then interpolated (square and not)


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (4, True)])
def test_hf_folder_roundtrip(tmp_path, registers, swiglu):
    hf = _hf_model(registers, swiglu)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_backbone(tmp_path / "hf").eval()
    assert (ours.num_registers, ours.num_prefix_tokens, ours.n_blocks, ours.patch_size) == (registers, 1 + registers, 2, 14)
    for H, W in SIZES:
        x = torch.randn(2, 3, H, W)
        _compare(ours, hf, x, registers)
    # iBOT masking: the mask token replaces patch embeddings as in transformers' bool_masked_pos
    x = torch.randn(2, 3, 42, 42)
    masks = torch.rand(2, 9) < 0.5
    _compare(ours, hf, x, registers, masks)
    # export and back: transformers reads our folder without custom code, and so do we
    export_hf(ours, tmp_path / "exported")
    cfg = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert cfg["architectures"] == [type(hf).__name__]
    hf2 = transformers.AutoModel.from_pretrained(tmp_path / "exported").eval()
    assert type(hf2) is type(hf)
    ours2 = load_backbone(tmp_path / "exported").eval()
    for H, W in SIZES:
        x = torch.randn(1, 3, H, W)
        _compare(ours, hf2, x, registers)
        _compare(ours2, hf, x, registers)


def test_last_attention_matches_eager(tmp_path):
    hf = _hf_model(4)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_backbone(tmp_path / "hf").eval()
    eager = transformers.AutoModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        ref = eager(pixel_values=x, output_attentions=True).attentions[-1]
        a = ours.last_attention(x)
    assert a.shape == (2, 2, 1 + 4 + 12, 1 + 4 + 12)
    assert (a.sum(-1) - 1).abs().max() < 1e-5
    assert (a - ref).abs().max() < 1e-5
    assert ours.blocks[-1].attn.fused_attn == type(ours.blocks[-1].attn)(8, 2).fused_attn


@pytest.mark.parametrize("registers", [0, 4])
def test_timm_state_dict(tmp_path, registers):
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    tm = timm.create_model(name, pretrained=False, embed_dim=32, depth=2, num_heads=2, img_size=42,
                           dynamic_img_size=True, num_classes=0)
    _randomize(tm, 1).eval()
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        sd = {k: v.contiguous() for k, v in tm.state_dict().items()}
        save_file(sd, str(path)) if path.suffix == ".safetensors" else torch.save(sd, path)
        ours = load_backbone(path, num_heads=2).eval()
        assert ours.num_registers == registers
        for H, W in SIZES:
            x = torch.randn(2, 3, H, W)
            with torch.no_grad():
                ref = tm.forward_features(x)
                f = ours.forward_features(x)
            assert (f["cls"] - ref[:, 0]).abs().max() < TOL
            assert (f["patch_tokens"] - ref[:, 1 + registers:]).abs().max() < TOL


def _official_from_hf(hf, chunked=False):
    "Official dinov2 names written out by hand from a transformers model (independent of the library's converter)."
    sd, out = hf.state_dict(), {}
    e = "embeddings."
    out["cls_token"], out["pos_embed"] = sd[e + "cls_token"], sd[e + "position_embeddings"]
    out["mask_token"] = sd[e + "mask_token"].reshape(1, -1)
    if e + "register_tokens" in sd: out["register_tokens"] = sd[e + "register_tokens"]
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = sd[e + "patch_embeddings.projection.weight"], sd[e + "patch_embeddings.projection.bias"]
    for i in range(hf.config.num_hidden_layers):
        p, q = f"encoder.layer.{i}.", (f"blocks.{i}.{i}." if chunked else f"blocks.{i}.")
        for t in ("weight", "bias"):
            out[q + f"attn.qkv.{t}"] = torch.cat([sd[p + f"attention.{n}_proj.{t}"] for n in "qkv"])
            out[q + f"attn.proj.{t}"] = sd[p + f"attention.o_proj.{t}"]
            out[q + f"norm1.{t}"], out[q + f"norm2.{t}"] = sd[p + f"norm1.{t}"], sd[p + f"norm2.{t}"]
            out[q + f"mlp.fc1.{t}"], out[q + f"mlp.fc2.{t}"] = sd[p + f"mlp.fc1.{t}"], sd[p + f"mlp.fc2.{t}"]
        out[q + "ls1.gamma"], out[q + "ls2.gamma"] = sd[p + "layer_scale1.lambda1"], sd[p + "layer_scale2.lambda1"]
    out["norm.weight"], out["norm.bias"] = sd["layernorm.weight"], sd["layernorm.bias"]
    return out


@pytest.mark.parametrize("registers,chunked", [(0, False), (4, True)])
def test_official_teacher_checkpoint(tmp_path, registers, chunked):
    hf = _hf_model(registers)
    backbone = _official_from_hf(hf, chunked)
    ckpt = {"teacher": {**{"backbone." + k: v for k, v in backbone.items()},
                        "dino_head.mlp.0.weight": torch.randn(8, 32), "ibot_head.mlp.0.weight": torch.randn(8, 32)}}
    (tmp_path / "eval").mkdir()
    torch.save(ckpt, tmp_path / "eval" / "teacher_checkpoint.pth")
    torch.save(backbone, tmp_path / "hub.pth")                      # hub-style plain state dict
    for src in (tmp_path / "eval", tmp_path / "hub.pth"):
        ours = load_backbone(src, num_heads=2).eval()
        _compare(ours, hf, torch.randn(2, 3, 42, 42), registers)
        if registers:   # the official reg4 resize (size, antialias) is transformers' registers resize
            _compare(ours, hf, torch.randn(2, 3, 56, 28), registers)
        else:           # official without registers uses the +0.1 offset; with it overridden we meet transformers
            assert ours.pos_interp == (False, 0.1)
            _compare(load_backbone(src, num_heads=2, pos_interp=hf_pos_interp("dinov2")).eval(), hf,
                     torch.randn(2, 3, 56, 28), registers)


def _official_resize(pos, M, h, w):
    "dinov2's own interpolate_pos_encoding (no registers: scale factor with the +0.1 offset, no antialias)."
    patch = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
    patch = torch.nn.functional.interpolate(patch, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic", antialias=False)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)


def test_official_offset_resize():
    bb = create_backbone("xr0-vitp14", img_size=42, pos_interp=(False, 0.1))
    ref = _official_resize(bb.pos_embed.data, 3, 5, 4)
    assert (bb.interpolate_pos_encoding(5, 4) - ref).abs().max() < 1e-6


def test_xr0_checkpoint_folder_settings_and_save(tmp_path, monkeypatch):
    bb = _randomize(create_backbone("xr0-vitp14", img_size=28, num_registers=4), 3).eval()
    bb.preprocess = dict(size=40, crop_size=28, mean=[0.53] * 3, std=[0.26] * 3, interpolation="bicubic")
    ckpt = tmp_path / "checkpoints" / "step_000100"
    export_hf(bb, ckpt / "teacher_hf")
    (ckpt / "config.yaml").write_text("model: {}\n")
    (ckpt / "step").write_text("100\n")
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad(): ref = bb(x)
    loaded = load_backbone(ckpt).eval()
    assert preprocess_config(loaded) == bb.preprocess                      # carried by preprocessor_config.json
    with torch.no_grad(): assert (loaded(x)["patch"] - ref["patch"]).abs().max() < TOL
    # a [weights] name of settings.ini
    ini = tmp_path / "settings.ini"
    ini.write_text(f"[weights]\nmine = {ckpt / 'teacher_hf'}\n")
    monkeypatch.setenv("XR0_SETTINGS", str(ini))
    with torch.no_grad(): assert (load_backbone("mine").eval()(x)["cls"] - ref["cls"]).abs().max() < TOL
    # our own single file keeps the spec, the resize rule and the preprocessing exactly
    save_backbone(bb, tmp_path / "bb.safetensors")
    again = load_backbone(tmp_path / "bb.safetensors").eval()
    assert again.spec == bb.spec and again.pos_interp == bb.pos_interp and again.preprocess == bb.preprocess
    with torch.no_grad(): assert torch.equal(again(x)["tokens"], ref["tokens"])


def test_overrides_registers_and_size(tmp_path):
    hf = _hf_model(0)
    hf.save_pretrained(tmp_path / "hf")
    bb = load_backbone(tmp_path / "hf", img_size=56, num_registers=4, register_init="zeros")
    assert bb.num_registers == 4 and bb.pos_grid == (4, 4) and bb.preprocess["crop_size"] == 56
    with torch.no_grad(): f = bb(torch.randn(1, 3, 56, 56))
    assert f["registers"].shape == (1, 4, 32) and torch.isfinite(f["tokens"]).all()
    rand = create_backbone("xr0-vitp14")
    with pytest.raises(ValueError, match="already"): add_registers(create_backbone("xr0-vitp14-reg4"), 2)
    assert load_backbone("xr0-vits14-reg4", img_size=28).num_registers == 4 and rand.num_registers == 0


def test_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-thing"): load_backbone(str(tmp_path / "no-such-thing"))
    (tmp_path / "junk").mkdir(); (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="junk"): load_backbone(tmp_path / "junk")
    (tmp_path / "bert").mkdir(); (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="bert"): load_backbone(tmp_path / "bert")
    torch.save({"foo": torch.zeros(3)}, tmp_path / "foo.pth")
    with pytest.raises(ValueError, match="foo.pth"): load_backbone(tmp_path / "foo.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"): load_backbone(tmp_path / "bad.safetensors")
    # pickled objects beyond tensors are refused (weights_only=True)
    torch.save({"model": {"x": torch.zeros(1)}, "evil": object()}, tmp_path / "obj.pth")
    with pytest.raises(ValueError, match="obj.pth"): load_backbone(tmp_path / "obj.pth")


def test_rad_dino_preprocessing(tmp_path):
    hf = _hf_model(0)
    hf.save_pretrained(tmp_path / "rad")
    (tmp_path / "rad" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 56}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": 42, "width": 42}, "do_normalize": True,
        "image_mean": [0.5307, 0.5307, 0.5307], "image_std": [0.2583, 0.2583, 0.2583]}))
    cfg = preprocess_config(load_backbone(tmp_path / "rad"))
    assert cfg == dict(size=56, crop_size=42, mean=[0.5307] * 3, std=[0.2583] * 3, interpolation="bicubic")
    img = np.random.default_rng(0).integers(0, 256, (70, 90), dtype=np.uint8)
    t = make_eval_transform(cfg)(img)
    assert t.shape == (3, 42, 42) and t.dtype == torch.float32
    assert torch.equal(t[0], t[2])
    # the same numbers as transformers' own processor within uint8 rounding of the resize
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path / "rad")
    ref = proc(np.stack([img] * 3, -1), return_tensors="pt")["pixel_values"][0]
    assert ref.shape == t.shape
    assert (ref - t).abs().mean() < 0.05


@pytest.mark.parametrize("registers", [0, 4])
def test_inference_model_matches_transformers(tmp_path, registers):
    "The compiled fast path (folded layer-scale, frozen weights) keeps fp32 outputs within TOL of transformers."
    hf = _hf_model(registers)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_backbone(tmp_path / "hf").eval()
    fast = inference_model(ours, "fp32", compile=True)
    assert fast.num_registers == registers and fast.embed_dim == ours.embed_dim
    x = torch.randn(3, 3, 42, 42)
    with torch.no_grad(): ref = hf(pixel_values=x).last_hidden_state
    f = fast.forward_features(x)
    assert (f["cls"] - ref[:, 0]).abs().max() < TOL
    assert (f["patch_tokens"] - ref[:, 1 + registers:]).abs().max() < TOL
    # a smaller last batch is padded to the compiled shape: same rows, no recompilation
    g = fast.forward_features(x[:2])
    assert g["cls"].shape == (2, ours.embed_dim) and (g["cls"] - ref[:2, 0]).abs().max() < TOL
    assert fast._largest == {(3, 42, 42): 3}
    # the original backbone is untouched (its layer-scales are still there)
    assert type(ours.blocks[0].ls1).__name__ == "LayerScale"
    bf = inference_model(ours, "bf16", compile=False).forward_features(x)
    assert bf["cls"].dtype == torch.bfloat16 and (bf["cls"].float() - ref[:, 0]).abs().max() < 5e-2


def test_inference_model_bf16_compiled_uses_its_own_weights():
    "Two models of one shape compiled on the bf16 path each give their own outputs (no stale frozen-weights cache)."
    x = torch.randn(2, 3, 28, 28)
    for seed in (0, 1):
        m = _randomize(create_backbone("xr0-vitp14", img_size=28, depth=1).eval(), seed)
        with torch.no_grad(): ref = m.forward_features(x)["cls"]
        out = inference_model(m, "bf16", compile=True, max_autotune=True).forward_features(x)["cls"].float()
        assert (out - ref).abs().max() < 5e-2 * max(1.0, ref.abs().max().item())


def _random_init_backbone_before(cfg: ModelConfig, img_size: int, seed: int = 0, layerscale: str = "init"):
    "The random-init control as xr0_lib.quickstart.random_init_backbone built it before build_backbone existed."
    layerscale_init = cfg.layerscale_init if layerscale == "init" else None
    shape = {k: getattr(cfg, k) for k in ("embed_dim", "depth", "num_heads") if getattr(cfg, k) is not None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = create_backbone(cfg.arch, img_size=img_size, num_registers=cfg.num_registers, layerscale_init=layerscale_init, **shape)
    return m.eval()


@pytest.mark.parametrize("layerscale", ["init", "off"])
def test_seeded_random_init_is_bitwise_the_old_control(layerscale):
    "build_backbone(cfg, img_size, seed, layerscale) gives bitwise the weights the old random-init control gave, RNG untouched."
    cfg = ModelConfig(arch="xr0-vitp14", depth=3, num_registers=4, drop_path_rate=0.2)
    torch.manual_seed(123); before = torch.rand(1)
    torch.manual_seed(123)
    new = build_backbone(cfg, 56, seed=7, layerscale=layerscale, drop_path=False)
    assert torch.equal(torch.rand(1), before)                                   # the caller's RNG stream is untouched
    old = _random_init_backbone_before(cfg, 56, seed=7, layerscale=layerscale)
    assert list(new.state_dict()) == list(old.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
    assert type(new.blocks[0].drop_path1).__name__ == "Identity"


def test_unseeded_build_matches_the_old_ssl_builder():
    "Without a seed build_backbone draws from the global RNG exactly as ssl.meta's builder did (student with drop-path)."
    cfg = ModelConfig(arch="xr0-vitp14", embed_dim=48, depth=1, num_heads=2, drop_path_rate=0.1)
    torch.manual_seed(0); new = build_backbone(cfg, 28)
    torch.manual_seed(0); old = create_backbone(cfg.arch, img_size=28, num_registers=cfg.num_registers, drop_path_rate=0.1,
                                                 layerscale_init=cfg.layerscale_init, embed_dim=48, depth=1, num_heads=2)
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
    assert new.blocks[0].drop_path1.drop_prob == 0.1


def test_set_input_size_keeps_the_numbers(tmp_path):
    "set_input_size (and load_backbone's img_size) gives the outputs the on-the-fly resize gives, and the preprocessing follows."
    hf = _hf_model(4)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 56, 56)
    on_the_fly = load_backbone(tmp_path / "hf").eval()
    resized = load_backbone(tmp_path / "hf", img_size=56).eval()
    with torch.no_grad():
        ref = on_the_fly(x)["tokens"]
        assert (resized(x)["tokens"] - ref).abs().max() < 1e-5
        assert (on_the_fly.set_input_size(56)(x)["tokens"] - ref).abs().max() < 1e-5
    grid = on_the_fly.pos_grid
    expected = interpolate_pos_embed(load_backbone(tmp_path / "hf").pos_embed.data, (3, 3), grid, *on_the_fly.pos_interp)
    assert torch.equal(on_the_fly.pos_embed.data, expected)
    pp = preprocess_config(resized)
    assert (pp["size"], pp["crop_size"]) == (56, 56) and pp["mean"] == preprocess_config(on_the_fly)["mean"]
    assert preprocess_config(load_backbone("xr0-vitp14", img_size=28).set_input_size((28, 42)))["crop_size"] == (28, 42)
