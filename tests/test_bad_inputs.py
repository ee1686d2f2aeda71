"""The catalogue of bad inputs, one case each: accepted as documented, or an error that names the file
(and line) and what was expected; --skip_bad skips the skippable ones and says how many."""
import json
import sys

import numpy as np
import pytest
import torch

import common as C
import train_av
from conftest import written
from test_data import crema_rows, ogm_layout, write_frames


@pytest.fixture
def av(tmp_path):
    root = tmp_path / "cremad"
    root.mkdir()
    return ogm_layout(root, crema_rows(6), crema_rows(2, 10))


def set_line(path, n, text):
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    lines[n - 1] = text
    path.write_text("\n".join(lines) + "\n")


def load(root, **kw):
    return C.load_av_splits("cremad", root, **kw)


# each case: (break the fixture, the error expected, or None when the input is accepted; skippable?)
def missing_data_root(root):
    return C.load_av_splits("cremad", root / "nowhere")


def missing_list_file(root):
    (root / "test.csv").unlink()
    return load(root)


def empty_split(root):
    (root / "test.csv").write_text("\n\n")
    return load(root)


def blank_lines_and_bom(root):
    rows = crema_rows(6)
    (root / "train.csv").write_text("\ufeff" + "\n".join(f"{c},{l}\n" for c, l in rows), encoding="utf-8")
    data = load(root)
    assert [c.id for c in data["train"]] == [c for c, _ in rows] and data["train"][5].src.endswith("train.csv:11")
    return data


def unknown_label(root):
    set_line(root / "train.csv", 4, "1003_DFA_FEA_XX,HAPPY")
    return load(root)


def cremad_label_typo_without_stat(root):
    (root / "stat.csv").unlink()                    # the classes are CREMA-D's own: a typo is no 7th class
    set_line(root / "train.csv", 4, "1003_DFA_FEA_XX,DISGUST")
    return load(root)


def duplicate_clip_id(root):
    set_line(root / "train.csv", 5, "1001_DFA_HAP_XX,HAP")
    return load(root)


def missing_wav(root):
    (root / "AudioWAV" / "1002_DFA_SAD_XX.wav").unlink()
    return load(root)


def zero_length_wav(root):
    C.write_wav(root / "AudioWAV" / "1003_DFA_FEA_XX.wav", np.zeros(0), 16000)
    return load(root)


def non_wav_named_wav(root):
    (root / "AudioWAV" / "1000_DFA_NEU_XX.wav").write_bytes(b"ID3\x03\x00 an mp3 under a .wav name")
    return load(root)


def truncated_jpg(root):
    frame = root / "Image-01-FPS" / "1001_DFA_HAP_XX" / "frame_2.jpg"
    frame.write_bytes(frame.read_bytes()[:60])
    return C.AVDataset(load(root)["train"], False, 8, 3, 20, 16)[1]


def empty_frame_folder(root):
    for f in (root / "Image-01-FPS" / "1004_DFA_DIS_XX").iterdir():
        f.unlink()
    return load(root)


def fbank_npy(root, shape):
    """Clip 6's audio as a precomputed fbank of `shape` in place of its WAV, read with 128 mel bins."""
    (root / "AudioWAV" / "1005_DFA_ANG_XX.wav").unlink()
    np.save(root / "AudioWAV" / "1005_DFA_ANG_XX.npy", np.zeros(shape, np.float32))
    return load(root, num_mel_bins=128)


def fbank_npy_wrong_width(root):
    return fbank_npy(root, (50, 40))


def fbank_npy_transposed(root):
    return fbank_npy(root, (128, 300))


def fbank_npy_empty(root):
    return fbank_npy(root, (0, 128))


def not_an_npy(root):
    (root / "AudioWAV" / "1005_DFA_ANG_XX.wav").unlink()
    (root / "AudioWAV" / "1005_DFA_ANG_XX.npy").write_bytes(b"garbage")
    return load(root, num_mel_bins=128)


def mac_metadata_frames(root):
    """'._frame_1.jpg' (AppleDouble files left by a copy from a Mac) are not frames."""
    folder = root / "Image-01-FPS" / "1000_DFA_NEU_XX"
    for f in list(folder.iterdir()):
        (folder / ("._" + f.name)).write_bytes(b"\0\5\26\7 AppleDouble")
    clips = load(root)["train"]
    assert C.list_frames(folder)[0].name == "frame_1.jpg"
    cached = C.CachedAVDataset(clips, True, C.AVSizes(8, 3, 20, 16), cache_dir=root / "cache")
    assert cached.frames.shape[1:3] == (3, 3)
    return cached


def unreadable_first_frame_with_cache(root):
    frame = root / "Image-01-FPS" / "1000_DFA_NEU_XX" / "frame_1.jpg"
    frame.write_bytes(b"")
    return C.CachedAVDataset(load(root)["train"], True, C.AVSizes(8, 3, 20, 16), cache_dir=root / "cache")


def jsonl_text_with_unicode_line_separators(root):
    """U+2028, U+2029 and U+0085 may stand unescaped in a JSON string: they do not end a line."""
    (root / "images").mkdir()
    write_frames(root / "images", ["a.jpg", "b.jpg"], [10, 200])
    rows = [{"id": "a", "label": "pie", "text": "apple\u2028pie\u2029\u0085", "img": "images/a.jpg"},
            {"id": "b", "label": "soup", "text": "soup", "img": "images/b.jpg"}]
    for split in ("train", "test"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                             encoding="utf-8")
    data = C.load_it_splits("food101", root)
    assert data["train"][0].text == "apple\u2028pie\u2029\u0085" and data["train"][1].src.endswith("train.jsonl:2")
    return data


def jsonl_null_text(root):
    (root / "images").mkdir()
    write_frames(root / "images", ["a.jpg"], [10])
    for split in ("train", "test"):
        (root / f"{split}.jsonl").write_text(json.dumps({"id": "a", "label": "pie", "text": None,
                                                         "img": "images/a.jpg"}) + "\n")
    return C.load_it_splits("food101", root)


def text_not_utf8(root):
    (root / "images").mkdir()
    write_frames(root / "images", ["a.jpg", "b.jpg"], [10, 200])
    rows = [{"id": "a", "label": "pie", "text": "apple pie", "img": "images/a.jpg"},
            {"id": "b", "label": "soup", "text": "caf\u00e9 soup", "img": "images/b.jpg"}]
    body = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("latin-1")
    for split in ("train", "test"):
        (root / f"{split}.jsonl").write_bytes(body + b"\n")
    return C.load_it_splits("food101", root)


def features_npz_mismatched_lengths(root):
    rng = np.random.RandomState(0)
    np.savez(root / "features.npz", audio=rng.randn(10, 3), visual=rng.randn(9, 4), text=rng.randn(10, 5),
             label=np.arange(10) % 2, split=np.array(["train"] * 6 + ["test"] * 4))
    return C.load_features_npz(root / "features.npz")


def h5py_absent(root):
    for folder in ("A", "V", "L"):
        (root / folder).mkdir()
        (root / folder / "feat.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    sys.modules["h5py"] = None                     # undone by the test's monkeypatch
    return C.load_mmin(root)


CASES = [
    (missing_data_root, r"(?s)nowhere: data root not found.*accepted layouts", False),
    (missing_list_file, r"test\.csv: file not found", False),
    (empty_split, r"test\.csv: the list is empty; expected lines like '1088_IOM_NEU_XX,NEU'", False),
    (blank_lines_and_bom, None, False),
    (unknown_label, r"train\.csv:4: label 'HAPPY' is not a known class; expected one of", False),
    (cremad_label_typo_without_stat, r"train\.csv:4: label 'DISGUST' is not a known class; expected one of "
     r"\['NEU', 'HAP', 'SAD', 'DIS', 'ANG'\] \(from CREMA-D's emotions NEU, HAP, SAD, FEA, DIS, ANG; a stat\.csv", False),
    (duplicate_clip_id, r"train\.csv:5: clip '1001_DFA_HAP_XX' listed twice \(first at .*train\.csv:2\)", True),
    (missing_wav, r"train\.csv:3: audio of clip '1002_DFA_SAD_XX' missing: expected .*1002_DFA_SAD_XX\.wav", True),
    (zero_length_wav, r"1003_DFA_FEA_XX\.wav: WAV file holds no samples.*train\.csv:4", True),
    (non_wav_named_wav, r"1000_DFA_NEU_XX\.wav: not a RIFF/WAVE file .*expected a WAV file.*train\.csv:1", True),
    (truncated_jpg, r"frame_2\.jpg: unreadable image \(listed at .*train\.csv:2\).*expected a readable", False),
    (empty_frame_folder, r"train\.csv:5: frame folder .*1004_DFA_DIS_XX/ of clip .* is empty; expected \.jpg", True),
    (fbank_npy_wrong_width, r"1005_DFA_ANG_XX\.npy: fbank of shape \(50, 40\); expected \(frames, 128\).*train\.csv:6",
     True),
    (fbank_npy_transposed, r"1005_DFA_ANG_XX\.npy: fbank of shape \(128, 300\) looks transposed \(mel bins x frames\)"
     r"; expected \(frames, 128\).*train\.csv:6", True),
    (fbank_npy_empty, r"1005_DFA_ANG_XX\.npy: fbank of shape \(0, 128\) holds no frames.*train\.csv:6", True),
    (not_an_npy, r"1005_DFA_ANG_XX\.npy: unreadable \.npy: not a \.npy file \(its first bytes are b'garbag'", True),
    (mac_metadata_frames, None, False),
    (unreadable_first_frame_with_cache, r"frame_1\.jpg: unreadable image \(listed at .*train\.csv:1\)", False),
    (jsonl_text_with_unicode_line_separators, None, False),
    (jsonl_null_text, r"train\.jsonl:1: 'text' is None; expected a string", False),
    (text_not_utf8, r"train\.jsonl:2: not valid UTF-8 text", False),
    (features_npz_mismatched_lengths, r"features\.npz: array visual has shape \(9, 4\); expected \(10, width\)", False),
    (h5py_absent, r"feat\.h5: reading the MMIN layout's \.h5 files needs h5py.*pip install h5py", False),
]


@pytest.mark.parametrize("case, error, skippable", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input(case, error, skippable, av, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", sys.modules.get("h5py"))
    root = tmp_path if case.__name__ in ("text_not_utf8", "jsonl_text_with_unicode_line_separators", "jsonl_null_text",
                                         "features_npz_mismatched_lengths", "h5py_absent") else av
    if error is None:
        assert case(root)
        return
    with pytest.raises(C.DataError, match=error):
        case(root)
    if skippable:
        npy = case in (fbank_npy_wrong_width, fbank_npy_transposed, fbank_npy_empty, not_an_npy)
        data = load(root, skip_bad=True, num_mel_bins=128 if npy else None)
        assert data["skipped"] == 1 and len(data["train"]) == 5


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise C.DataError(f"/data/x/frame_{i}.jpg: unreadable image (listed at /data/x/train.csv:{i + 1})")


def test_a_data_error_in_a_loader_worker_is_one_line(capsys):
    """A DataError raised in a DataLoader worker comes back wrapped in the worker's traceback; the
    scripts print only its message."""
    def main():
        next(iter(torch.utils.data.DataLoader(_Broken(), num_workers=1)))
    with pytest.raises(SystemExit) as e:
        C.script_main(main)
    assert e.value.code == "error: /data/x/frame_0.jpg: unreadable image (listed at /data/x/train.csv:1)"


@pytest.mark.av_runs
def test_a_label_typo_stops_the_script_with_one_line_and_trains_nothing(av, tmp_path, capsys):
    (av / "stat.csv").unlink()
    set_line(av / "train.csv", 4, "1003_DFA_FEA_XX,DISGUST")
    argv = ["--dataset", "cremad", "--data_root", str(av), "--out_dir", str(tmp_path / "runs"), "--epochs", "1"]
    with pytest.raises(SystemExit) as e:
        C.script_main(lambda: train_av.main(argv))
    assert e.value.code.startswith(f"error: {av / 'train.csv'}:4: label 'DISGUST' is not a known class")
    assert "\n" not in e.value.code
    assert written(tmp_path / "runs") == []                            # no record, no checkpoint
    assert "epoch" not in capsys.readouterr().out


@pytest.mark.av_runs
def test_skip_bad_run_says_how_many(av, tmp_path, capsys):
    (av / "AudioWAV" / "1002_DFA_SAD_XX.wav").unlink()
    argv = ["--dataset", "cremad", "--data_root", str(av), "--out_dir", str(tmp_path / "runs"), "--no_cache",
            "--method", "concat", "--epochs", "1", "--batch_size", "4", "--image_size", "8", "--frames", "2",
            "--audio_len", "20", "--num_mel_bins", "16", "--val_ratio", "0", "--select_on", "last",
            "--num_workers", "0", "--device", "cpu"]
    with pytest.raises(C.DataError, match="train.csv:3: audio of clip '1002_DFA_SAD_XX' missing"):
        train_av.main(argv)
    [rec] = train_av.main(argv + ["--skip_bad"])
    assert "skipped 1 clips with missing files (--skip_bad)" in capsys.readouterr().out
    assert rec["test"]["multi"] >= 0


@pytest.mark.av_runs
def test_clips_with_too_few_frames_are_counted(av, tmp_path, capsys):
    folder = av / "Image-01-FPS" / "1003_DFA_FEA_XX"
    for f in C.list_frames(folder)[1:]:
        f.unlink()
    (folder / "._frame_1.jpg").write_bytes(b"AppleDouble")           # not a frame
    assert [c.n_frames for c in load(av)["train"]] == [10, 10, 10, 1, 10, 10]
    argv = ["--dataset", "cremad", "--data_root", str(av), "--out_dir", str(tmp_path / "runs"), "--no_cache",
            "--method", "concat", "--epochs", "1", "--batch_size", "4", "--image_size", "8", "--frames", "2",
            "--audio_len", "20", "--num_mel_bins", "16", "--val_ratio", "0", "--select_on", "last",
            "--num_workers", "0", "--device", "cpu"]
    train_av.main(argv)
    assert (f"note: 1 clips have fewer than --frames 2 frames (e.g. {folder}/ has 1); some of their frames are "
            "used twice") in capsys.readouterr().out


def test_own_prepared_videos_load_with_their_split_files_and_stat_csv(tmp_path):
    # as README says for one's own videos: train.csv/test.csv '<clip>,<label>' and stat.csv naming the labels
    rows = [(f"clip{i}", ["cat", "dog"][i % 2]) for i in range(6)]
    ogm_layout(tmp_path, rows[:4], rows[4:], stat=False)
    with pytest.raises(C.DataError, match=r"train\.csv:1: label 'cat' is not a known class.*a stat\.csv naming"):
        load(tmp_path)
    (tmp_path / "stat.csv").write_text("cat\ndog\n")
    data = load(tmp_path)
    assert data["classes"] == ["cat", "dog"] and [c.label for c in data["train"] + data["test"]] == [0, 1] * 3


def test_a_folder_the_user_cannot_write_is_one_line(tmp_path):
    """A PermissionError (a read-only --out_dir or --cache_dir: the tests run as root, so it is raised here) ends
    the script with one line naming the file, not a traceback."""
    def main():
        raise PermissionError(13, "Permission denied", str(tmp_path / "cache" / ".train-x.building"))
    with pytest.raises(SystemExit) as e:
        C.script_main(main)
    assert e.value.code == (f"error: {tmp_path / 'cache' / '.train-x.building'}: Permission denied: pass a folder you "
                            "can write to (--out_dir, --cache_dir) or change its permissions")
