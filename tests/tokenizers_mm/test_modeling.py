import pytest
import torch
from transformers import AutoConfig, AutoModel

from tokenizers_mm import ImageTokenizer, ImageTokenizerConfig, build_tokenizer
from tokenizers_mm.presets import PRESET_PARAMS, PRESETS, preset_config

TINY = dict(base_channels=8, channel_mult=[1, 2, 2], num_res_blocks=1, mid_blocks=0, norm_groups=4)


def _tiny(bottleneck: str, **kw) -> ImageTokenizer:
    extra = {} if bottleneck == "patches" else TINY
    torch.manual_seed(0)
    return ImageTokenizer(
        ImageTokenizerConfig(bottleneck=bottleneck, vq_codebook_size=64, vq_dim=4, **extra, **kw)
    )


def _pixels(b=2, h=16, w=16, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("bottleneck", ["fsq", "vq", "continuous", "patches"])
def test_encode_decode_shapes_and_dtypes(bottleneck):
    model = _tiny(bottleneck).eval()
    x = _pixels(h=16, w=24)
    tokens = model.encode(x)
    if bottleneck in ("fsq", "vq"):
        assert tokens.dtype == torch.long and tokens.shape == (2, 4, 6)
        assert int(tokens.max()) < model.config.codebook_size
    else:
        assert tokens.is_floating_point() and tokens.shape == (2, 4, 6, model.config.token_dim)
    recon = model.decode(tokens)
    assert recon.shape == x.shape and recon.abs().max() <= 1


def test_patches_roundtrip_is_exact():
    model = _tiny("patches")
    x = _pixels()
    assert torch.equal(model.decode(model.encode(x)), x)


@pytest.mark.parametrize("bottleneck", ["fsq", "vq", "continuous"])
def test_gradients_reach_the_encoder(bottleneck):
    model = _tiny(bottleneck).train()
    out = model(_pixels())
    (out.reconstruction.pow(2).mean() + out.quantizer_loss).backward()
    first = model.encoder.net[0].weight.grad
    assert first is not None and first.abs().sum() > 0


@pytest.mark.parametrize("bottleneck", ["fsq", "vq", "continuous"])
def test_save_load_roundtrip_is_bitwise(tmp_path, bottleneck):
    model = _tiny(bottleneck)
    model.train()
    model(_pixels())  # VQ: k-means init + EMA update change buffers; they must be saved too
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, ImageTokenizer)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = _pixels(seed=3)
    assert torch.equal(model.decode(model.encode(x)), loaded.decode(loaded.encode(x)))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ImageTokenizerConfig)


def test_size_error_names_the_multiple():
    model = _tiny("fsq")
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(_pixels(h=18, w=16))
    with pytest.raises(ValueError, match=r"\(b, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, 16, 16))


def test_unknown_config_key_is_an_error():
    with pytest.raises(ValueError, match="unknown key"):
        ImageTokenizerConfig(bottleneck="fsq", fsq_levelz=[8, 5])
    with pytest.raises(ValueError, match="bottleneck must be one of"):
        ImageTokenizerConfig(bottleneck="lfq")
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        preset_config("nope")


def test_decode_rejects_wrong_token_kind():
    with pytest.raises(TypeError):
        _tiny("fsq").decode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError):
        _tiny("continuous").decode(torch.zeros(1, 2, 2, 7))


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    n = sum(p.numel() for p in build_tokenizer(name).parameters())
    assert n == PRESET_PARAMS[name], f"{name}: {n} parameters; update PRESET_PARAMS and the README"
