"""IEMOCAP (A-I-T) lists and loader on tiny fixtures in the MLA layout; the CAV-MAE audio encoder and its loader."""
import numpy as np
import pytest
import torch
from PIL import Image

import common as C

SEP = " [split|sign] "


def write_face(path, rgb, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path, quality=100)


def iemo_layout(root, splits, bins=8, frames=12, tokens=False, faces=3):
    """MLA layout: my_{split}_iemo.txt, audio/{split}_fbank/<utt>.npy, visual/{split}_imgs/<utt>/frame_k.jpg
    (frame k in colour (40 k, 0, 0)), optionally text_token/{split}_token/<utt>_{token,pm}.npy."""
    for split, rows in splits.items():
        lines = []
        for utt, text, label in rows:
            lines.append(f"{utt}.mp4{SEP}{text}{SEP}{label}")
            (root / "audio" / f"{split}_fbank").mkdir(parents=True, exist_ok=True)
            np.save(root / "audio" / f"{split}_fbank" / f"{utt}.npy", np.full((frames, bins), len(text), np.float32))
            for k in range(1, faces + 1):
                write_face(root / "visual" / f"{split}_imgs" / utt / f"frame_{k}.jpg", (40 * k, 0, 0))
            if tokens:
                folder = root / "text_token" / f"{split}_token"
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / f"{utt}_token.npy", np.array([[7, 8, 9, 0, 0, 0]], np.int64))
                np.save(folder / f"{utt}_pm.npy", np.array([[0, 0, 0, 1, 1, 1]], np.float32))
        (root / f"my_{split}_iemo.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


UNICODE_LINES = [
    ("Ses01F_impro01_F000", "Oh, right -- sure; this is \"standing\" on the beach... [LAUGHTER] (yes)!", "Angry"),
    ("Ses01F_impro01_F001", "Crème brûlée? ¿Qué? 日本語 — “quoted” ‘single’ ☕ 🙂 a|b [x] 50% $3.50 #tag @me", "Happy"),
    ("Ses02M_script01_1_M002", "I'm gonna forget him.  Two  spaces, tabs\tkept inside", "Sad"),
    ("Ses03F_impro05_F003", "", "Neutral"),
]


def test_list_parser_keeps_text_with_unicode_and_punctuation(tmp_path):
    path = tmp_path / "my_train_iemo.txt"
    lines = [f"{u}.mp4{SEP}{t}{SEP}{l}" for u, t, l in UNICODE_LINES]
    lines[1] = f"/data/IEMOCAP/subaudio/{UNICODE_LINES[1][0]}.wav{SEP}{UNICODE_LINES[1][1]}{SEP}{UNICODE_LINES[1][2]}"
    path.write_text("\ufeff" + "\n".join(lines) + "\n\n", encoding="utf-8")       # BOM and a blank last line
    rows = C.iemocap_rows(path)
    assert [(u, l, t) for u, l, _, t in rows] == [(u, l, t.strip()) for u, t, l in UNICODE_LINES]
    assert [src for _, _, src, _ in rows] == [f"{path}:{i}" for i in range(1, 5)]


@pytest.mark.parametrize("line, expected", [
    ("Ses01F_impro01_F000.mp4 [split|sign] hello Neutral", "has 1 '\\[split\\|sign\\]' separators"),
    ("Ses01F_impro01_F000.mp4 [split|sign] a [split|sign] b [split|sign] Sad", "has 3"),
    ("Ses01F_impro01_F000.mp4 [split|sign] hello [split|sign] ", "has 2"),
    ("Ses01F_impro01_F000.mp4 Neutral", "has 0"),
])
def test_malformed_list_line_names_file_and_line(tmp_path, line, expected):
    path = tmp_path / "my_train_iemo.txt"
    path.write_text(f"a.mp4{SEP}fine{SEP}Sad\n{line}\n", encoding="utf-8")
    with pytest.raises(C.DataError, match=rf"my_train_iemo\.txt:2: .*{expected}.*expected '<utt>\.mp4"):
        C.iemocap_rows(path)


def small_splits():
    return {"train": [("u0", "Hello, world!", "Neutral"), ("u1", "Je suis fâché.", "Angry"),
                      ("u2", "so sad...", "Sad"), ("u3", "yay!!", "Happy")],
            "dev": [("d0", "hm", "Sad")],
            "test": [("s0", "fine", "Happy"), ("s1", "no", "Angry")]}


def test_split_lists_with_dev_tokens_classes_and_middle_face(tmp_path):
    root = iemo_layout(tmp_path, small_splits(), tokens=True)
    (root / "stat_iemo.txt").write_text("Neutral\nAngry\nSad\nHappy\n")
    data = C.load_iemocap_splits(root, num_mel_bins=8)
    assert data["classes"] == ["Angry", "Happy", "Neutral", "Sad"]          # sorted, as the official code
    assert [len(data[s]) for s in ("train", "dev", "test")] == [4, 1, 2]
    u = data["train"][1]
    assert (u.id, u.label, u.text, u.src) == ("u1", 0, "Je suis fâché.", f"{root / 'my_train_iemo.txt'}:2")
    assert u.audio == str(root / "audio" / "train_fbank" / "u1.npy")
    assert u.image == str(root / "visual" / "train_imgs" / "u1" / "frame_2.jpg")   # the middle of three
    assert u.tokens == str(root / "text_token" / "train_token" / "u1_token.npy")
    assert data["dev"][0].image.endswith("dev_imgs/d0/frame_2.jpg") and data["skipped"] == 0

    ds = C.AITDataset(data["train"], False, audio_len=16, num_mel_bins=8, fbank_mean=1.0, fbank_std=2.0,
                      image_size=16, max_len=4)
    audio, image, text, label, i = ds[1]
    assert audio.shape == (1, 16, 8) and image.shape == (3, 16, 16) and (label, i) == (0, 1)
    assert torch.allclose(audio[0, :12], torch.full((12, 8), (len("Je suis fâché.") - 1.0) / 2.0))
    assert torch.allclose(audio[0, 12:], torch.full((4, 8), -0.5))              # zero padding, normalised
    assert text.tolist() == [[7, 8, 9, 0], [0, 0, 0, 1]]                      # the token files, cut to 4
    red = (image[0] * 0.229 + 0.485).mean().item()
    assert abs(red - 80 / 255) < 0.02                                          # frame_2's colour


def test_raw_text_from_the_line_through_the_tokenizer(tmp_path):
    root = iemo_layout(tmp_path, small_splits())
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", ",", "world",
                                                          "!", "je", "suis", "fache", "."]) + "\n")
    data = C.load_iemocap_splits(root, num_mel_bins=8)
    assert data["classes"] == ["Angry", "Happy", "Neutral", "Sad"] and data["train"][0].tokens == ""
    ds = C.AITDataset(data["train"], False, audio_len=12, num_mel_bins=8, image_size=16, max_len=6,
                      tokenizer=C.load_tokenizer(tmp_path / "tok"))
    assert ds[0][2][0].tolist() == [4, 5, 6, 7, 0, 0] and ds[0][2][1].tolist() == [0, 0, 0, 0, 1, 1]
    assert ds[1][2][0].tolist()[:4] == [8, 9, 10, 11]                          # accents stripped, as BERT uncased


def test_single_list_is_split_60_20_20_seeded_and_stratified(tmp_path):
    classes = ["Neutral", "Angry", "Sad", "Happy"]
    rows = [(f"Ses0{i % 5 + 1}F_x{i:03d}", f"text {i}", classes[i % 4]) for i in range(40)]
    iemo_layout(tmp_path, {"all": rows})
    (tmp_path / "my_all_iemo.txt").rename(tmp_path / "my_iemo.txt")
    (tmp_path / "audio" / "all_fbank").rename(tmp_path / "audio" / "fbank")
    for d in (tmp_path / "visual" / "all_imgs").iterdir():                      # one image per utterance
        (d / "frame_1.jpg").rename(tmp_path / "visual" / "all_imgs" / f"{d.name}.jpg")
    (tmp_path / "visual" / "all_imgs").rename(tmp_path / "faces")
    data = C.load_iemocap_splits(tmp_path, split_seed=3, num_mel_bins=8)
    assert data["layout"] == "one list, split 60/20/20 with seed 3"
    ids = {s: [u.id for u in data[s]] for s in ("train", "dev", "test")}
    assert [len(ids[s]) for s in ids] == [24, 8, 8]
    assert sorted(ids["train"] + ids["dev"] + ids["test"]) == sorted(r[0] for r in rows)
    for s, n in (("train", 6), ("dev", 2), ("test", 2)):
        assert [sum(u.label == c for u in data[s]) for c in range(4)] == [n] * 4
    assert data["train"][0].image.startswith(str(tmp_path / "faces")) and data["train"][0].image.endswith(".jpg")
    again = C.load_iemocap_splits(tmp_path, split_seed=3, num_mel_bins=8)
    other = C.load_iemocap_splits(tmp_path, split_seed=4, num_mel_bins=8)
    assert [u.id for u in again["test"]] == ids["test"] and [u.id for u in other["test"]] != ids["test"]
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "my_iemo.txt").write_text("".join(f"u{i}.mp4{SEP}hi{SEP}Sad\n" for i in range(2)))
    with pytest.raises(C.DataError, match=r"my_iemo\.txt: 2 utterances leave the dev or test part .* empty"):
        C.load_iemocap_splits(tmp_path / "few")


def test_loader_errors_name_file_line_and_expectation(tmp_path):
    def fresh(name, **kw):
        return iemo_layout(tmp_path / name, small_splits(), **kw)

    root = fresh("label")
    (root / "stat_iemo.txt").write_text("Neutral\nAngry\nSad\nHappy\n")
    (root / "my_test_iemo.txt").write_text(f"s0.mp4{SEP}fine{SEP}Frustrated\n")
    with pytest.raises(C.DataError, match=r"my_test_iemo\.txt:1: label 'Frustrated' is not a known class; "
                                          r"expected one of \['Angry', 'Happy', 'Neutral', 'Sad'\]"):
        C.load_iemocap_splits(root, num_mel_bins=8)
    root = fresh("typo")                      # IEMOCAP has 4 classes: a 5th label without stat_iemo.txt
    labels = ["Neutral", "Angry", "Sad", "Happy"] * 2 + ["Angyr"]
    (root / "my_train_iemo.txt").write_text("".join(f"u{i}.mp4{SEP}ok{SEP}{l}\n" for i, l in enumerate(labels)))
    with pytest.raises(C.DataError, match=r"my_train_iemo\.txt:9: label 'Angyr' \(1 of 9 lines\) makes 5 classes; "
                                          r"IEMOCAP has 4: fix the label, or name the classes in .*stat_iemo\.txt$"):
        C.load_iemocap_splits(root, num_mel_bins=8)
    root = fresh("npy")
    (root / "audio" / "train_fbank" / "u2.npy").unlink()
    with pytest.raises(C.DataError, match=r"my_train_iemo\.txt:3: audio of 'u2' missing: expected .*train_fbank/u2\.npy"):
        C.load_iemocap_splits(root, num_mel_bins=8)
    assert C.load_iemocap_splits(root, num_mel_bins=8, skip_bad=True)["skipped"] == 1
    root = fresh("image")
    for f in (root / "visual" / "test_imgs" / "s1").iterdir():
        f.unlink()
    with pytest.raises(C.DataError, match=r"my_test_iemo\.txt:2: face image folder .*test_imgs/s1/ of 's1' is empty"):
        C.load_iemocap_splits(root, num_mel_bins=8)
    (root / "visual" / "test_imgs" / "s1").rmdir()
    with pytest.raises(C.DataError, match=r"my_test_iemo\.txt:2: face image of 's1' missing: expected a folder"):
        C.load_iemocap_splits(root, num_mel_bins=8)
    root = fresh("bins")
    with pytest.raises(C.DataError, match=r"u0\.npy: fbank of shape \(12, 8\); expected \(frames, 16\).*"
                                          r"my_train_iemo\.txt:1"):
        C.load_iemocap_splits(root, num_mel_bins=16)
    root = fresh("empty")
    (root / "my_dev_iemo.txt").write_text("\n")
    with pytest.raises(C.DataError, match=r"my_dev_iemo\.txt: the list is empty; expected lines like"):
        C.load_iemocap_splits(root, num_mel_bins=8)
    root = fresh("twice")
    (root / "my_test_iemo.txt").write_text(f"u1.mp4{SEP}again{SEP}Sad\n")
    with pytest.raises(C.DataError, match=r"my_test_iemo\.txt:1: utterance 'u1' listed twice \(first at "
                                          r".*my_train_iemo\.txt:2\)"):
        C.load_iemocap_splits(root, num_mel_bins=8)
    root = fresh("tokens", tokens=True)
    (root / "text_token" / "dev_token" / "d0_pm.npy").unlink()
    with pytest.raises(C.DataError, match=r"my_dev_iemo\.txt:1: text of 'd0' not found: expected .*d0_pm\.npy"):
        C.load_iemocap_splits(root, num_mel_bins=8)
    with pytest.raises(C.DataError, match=r"(?s)no IEMOCAP list found.*accepted layout"):
        C.load_iemocap_splits(tmp_path / "label" / "audio")
    with pytest.raises(C.DataError, match="data root not found"):
        C.load_iemocap_splits(tmp_path / "absent")


def test_toy_set_reads_back_through_the_loader(tmp_path):
    C.make_toy_ait(tmp_path, seed=3, n_train=8, n_dev=4, n_test=4, frames=16, mel_bins=8, recipe=C.ToyAIT(px=16, faces=2))
    data = C.load_iemocap_splits(tmp_path, num_mel_bins=8)
    assert data["classes"] == ["Angry", "Happy", "Neutral", "Sad"] and data["layout"] == "split lists"
    assert [len(data[s]) for s in ("train", "dev", "test")] == [8, 4, 4]
    assert [data["classes"][u.label] for u in data["train"][:4]] == C.TOY_AIT_CLASSES
    assert all(u.image.endswith("frame_00002.jpg") and not u.tokens for u in data["test"])
    again = tmp_path / "again"
    C.make_toy_ait(again, seed=3, n_train=8, n_dev=4, n_test=4, frames=16, mel_bins=8, recipe=C.ToyAIT(px=16, faces=2))
    assert (again / "my_train_iemo.txt").read_bytes() == (tmp_path / "my_train_iemo.txt").read_bytes()
    u = data["train"][5]
    assert np.array_equal(np.load(u.audio), np.load(again / "audio" / "train_fbank" / f"{u.id}.npy"))


# ---------------------------------------------------------------------------------------------- CAV-MAE

TINY_CAV = dict(dim=16, depth=3, heads=2, mlp_ratio=2, patch_size=4, audio_len=16, num_mel_bins=8)


def test_cavmae_patches_are_frequency_rows_by_time_columns():
    enc = C.CAVMAEAudioEncoder(**TINY_CAV)
    rows, cols = 8 // 4, 16 // 4
    pos = enc.pos_embed[0]
    assert pos.shape == (rows * cols, 16)
    for k in range(rows * cols):                       # first half: time column, second half: frequency row
        assert torch.allclose(pos[k, :8], C.sincos_1d(8, torch.tensor([k % cols]))[0])
        assert torch.allclose(pos[k, 8:], C.sincos_1d(8, torch.tensor([k // cols]))[0])
    assert torch.equal(C.sincos_2d(16, 3), C.sincos_2d(16, 3, 3))
    # a patch embedding that reads one input value: token k holds the fbank at frame 4 * (k % cols), bin 4 * (k // cols)
    x = torch.arange(16 * 8, dtype=torch.float32).view(1, 1, 16, 8)
    with torch.no_grad():
        enc.patch_embed.weight.zero_()
        enc.patch_embed.bias.zero_()
        enc.patch_embed.weight[0, 0, 0, 0] = 1.0
        tokens = enc.patch_embed(x.transpose(2, 3)).flatten(2).transpose(1, 2)
    assert [tokens[0, k, 0].item() for k in range(rows * cols)] == \
        [x[0, 0, 4 * (k % cols), 4 * (k // cols)].item() for k in range(rows * cols)]
    assert enc.encoder.layer_norm.eps == 1e-5 and enc.encoder.blocks[0].transformer_mlp.gelu == "none"
    assert enc(torch.randn(2, 1, 16, 8)).shape == (2, 16)


def cavmae_checkpoint(enc, audio_blocks=2):
    """The tensors of `enc` under the CAV-MAE code's names, with the tensors an audio-only path leaves unused."""
    sd = {"patch_embed_a.proj.weight": enc.patch_embed.weight, "patch_embed_a.proj.bias": enc.patch_embed.bias,
          "pos_embed_a": enc.pos_embed, "modality_a": enc.modality_embedding,
          "norm_a.weight": enc.encoder.layer_norm.weight, "norm_a.bias": enc.encoder.layer_norm.bias,
          "patch_embed_v.proj.weight": torch.zeros(16, 3, 4, 4), "pos_embed_v": torch.zeros(1, 4, 16),
          "modality_v": torch.zeros(1, 1, 16), "norm_v.weight": torch.ones(16), "norm.weight": torch.ones(16),
          "blocks_v.0.attn.qkv.weight": torch.zeros(48, 16)}
    for i, block in enumerate(enc.encoder.blocks):
        pre, norms = (f"blocks_a.{i}", ("norm1", "norm2")) if i < audio_blocks else \
            (f"blocks_u.{i - audio_blocks}", ("norm1_a", "norm2_a"))
        unused = ["norm1_v", "norm2_v"] + (["norm1_a", "norm2_a"] if i < audio_blocks else ["norm1", "norm2"])
        for kind in ("weight", "bias"):
            sd[f"{pre}.{norms[0]}.{kind}"] = getattr(block.layer_norm1, kind)
            sd[f"{pre}.{norms[1]}.{kind}"] = getattr(block.layer_norm2, kind)
            sd[f"{pre}.attn.qkv.{kind}"] = getattr(block.attention.qkv_linear, kind)
            sd[f"{pre}.attn.proj.{kind}"] = getattr(block.attention.fc, kind)
            sd[f"{pre}.mlp.fc1.{kind}"] = getattr(block.transformer_mlp.fc1, kind)
            sd[f"{pre}.mlp.fc2.{kind}"] = getattr(block.transformer_mlp.fc2, kind)
            for n in unused:
                sd[f"{pre}.{n}.{kind}"] = torch.full((16,), 7.0)
    return {k: v.detach().clone() for k, v in sd.items()}


def test_cavmae_checkpoint_round_trip_reports_missing_and_unexpected(tmp_path, capsys):
    torch.manual_seed(0)
    src = C.CAVMAEAudioEncoder(**TINY_CAV).eval()
    for p in src.parameters():                                 # LayerNorms away from their init too
        p.data.add_(0.1 * torch.randn_like(p))
    sd = cavmae_checkpoint(src)
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 9}, tmp_path / "cav.pth")
    torch.manual_seed(1)
    fresh = C.CAVMAEAudioEncoder(**TINY_CAV).eval()
    x = torch.randn(2, 1, 16, 8)
    assert not torch.allclose(fresh(x), src(x))
    missing, unexpected = C.load_cavmae_checkpoint(fresh, tmp_path / "cav.pth")
    assert missing == [] and unexpected == []                  # the visual branch and unused norms are left out
    assert torch.allclose(fresh(x), src(x), atol=1e-6)
    assert "CAV-MAE audio encoder <-" in capsys.readouterr().out

    broken = dict(sd)
    del broken["blocks_a.1.attn.proj.bias"]
    broken["decoder_pred_a.weight"] = torch.zeros(3)
    torch.save(broken, tmp_path / "broken.pth")
    torch.manual_seed(2)
    other = C.CAVMAEAudioEncoder(**TINY_CAV)
    kept = other.encoder.blocks[1].attention.fc.bias.clone()
    with pytest.raises(C.DataError, match=r"broken\.pth: 1 of the audio encoder's \d+ tensors are not in the CAV-MAE "
                       r"checkpoint \(encoder\.blocks\.1\.attention\.fc\.bias\); it holds decoder_pred_a\.weight"):
        C.load_cavmae_checkpoint(other, tmp_path / "broken.pth")
    missing, unexpected = C.load_cavmae_checkpoint(other, tmp_path / "broken.pth", partial=True)
    assert missing == ["encoder.blocks.1.attention.fc.bias"] and unexpected == ["decoder_pred_a.weight"]
    assert "missing keys: encoder.blocks.1.attention.fc.bias; unexpected keys: decoder_pred_a.weight" in \
        capsys.readouterr().out
    assert torch.equal(other.encoder.blocks[1].attention.fc.bias, kept)
    assert torch.equal(other.encoder.blocks[2].layer_norm1.weight, src.encoder.blocks[2].layer_norm1.weight)

    torch.save(src.state_dict(), tmp_path / "own.pth")          # this encoder's own names load as they are
    assert C.load_cavmae_checkpoint(C.CAVMAEAudioEncoder(**TINY_CAV), tmp_path / "own.pth") == ([], [])
    shallow = C.CAVMAEAudioEncoder(**{**TINY_CAV, "depth": 2})
    missing, unexpected = C.load_cavmae_checkpoint(shallow, tmp_path / "cav.pth")
    assert missing == [] and unexpected and all(k.startswith("blocks_u.0.") for k in unexpected)
    wide = C.CAVMAEAudioEncoder(**{**TINY_CAV, "dim": 32})
    with pytest.raises(C.DataError, match=r"cav\.pth: \d+ tensors do not fit the audio encoder.*--cavmae_dim"):
        C.load_cavmae_checkpoint(wide, tmp_path / "cav.pth")
    with pytest.raises(C.DataError, match="CAV-MAE checkpoint not found"):
        C.load_cavmae_checkpoint(wide, tmp_path / "absent.pth")


def test_labels_that_differ_only_in_case_are_warned_about(tmp_path, capsys):
    classes, src = C.it_classes(tmp_path, "iemo", ["Neutral", "neutral ", "Sad", "Happy"], tmp_path / "my_train_iemo.txt")
    assert classes == ["Happy", "Neutral", "Sad", "neutral "] and src.endswith("my_train_iemo.txt")
    err = capsys.readouterr().err
    assert "differ only in case or spaces are different classes: Neutral / neutral " in err
    assert "stat_iemo.txt" in err
    C.it_classes(tmp_path, "iemo", ["Neutral", "Sad"], tmp_path / "my_train_iemo.txt")
    assert capsys.readouterr().err == ""
