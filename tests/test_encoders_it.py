"""The M3AE-shaped encoders (positions, patches, padding, checkpoint loading) and the transformers wrapper."""
import math

import pytest
import torch

import common as C

TINY = dict(dim=16, depth=2, heads=2, mlp_ratio=2, patch_size=4, vocab_size=30)


def text_batch(rows, length):
    """(B, 2, length): token ids padded with 0, padding mask 1 on padding."""
    x = torch.zeros(len(rows), 2, length, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, 0, :len(r)] = torch.tensor(r)
        x[i, 1, len(r):] = 1
    return x


def test_sincos_positions():
    e = C.sincos_1d(8, torch.arange(5))
    p, i = 3, 2                                                   # position 3, frequency 2 of 4
    w = 10000 ** (-i / 4)
    assert torch.allclose(e[p, i], torch.tensor(math.sin(p * w))) and torch.allclose(e[p, 4 + i], torch.tensor(math.cos(p * w)))
    g = C.sincos_2d(8, 3)                                         # 3 x 3 patches, row-major
    assert g.shape == (9, 8)
    col, row = C.sincos_1d(4, torch.arange(3)), C.sincos_1d(4, torch.arange(3))
    for k in range(9):
        assert torch.allclose(g[k, :4], col[k % 3]) and torch.allclose(g[k, 4:], row[k // 3])


def test_patchify_order_rows_cols_channels():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    p = C.patchify(x, 2)
    assert p.shape == (2, 6, 12)                                  # 2 x 3 patches of 2 x 2 x 3 values
    b, r, c = 1, 1, 2                                             # patch at row 1, column 2 of sample 1
    manual = x[b, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].permute(1, 2, 0).reshape(-1)
    assert torch.equal(p[b, r * 3 + c], manual)
    with pytest.raises(ValueError, match="whole number"):
        C.patchify(torch.zeros(1, 3, 5, 4), 2)


def test_m3ae_text_ignores_padding_in_attention_and_mean():
    torch.manual_seed(0)
    enc = C.M3AEEncoder("text", **TINY).eval()
    rows = [[5, 9, 2], [7, 3, 3, 8, 1]]
    short, long = text_batch(rows, 5), text_batch(rows, 9)
    with torch.no_grad():
        a, b = enc(short), enc(long)
        junk = long.clone()
        junk[0, 0, 3:] = 17                                       # other ids under the padding
        c = enc(junk)
        changed = long.clone()
        changed[0, 0, 1] = 17                                     # a real token changes
        d = enc(changed)
    assert a.shape == (2, 16)
    assert torch.allclose(a, b, atol=1e-5), "more padding must not change the output"
    assert torch.allclose(b, c, atol=1e-6), "ids under the padding must not matter"
    assert not torch.allclose(b[0], d[0], atol=1e-3) and torch.allclose(b[1], d[1], atol=1e-6)


def test_m3ae_image_encoder_shape_and_gradients():
    torch.manual_seed(0)
    enc = C.M3AEEncoder("image", **TINY)
    x = torch.randn(3, 3, 12, 12)
    z = enc(x)
    assert z.shape == (3, 16) and enc.dim == 16
    z.sum().backward()
    assert enc.image_embedding.weight.grad.abs().sum() > 0 and enc.cls_token.grad.abs().sum() > 0
    assert not hasattr(enc, "text_embedding")                     # one modality per instance
    assert enc.encoder.blocks[0].layer_norm1.eps == 1e-6


def test_m3ae_position_tables_are_built_once_per_length_and_equal_fresh_ones(monkeypatch):
    """The fixed positions are cached per (length, device): no CPU-built table copied each forward
    (a blocking copy on a GPU). The cached tables are exactly the freshly built ones."""
    image, text = C.M3AEEncoder("image", **TINY), C.M3AEEncoder("text", **TINY)
    calls = []
    for name in ("sincos_1d", "sincos_2d"):
        monkeypatch.setattr(C, name, lambda *a, _f=getattr(C, name), _n=name: calls.append(_n) or _f(*a))
    ids = torch.stack([torch.randint(0, 30, (2, 7)), torch.zeros(2, 7, dtype=torch.long)], 1)
    image(torch.randn(2, 3, 12, 12))
    text(ids)
    first = list(calls)
    for _ in range(2):
        image(torch.randn(2, 3, 12, 12))
        text(ids)
    assert calls == first and first.count("sincos_2d") == 1        # nothing rebuilt after the first forwards
    monkeypatch.undo()
    assert torch.equal(image._positions[("image", 3, "cpu")], C.sincos_2d(16, 3))
    assert torch.equal(text._positions[("text", 7, "cpu")], C.sincos_1d(16, torch.arange(7)))


def full_checkpoint(seed=0):
    """A converted-M3AE-like state dict: both modalities' input layers and the shared transformer."""
    torch.manual_seed(seed)
    image, text = C.M3AEEncoder("image", **TINY), C.M3AEEncoder("text", **TINY)
    text.encoder.load_state_dict(image.encoder.state_dict())
    text.cls_token.data.copy_(image.cls_token.data)
    return {**text.state_dict(), **image.state_dict()}, image, text


def test_m3ae_checkpoint_round_trip_reports_missing_and_unexpected(tmp_path, capsys):
    sd, image, text = full_checkpoint()
    torch.save(sd, tmp_path / "m3ae.pth")
    torch.manual_seed(1)
    fresh = C.M3AEEncoder("text", **TINY).eval()
    x = text_batch([[4, 5, 6]], 6)
    assert not torch.allclose(fresh(x), text.eval()(x))
    missing, unexpected = C.load_m3ae_checkpoint(fresh, tmp_path / "m3ae.pth")
    assert missing == [] and unexpected == []                      # image-only keys are not this encoder's
    assert torch.allclose(fresh(x), text(x))
    assert "missing keys: none; unexpected keys: none" in capsys.readouterr().out

    broken = dict(sd)
    del broken["encoder.layer_norm.bias"]
    broken["decoder_image_output.weight"] = torch.zeros(3)
    torch.save({"state_dict": {"module." + k: v for k, v in broken.items()}, "epoch": 3}, tmp_path / "broken.pth")
    torch.manual_seed(2)
    img = C.M3AEEncoder("image", **TINY)
    bias_before = img.encoder.layer_norm.bias.clone()
    with pytest.raises(C.DataError, match=r"broken\.pth: 1 of the image encoder's \d+ tensors are not in the M3AE "
                       r"checkpoint \(encoder\.layer_norm\.bias\); it holds decoder_image_output\.weight instead"):
        C.load_m3ae_checkpoint(img, tmp_path / "broken.pth")
    missing, unexpected = C.load_m3ae_checkpoint(img, tmp_path / "broken.pth", partial=True)
    assert missing == ["encoder.layer_norm.bias"] and unexpected == ["decoder_image_output.weight"]
    out = capsys.readouterr().out
    assert "missing keys: encoder.layer_norm.bias; unexpected keys: decoder_image_output.weight" in out
    assert torch.equal(img.image_embedding.weight, image.image_embedding.weight)
    assert torch.equal(img.encoder.layer_norm.bias, bias_before)  # the missing one keeps its init


def test_m3ae_checkpoint_errors(tmp_path):
    sd, _, _ = full_checkpoint()
    torch.save(sd, tmp_path / "m3ae.pth")
    wide = C.M3AEEncoder("text", **{**TINY, "dim": 32})
    with pytest.raises(C.DataError, match=r"m3ae\.pth: \d+ tensors do not fit the text encoder.*--m3ae_dim"):
        C.load_m3ae_checkpoint(wide, tmp_path / "m3ae.pth")
    with pytest.raises(C.DataError, match="M3AE checkpoint not found"):
        C.load_m3ae_checkpoint(wide, tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(C.DataError, match=r"junk\.pth: not a loadable PyTorch state dict"):
        C.load_m3ae_checkpoint(wide, tmp_path / "junk.pth")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """A tiny ViT (width 32) and a tiny BERT (width 24) saved with save_pretrained."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8)).save_pretrained(root / "vit")
    BertModel(BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=32)).save_pretrained(root / "bert")
    return root


def test_hf_encoders_by_path_projected_to_one_width(hf_models):
    models = {"image": str(hf_models / "vit"), "text": str(hf_models / "bert")}
    image, text = C.hf_encoders(models=models, pool="mean", image_size=16)
    assert image.dim == text.dim == 32 and isinstance(image.proj, torch.nn.Identity)
    assert isinstance(text.proj, torch.nn.Linear) and text.proj.in_features == 24
    image.eval(), text.eval()
    with torch.no_grad():
        assert image(torch.randn(2, 3, 16, 16)).shape == (2, 32)
        x = text_batch([[2, 10, 11, 3], [2, 12, 3]], 6)
        junk = x.clone()
        junk[1, 0, 3:] = 40
        assert torch.allclose(text(x), text(junk), atol=1e-5)      # padding is left out of the mean
    with pytest.raises(C.DataError, match=r"vit: the model takes 16 x 16 images; pass --image_size 16"):
        C.hf_encoders(models=models, image_size=32)
    with pytest.raises(C.DataError, match="--encoder hf needs --text_model"):
        C.hf_encoders(models={"image": models["image"]}, image_size=16)
