"""Loaders on tiny fixtures written here in each accepted on-disk layout, and bad inputs."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common as C

EMOS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


def tone(freq, rate, seconds=0.6):
    t = np.arange(int(rate * seconds)) / rate
    return 0.5 * np.sin(2 * np.pi * freq * t)


def write_frames(folder, names, reds):
    folder.mkdir(parents=True, exist_ok=True)
    for name, r in zip(names, reds):
        Image.new("RGB", (12, 12), (r, 100, 50)).save(folder / name, quality=100)


def ogm_layout(root, rows_train, rows_test, bom=True, rate=22050, stat=True):
    """CREMA-D in the OGM-GE layout: train.csv/test.csv (BOM), stat.csv, AudioWAV, Image-01-FPS."""
    pre = "\ufeff" if bom else ""
    for split, rows in (("train", rows_train), ("test", rows_test)):
        (root / f"{split}.csv").write_text(pre + "".join(f"{c},{l}\n" for c, l in rows), encoding="utf-8")
        for c, _ in rows:
            (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
            C.write_wav(root / "AudioWAV" / f"{c}.wav", tone(1000, rate), rate)
            write_frames(root / "Image-01-FPS" / c, [f"frame_{k}.jpg" for k in range(1, 11)],
                         [20 * k for k in range(1, 11)])
    if stat:
        (root / "stat.csv").write_text(pre + "\n".join(EMOS) + "\n", encoding="utf-8")
    return root


def crema_rows(n, start=0):
    return [(f"10{i:02d}_DFA_{EMOS[i % 6]}_XX", EMOS[i % 6]) for i in range(start, start + n)]


def test_ogm_layout_labels_bom_frames_and_resampling(tmp_path):
    rows = crema_rows(9)
    rows[6] = ("1006_IEO_SAD_HI", "SAD")                      # line 7 of train.csv
    ogm_layout(tmp_path, rows, crema_rows(3, 20))
    data = C.load_av_splits("cremad", tmp_path)
    assert data["layout"] == "cremad_ogm"
    assert data["classes"] == EMOS
    assert [c.id for c in data["train"]] == [r[0] for r in rows]
    assert data["train"][6].label == EMOS.index("SAD") and data["train"][6].src.endswith("train.csv:7")
    assert data["train"][0].id == "1000_DFA_NEU_XX"            # the BOM did not leak into the first id
    ds = C.AVDataset(data["train"], train=False, image_size=8, frames=3, audio_len=80, num_mel_bins=24)
    audio, video, label, i = ds[6]
    assert audio.shape == (1, 80, 24) and video.shape == (3, 3, 8, 8) and label == 2 and i == 6
    # frames 1..10 in natural order; three taken evenly: frame_2, frame_6, frame_9
    red = video[:, 0].mean((1, 2)) * C.IMAGENET_STD[0] + C.IMAGENET_MEAN[0]
    assert torch.allclose(red * 255, torch.tensor([40.0, 120.0, 180.0]), atol=4)
    # 22.05 kHz audio is resampled: the fbank equals that of the same tone written at 16 kHz
    ref = C.wav_to_fbank(tone(1000, 16000), 16000, 24, 80)
    assert audio[0, 5:40].argmax(1).eq(ref[5:40].argmax(1)).all()
    loud = ref[5:40] > -8                                      # bins with energy (the rest is float noise)
    assert torch.allclose(audio[0, 5:40][loud], ref[5:40][loud], atol=0.5)
    assert (audio[0, :58] != 0).any(1).all() and (audio[0, 58:] == 0).all()   # 0.6 s = 58 frames, padded
    wave, rate = C.read_wav(data["train"][0].audio)
    assert rate == 22050 and abs(len(wave) - 13230) <= 1


def test_ogm_layout_without_stat_uses_known_order(tmp_path):
    ogm_layout(tmp_path, [("1001_A_SAD_XX", "SAD"), ("1002_A_NEU_XX", "NEU"), ("1003_A_ANG_XX", "ANG")],
               [("1004_A_NEU_XX", "NEU")], stat=False)
    data = C.load_av_splits("cremad", tmp_path)
    assert data["classes"] == ["NEU", "SAD", "ANG"]
    assert [c.label for c in data["train"]] == [1, 0, 2]


def test_mla_layout_npy_fbank_and_sorted_classes(tmp_path):
    (tmp_path / "stat_cre.txt").write_text("Sad\nAnger\nNeutral\nHappy\nFear\nDisgust\n")
    names = {"train": [("1085_IWL_SAD_XX", "Sad"), ("1059_TSI_HAP_XX", "Happy"), ("1009_TIE_ANG_XX", "Anger")],
             "test": [("1033_IEO_NEU_XX", "Neutral")]}
    for split, rows in names.items():
        (tmp_path / f"my_{split}_cre.txt").write_text("".join(f"{c}.flv {l}\n" for c, l in rows))
        for k, (c, _) in enumerate(rows):
            d = tmp_path / "audio" / f"{split}_fbank"
            d.mkdir(parents=True, exist_ok=True)
            np.save(d / f"{c}.npy", np.full((30 + 40 * k, 128), k + 1.0, np.float32))
            write_frames(tmp_path / "visual" / f"{split}_imgs" / "Image-01-FPS" / c, ["a.jpg", "b.jpg"], [10, 200])
    data = C.load_av_splits("cremad", tmp_path)
    assert data["layout"] == "cremad_mla"
    assert data["classes"] == ["Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad"]   # official: sorted
    assert [c.label for c in data["train"]] == [5, 3, 0]
    ds = C.AVDataset(data["train"], train=True, image_size=8, frames=3, audio_len=64, num_mel_bins=128)
    a0, v0, _, _ = ds[0]
    a2, _, _, _ = ds[2]
    assert a0.shape == (1, 64, 128) and (a0[0, :30] == 1).all() and (a0[0, 30:] == 0).all()   # padded
    assert a2.shape == (1, 64, 128) and (a2 == 3).all()                                        # cut (110 rows)
    assert v0.shape == (3, 3, 8, 8)
    with pytest.raises(C.DataError, match=r"1085_IWL_SAD_XX\.npy.*expected \(frames, 64\)"):
        C.AVDataset(data["train"], train=False, image_size=8, num_mel_bins=64)[0]


def test_ks_layout_label_indices_and_class_file(tmp_path):
    rows = {"train": [("-abc_000001_000011", 4), ("xyz-_000010_000020", 0), ("q_w_e_000003_000013", 30)],
            "test": [("tst_000001_000011", 7)]}
    for split, rr in rows.items():
        (tmp_path / f"my_{split}.txt").write_text("".join(f"{c},10,{l}\n" for c, l in rr))
        for c, _ in rr:
            (tmp_path / f"{split}_wav" / split).mkdir(parents=True, exist_ok=True)
            C.write_wav(tmp_path / f"{split}_wav" / split / f"{c}.wav", tone(500, 16000, 1.0), 16000)
            write_frames(tmp_path / "Image-01-FPS" / c, [f"frame_0000{k}.jpg" for k in (1, 2, 3)], [1, 2, 3])
    data = C.load_av_splits("ks", tmp_path)
    assert data["layout"] == "ks_ogm"
    assert len(data["classes"]) == 31 and data["classes"][30] == "30"
    assert [c.label for c in data["train"]] == [4, 0, 30]
    assert data["train"][2].audio.endswith("train_wav/train/q_w_e_000003_000013.wav")
    (tmp_path / "classes.txt").write_text("\n".join(f"class {i}" for i in range(31)))
    assert C.load_av_splits("ks", tmp_path)["classes"][4] == "class 4"
    a, v, y, _ = C.AVDataset(data["test"], False, 16, 2, 100, 128)[0]
    assert a.shape == (1, 100, 128) and v.shape == (2, 3, 16, 16) and y == 7


def raw_layout(root, actors=5, per_emotion=3):
    for a in range(actors):
        for e in EMOS:
            for s in range(per_emotion):
                clip = f"10{a:02d}_S{s}_{e}_XX"
                (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
                C.write_wav(root / "AudioWAV" / f"{clip}.wav", tone(300, 16000, 0.1), 16000)
                write_frames(root / "Image-01-FPS" / clip, ["frame_00001.jpg"], [5])
    return root


def test_raw_download_seeded_and_actor_disjoint_split(tmp_path):
    raw_layout(tmp_path)                                       # 5 actors x 6 emotions x 3 = 90 clips
    a = C.load_av_splits("cremad", tmp_path, split_seed=0)
    b = C.load_av_splits("cremad", tmp_path, split_seed=0)
    c = C.load_av_splits("cremad", tmp_path, split_seed=1)
    assert a["layout"] == "cremad_raw" and a["classes"] == EMOS
    ids = lambda d, s: [x.id for x in d[s]]
    assert ids(a, "test") == ids(b, "test") and ids(a, "test") != ids(c, "test")
    assert len(a["test"]) == 12 and len(a["train"]) == 78      # 2 of 15 per class
    assert sorted(x.label for x in a["test"]) == sorted(list(range(6)) * 2)
    assert all(x.label == EMOS.index(x.id.split("_")[2]) for x in a["train"])
    d = C.load_av_splits("cremad", tmp_path, split_seed=0, actor_split=True)
    actors = lambda s: {x.id.split("_")[0] for x in d[s]}
    assert actors("train").isdisjoint(actors("test")) and len(actors("test")) == 1
    assert len(d["train"]) + len(d["test"]) == 90


def test_raw_download_without_frames_or_pyav_says_how(tmp_path, monkeypatch):
    (tmp_path / "AudioWAV").mkdir()
    C.write_wav(tmp_path / "AudioWAV" / "1001_DFA_ANG_XX.wav", tone(300, 16000, 0.1), 16000)
    (tmp_path / "VideoFlash").mkdir()
    (tmp_path / "VideoFlash" / "1001_DFA_ANG_XX.flv").write_bytes(b"FLV")
    monkeypatch.setitem(sys.modules, "av", None)                # PyAV not installed
    with pytest.raises(C.DataError, match="needs PyAV.*pip install av"):
        C.load_av_splits("cremad", tmp_path)


def test_stratified_split_seeded():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    keep, held = C.stratified_split(labels, 0.1, seed=3)
    assert sorted(keep + held) == list(range(100))
    assert [sum(labels[i] == c for i in held) for c in range(3)] == [5, 3, 2]
    assert C.stratified_split(labels, 0.1, seed=3) == (keep, held)
    assert C.stratified_split(labels, 0.1, seed=4)[1] != held


def test_pick_even_and_natural_order(tmp_path):
    assert C.pick_even(10, 3) == [1, 5, 8]
    assert C.pick_even(3, 3) == [0, 1, 2]
    assert C.pick_even(2, 3) == [0, 1, 1]
    write_frames(tmp_path, ["frame_10.jpg", "frame_2.jpg", "frame_1.jpg"], [1, 2, 3])
    (tmp_path / "notes.txt").write_text("not a frame")
    assert [p.name for p in C.list_frames(tmp_path)] == ["frame_1.jpg", "frame_2.jpg", "frame_10.jpg"]


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    grey = np.array([[0, 32768], [65535, 4096]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    rgb = np.asarray(C.load_image(tmp_path / "deep.png"))
    assert rgb.shape == (2, 2, 3) and rgb[..., 0].tolist() == [[0, 128], [255, 16]]


def test_read_wav_formats(tmp_path):
    import struct
    x = (np.sin(np.arange(100) / 5) * 0.5).astype(np.float32)
    for bits, tag, raw in [(32, 3, x.astype("<f4").tobytes()),
                           (16, 1, (x * 32767).astype("<i2").tobytes())]:
        stereo = np.repeat(np.frombuffer(raw, "<f4" if tag == 3 else "<i2"), 2).tobytes()
        fmt = struct.pack("<HHIIHH", tag, 2, 8000, 8000 * 2 * bits // 8, 2 * bits // 8, bits)
        body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(stereo)) + stereo
        (tmp_path / "a.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
        wave, rate = C.read_wav(tmp_path / "a.wav")
        assert rate == 8000 and np.allclose(wave, x, atol=1e-4)


# ---------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def good(tmp_path):
    return ogm_layout(tmp_path, crema_rows(6), crema_rows(2, 10))


def test_bad_missing_wav(good):
    (good / "AudioWAV" / "1002_DFA_SAD_XX.wav").unlink()
    with pytest.raises(C.DataError, match=r"train\.csv:3: audio of clip '1002_DFA_SAD_XX' missing.*AudioWAV"):
        C.load_av_splits("cremad", good)
    d = C.load_av_splits("cremad", good, skip_bad=True)
    assert d["skipped"] == 1 and len(d["train"]) == 5


def test_bad_corrupt_jpg(good):
    frame = good / "Image-01-FPS" / "1001_DFA_HAP_XX" / "frame_2.jpg"
    frame.write_bytes(frame.read_bytes()[:40])                # truncated
    ds = C.AVDataset(C.load_av_splits("cremad", good)["train"], False, 8, 3, 20, 16)
    with pytest.raises(C.DataError, match=r"frame_2\.jpg: unreadable image \(listed at .*train\.csv:2\)"):
        ds[1]


def test_bad_unknown_label(good):
    text = (good / "train.csv").read_text(encoding="utf-8-sig").splitlines()
    text[3] = "1003_DFA_FEA_XX,HAPPY"
    (good / "train.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(C.DataError, match=r"train\.csv:4: label 'HAPPY' is not a known class.*stat\.csv"):
        C.load_av_splits("cremad", good)


def test_bad_empty_list(good):
    (good / "test.csv").write_text("\ufeff\n\n")
    with pytest.raises(C.DataError, match=r"test\.csv: the list is empty; expected lines like"):
        C.load_av_splits("cremad", good)


def test_bad_empty_frame_folder(good):
    for f in (good / "Image-01-FPS" / "1004_DFA_DIS_XX").iterdir():
        f.unlink()
    with pytest.raises(C.DataError, match=r"train\.csv:5: frame folder .*1004_DFA_DIS_XX/ .* is empty"):
        C.load_av_splits("cremad", good)


def test_bad_malformed_line_and_not_a_wav(good):
    (good / "AudioWAV" / "1000_DFA_NEU_XX.wav").write_bytes(b"ID3 this is an mp3")
    with pytest.raises(C.DataError, match=r"1000_DFA_NEU_XX\.wav: not a RIFF/WAVE file.*train\.csv:1"):
        C.load_av_splits("cremad", good)
    (good / "train.csv").write_text("1000_DFA_NEU_XX;NEU\n")
    with pytest.raises(C.DataError, match=r"train\.csv:1: '1000_DFA_NEU_XX;NEU'; expected '<clip>,<LABEL>'"):
        C.load_av_splits("cremad", good)


def test_bad_data_root_lists_layouts(tmp_path):
    with pytest.raises(C.DataError, match=r"(?s)data root not found.*MLA layout.*OGM-GE layout.*raw download"):
        C.load_av_splits("cremad", tmp_path / "nowhere")
    with pytest.raises(C.DataError, match=r"(?s)no known ks layout.*Kinetics-Sounds"):
        C.load_av_splits("ks", tmp_path)


def test_bad_audio_found_before_training(good):
    """An empty WAV or an fbank of the wrong width stops the run at load time, not mid-epoch."""
    wav = good / "AudioWAV" / "1003_DFA_FEA_XX.wav"
    C.write_wav(wav, np.zeros(0), 16000)
    with pytest.raises(C.DataError, match=r"1003_DFA_FEA_XX\.wav: WAV file holds no samples.*train\.csv:4"):
        C.load_av_splits("cremad", good)
    assert C.load_av_splits("cremad", good, skip_bad=True)["skipped"] == 1
    wav.unlink()
    np.save(good / "AudioWAV" / "1003_DFA_FEA_XX.npy", np.zeros((50, 40), np.float32))
    with pytest.raises(C.DataError, match=r"1003_DFA_FEA_XX\.npy: fbank of shape \(50, 40\); expected \(frames, 128\)"):
        C.load_av_splits("cremad", good, num_mel_bins=128)


def test_unusual_folders_are_found_by_search(tmp_path):
    ogm_layout(tmp_path, crema_rows(4), crema_rows(2, 10))
    (tmp_path / "media" / "sound").mkdir(parents=True)
    (tmp_path / "AudioWAV").rename(tmp_path / "media" / "sound" / "wavs")
    (tmp_path / "Image-01-FPS").rename(tmp_path / "media" / "pics")
    data = C.load_av_splits("cremad", tmp_path)
    assert data["train_audio_dir"] == tmp_path / "media" / "sound" / "wavs"
    assert data["train_frames_dir"] == tmp_path / "media" / "pics"
    assert len(data["train"]) == 4
