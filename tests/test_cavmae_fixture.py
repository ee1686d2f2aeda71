"""The CAV-MAE audio encoder against the authors' code: a tiny CAVMAE made, saved and run by their model code
(tests/fixtures/make_cavmae_fixture.py), loaded through the --cavmae_ckpt path."""
from pathlib import Path

import numpy as np
import torch

import common as C

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CKPT = FIXTURES / "cavmae_tiny.pth"


def expected():
    """The fixed fbank (B, T, F), their audio representation (B, dim) and the sizes it was made with."""
    z = np.load(FIXTURES / "cavmae_tiny_expected.npz")
    sizes = {k: int(z[k]) for k in ("dim", "depth_a", "depth_u", "heads", "mlp_ratio", "patch", "audio_len", "mel_bins")}
    return torch.from_numpy(z["fbank"]), torch.from_numpy(z["audio_rep"]), sizes


def test_cavmae_checkpoint_reproduces_the_authors_audio_representation():
    fbank, rep, s = expected()
    shape = (s["dim"], s["depth_a"] + s["depth_u"], s["heads"], s["mlp_ratio"], s["patch"])
    enc = C.CAVMAEAudioEncoder(*shape, s["audio_len"], s["mel_bins"])
    own_positions = enc.pos_embed.clone()
    missing, unexpected = C.load_cavmae_checkpoint(enc, CKPT)
    assert missing == []
    # what the audio path does not use: the pretraining decoder and its mask token
    assert unexpected and all(k.startswith("decoder_") or k == "mask_token" for k in unexpected), unexpected
    # the fixed sin-cos table is theirs (rows = mel bands, columns = time)
    assert (own_positions - enc.pos_embed).abs().max() < 1e-6
    enc.eval()
    with torch.no_grad():
        out = enc(fbank.unsqueeze(1))                                   # (B, 1, T, F) -> (B, dim)
    assert out.shape == rep.shape and (out - rep).abs().max() < 1e-5
    # the same weights through the builder train_ait.py calls with --cavmae_ckpt
    built = C.build_ait_audio_encoder("cavmae", s["dim"], shape, s["audio_len"], s["mel_bins"], str(CKPT)).eval()
    with torch.no_grad():
        assert (built(fbank.unsqueeze(1)) - rep).abs().max() < 1e-5
