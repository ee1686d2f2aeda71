"""M3AE's released weights: `python common.py convert_m3ae` checked against the authors' JAX model (the fixture
is a tiny M3AE saved and run by their code, see tests/fixtures/make_m3ae_fixture.py), its unpickler, and the strict
loading of M3AE and CAV-MAE checkpoints (--partial_ckpt)."""
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import common as C
import train_ait
import train_it

FIXTURES = Path(__file__).parent / "fixtures"
SIZES = (32, 2, 4, 4, 16)              # the fixture's width, depth, heads, MLP ratio, patch side; vocabulary 100


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return tmp_path_factory.mktemp("m3ae") / "m3ae_tiny.pt"


def test_convert_m3ae_reproduces_the_jax_encoder(converted, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)     # numpy 1 names read without numpy 2's shims
        C._cli(["convert_m3ae", str(FIXTURES / "m3ae_tiny.pkl"), str(converted)])
    out = capsys.readouterr().out
    assert "32 encoder tensors of 56 (the decoder left out), width 32, depth 2, heads 4, MLP ratio 4, patch 16, " \
           "vocabulary 100; train with --m3ae_ckpt" in out and "--m3ae_heads 4 --patch_size 16 --vocab_size 100" in out
    assert not {"jax", "flax", "cloudpickle"} & set(sys.modules)
    assert torch.load(converted, weights_only=True)["image_embedding.weight"].shape == (32, 16 * 16 * 3)

    expected = np.load(FIXTURES / "m3ae_tiny_expected.npz")
    image, text = C.m3ae_encoders(vocab_size=100, m3ae=SIZES, ckpt=converted)
    states = {}
    for e in (image, text):
        e.eval().encoder.register_forward_hook(lambda m, i, o, k=e.modality: states.__setitem__(k, o.numpy()))
    pad = torch.from_numpy(expected["padding"]).long()
    with torch.no_grad():
        pooled_image = image(torch.from_numpy(expected["images"]).permute(0, 3, 1, 2)).numpy()     # NHWC -> NCHW
        pooled_text = text(torch.stack([torch.from_numpy(expected["ids"]).long(), pad], 1)).numpy()
    # every token state (CLS first, padding positions included) as the JAX model computed it
    assert np.abs(states["image"] - expected["image_states"]).max() < 1e-5
    assert np.abs(states["text"] - expected["text_states"]).max() < 1e-5
    # the feature: the mean over the tokens, the text's padding (3 and 6 positions of 8) left out
    assert np.abs(pooled_image - expected["image_states"].mean(1)).max() < 1e-5
    keep = np.concatenate([np.ones((2, 1)), 1 - expected["padding"]], 1)[..., None]
    assert keep.sum() == 2 + 6 + 3
    assert np.abs(pooled_text - (expected["text_states"] * keep).sum(1) / keep.sum(1)).max() < 1e-5


def test_m3ae_pickle_runs_no_pickled_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"state": Payload(), "variant": {}}))
    with pytest.raises(C.DataError, match=r"evil\.pkl: expected an M3AE pickle as m3ae_main\.py saves it"):
        C.convert_m3ae(tmp_path / "evil.pkl", tmp_path / "out.pt")
    assert not marker.exists() and not (tmp_path / "out.pt").exists()
    with pytest.raises(C.DataError, match=r"absent\.pkl: M3AE pickle not found"):
        C.convert_m3ae(tmp_path / "absent.pkl", tmp_path / "out.pt")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(C.DataError, match=r"junk\.pkl: not a readable pickle \(UnpicklingError"):
        C.convert_m3ae(tmp_path / "junk.pkl", tmp_path / "out.pt")


def wrong_checkpoints(tmp_path, converted):
    """(file, what its error names) for four wrongly keyed state dicts of the fixture's encoders."""
    sd = torch.load(converted, weights_only=True)
    jax_keys = {f"params/{k}": torch.from_numpy(np.array(v)) for k, v in
                C.read_m3ae_pickle(FIXTURES / "m3ae_tiny.pkl")[0].items()}
    torch.manual_seed(0)
    shallow = {**C.M3AEEncoder("image", 32, 1, 4, 4, 16, 100).state_dict(),
               **C.M3AEEncoder("text", 32, 1, 4, 4, 16, 100).state_dict()}
    cases = {"prefixed.pt": ({"mae_v." + k: v for k, v in sd.items()},
                             "30 of the image encoder's 30 tensors are not in the M3AE checkpoint (encoder_image_type_"
                             "embedding, cls_token, image_embedding.weight, image_embedding.bias ... (26 more)); it "
                             "holds mae_v.cls_token, mae_v.encoder_image_type_embedding, mae_v.encoder_text_type_embedding, "
                             "mae_v.image_embedding.weight ... (28 more) instead; set --m3ae_dim"),
             "jax.pt": (jax_keys, "30 of the image encoder's 30 tensors are not in the M3AE checkpoint (encoder_image_"
                                  "type_embedding, cls_token, image_embedding.weight, image_embedding.bias ... (26 "
                                  "more)); it holds params/cls_token, params/decoder"),
             "empty.pt": ({}, "30 of the image encoder's 30 tensors are not in the M3AE checkpoint (encoder_image_"
                              "type_embedding, cls_token, image_embedding.weight, image_embedding.bias ... (26 "
                              "more)); it is empty; set --m3ae_dim"),
             "shallow.pt": (shallow, "12 of the image encoder's 30 tensors are not in the M3AE checkpoint (encoder."
                                     "blocks.1.layer_norm1.weight, encoder.blocks.1.layer_norm1.bias, encoder.blocks.1."
                                     "attention.qkv_linear.weight, encoder.blocks.1.attention.qkv_linear.bias ... (8 "
                                     "more)); it holds no others; set --m3ae_dim/--m3ae_depth")}
    for name, (state, _) in cases.items():
        torch.save(state, tmp_path / name)
    return {tmp_path / name: text for name, (_, text) in cases.items()}


def test_wrongly_keyed_m3ae_checkpoints_are_one_line_errors_unless_partial(tmp_path, converted, capsys):
    if not converted.exists():
        C.convert_m3ae(FIXTURES / "m3ae_tiny.pkl", converted)
    for path, text in wrong_checkpoints(tmp_path, converted).items():
        with pytest.raises(C.DataError) as e:
            C.m3ae_encoders(vocab_size=100, m3ae=SIZES, ckpt=path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: {text}") and "\n" not in msg
        assert msg.endswith("or pass --partial_ckpt to leave the missing ones at their random init")
        capsys.readouterr()
        image, text_encoder = C.m3ae_encoders(vocab_size=100, m3ae=SIZES, ckpt=path, partial=True)
        n = 18 if path.name == "shallow.pt" else 0                 # the shallow model's 18 image tensors load
        assert f"M3AE image encoder <- {path}: {n} tensors loaded; missing keys: " in capsys.readouterr().out


def test_partial_ckpt_flag_reaches_both_loaders(tmp_path, capsys):
    assert C.it_encoder_options(train_it.get_args(["--partial_ckpt"]))["partial"] is True
    assert C.it_encoder_options(train_it.get_args([]))["partial"] is False
    assert train_ait.get_args(["--partial_ckpt"]).partial_ckpt is True
    cav = dict(dim=16, depth=2, heads=2, mlp_ratio=2, patch_size=4)
    torch.save({}, tmp_path / "cav.pth")
    with pytest.raises(C.DataError, match=r"cav\.pth: \d+ of the audio encoder's \d+ tensors are not in the CAV-MAE "
                                          r"checkpoint .*; it is empty; set --cavmae_dim.* or pass --partial_ckpt"):
        C.build_ait_audio_encoder("cavmae", 16, tuple(cav.values()), 16, 8, tmp_path / "cav.pth")
    C.build_ait_audio_encoder("cavmae", 16, tuple(cav.values()), 16, 8, tmp_path / "cav.pth", partial=True)
    assert f"CAV-MAE audio encoder <- {tmp_path / 'cav.pth'}: 0 tensors loaded" in capsys.readouterr().out
