"""`python common.py prepare` on short videos encoded here with PyAV, then train_av.py on the result; the raw
CREMA-D download through the same code; the AVE and VGGSound lists and their errors."""
import shutil
import sys
import wave

import numpy as np
import pytest
from PIL import Image

import av
import common as C
import train_av
from conftest import TINY

# name: (container codecs, size); every video is 3 s at 8 fps with a 440 Hz tone unless audio is None
VIDEOS = {"a.mp4": ("mpeg4", "aac", (32, 24)), "b.avi": ("mjpeg", "mp2", (40, 30)),
          "c.flv": ("flv", "aac", (32, 24)), "d.webm": ("libvpx", "libopus", (24, 32)),
          "silent.mp4": ("mpeg4", None, (32, 24)), "sub/a.mkv": ("mpeg4", "mp2", (32, 24))}


def encode(path, vcodec, acodec, size, seconds=3, fps=8):
    """A video of grey levels rising frame by frame and, with an acodec, a stereo 440 Hz tone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        v = c.add_stream(vcodec, rate=fps)
        v.width, v.height, v.pix_fmt = *size, "yuvj420p" if vcodec == "mjpeg" else "yuv420p"
        a = acodec and c.add_stream(acodec, rate=48000 if acodec == "libopus" else 22050, layout="stereo")
        for i in range(seconds * fps):
            image = np.full((size[1], size[0], 3), 20 + 9 * i, np.uint8)
            c.mux(v.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        c.mux(v.encode())
        if a:
            x = 0.3 * np.sin(2 * np.pi * 440 * np.arange(seconds * a.rate) / a.rate).astype(np.float32)
            n = a.frame_size or 1024
            for s in range(0, len(x), n):
                frame = av.AudioFrame.from_ndarray(np.stack([x[s:s + n]] * 2), format="fltp", layout="stereo")
                frame.rate, frame.pts = a.rate, s
                c.mux(a.encode(frame))
            c.mux(a.encode())


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    for name, spec in VIDEOS.items():
        encode(folder / name, *spec)
    (folder / "cut.mp4").write_bytes((folder / "a.mp4").read_bytes()[:4000])      # truncated: no index
    (folder / "notes.txt").write_text("not a video")
    return folder


def summary(capsys, *argv):
    C._cli(["prepare", *argv])
    return capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.av_runs
def test_prepare_writes_the_layout_lists_failures_resumes_and_trains(videos, tmp_path, capsys):
    out = tmp_path / "data"
    argv = ["--videos", str(videos), "--out", str(out), "--frame_size", "16"]
    assert summary(capsys, *argv, "--workers", "2") == (
        f"prepare: 4 done, 0 skipped, 3 failed (reasons in {out / 'prepare_errors.txt'})")
    for clip in ("a", "b", "c", "d"):
        with wave.open(str(out / "AudioWAV" / f"{clip}.wav")) as w:
            assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (1, 16000, 2)
            assert abs(w.getnframes() - 48000) < 1600               # 3 s (the codec's priming samples aside)
        frames = C.list_frames(out / "Image-01-FPS" / clip)
        assert [p.name for p in frames] == ["frame_00001.jpg", "frame_00002.jpg", "frame_00003.jpg"]
        assert min(Image.open(frames[0]).size) == 16                 # short side --frame_size
    assert Image.open(out / "Image-01-FPS" / "d" / "frame_00001.jpg").size == (16, 21)     # portrait kept
    samples, rate = C.read_wav(out / "AudioWAV" / "a.wav")
    spectrum = np.abs(np.fft.rfft(samples[4000:20000]))
    assert abs(spectrum.argmax() * rate / 16000 - 440) < 5          # the tone, resampled to 16 kHz
    grey = [np.asarray(Image.open(p)).mean() for p in C.list_frames(out / "Image-01-FPS" / "a")]
    assert np.allclose(grey, [20, 20 + 9 * 8, 20 + 9 * 16], atol=6)  # the frames at 0, 1 and 2 s
    errors = (out / "prepare_errors.txt").read_text().splitlines()
    assert errors == [f"{videos / 'cut.mp4'}: cannot be decoded: Invalid data found when processing input",
                      f"{videos / 'silent.mp4'}: no audio stream",
                      f"{videos / 'sub' / 'a.mkv'}: clip name 'a' taken by {videos / 'a.mp4'}; expected one "
                      "video per name"]
    assert not (out / "AudioWAV" / "silent.wav").exists() and not (out / "Image-01-FPS" / "silent").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]           # no temporary file left

    # a rerun skips the finished clips and rewrites none of their files
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix != ".txt"}
    assert summary(capsys, *argv, "--workers", "1").startswith("prepare: 0 done, 4 skipped, 3 failed")
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # what a rerun completes: a clip whose frames are missing, and an interrupted one's leftovers
    shutil.rmtree(out / "Image-01-FPS" / "b")
    (out / "Image-01-FPS" / ".b.part").mkdir()
    assert summary(capsys, *argv).startswith("prepare: 1 done, 3 skipped")
    assert len(C.list_frames(out / "Image-01-FPS" / "b")) == 3 and not (out / "Image-01-FPS" / ".b.part").exists()

    # train_av.py on the result, with the CREMA-D OGM-GE lists and the Kinetics-Sounds lists
    (out / "train.csv").write_text("a,NEU\nb,HAP\nc,NEU\n")
    (out / "test.csv").write_text("d,HAP\n")
    [rec] = train_av.main(["--dataset", "cremad", "--data_root", str(out), "--out_dir", str(tmp_path / "runs"),
                           *TINY, "--val_ratio", "0", "--select_on", "last", "--no_cache"])
    assert rec["dataset"] == "cremad" and set(rec["test"]) == {"audio", "video", "multi"}
    (out / "my_train.txt").write_text("a,1,0\nb,1,1\nc,1,0\n")
    (out / "my_test.txt").write_text("d,1,1\n")
    ks = C.load_av_splits("ks", out)
    assert [c.id for c in ks["train"]] == ["a", "b", "c"] and ks["test"][0].audio.endswith("AudioWAV/d.wav")


def test_raw_cremad_frames_come_from_videoflash_through_prepare(videos, tmp_path, capsys):
    clips = ["1001_DFA_ANG_XX", "1002_DFA_ANG_XX", "1003_DFA_NEU_XX", "1004_DFA_NEU_XX", "1005_DFA_NEU_XX"]
    (tmp_path / "AudioWAV").mkdir()
    (tmp_path / "VideoFlash").mkdir()
    for clip in clips:
        C.write_wav(tmp_path / "AudioWAV" / f"{clip}.wav", np.zeros(1600), 16000)
        shutil.copy(videos / "c.flv", tmp_path / "VideoFlash" / f"{clip}.flv")
    (tmp_path / "VideoFlash" / f"{clips[4]}.flv").write_bytes(b"FLV")                # broken
    wav_mtime = (tmp_path / "AudioWAV" / f"{clips[0]}.wav").stat().st_mtime_ns
    with pytest.raises(C.DataError, match=r"(?s)frame folder of clip '1005_DFA_NEU_XX' missing.*--skip_bad"):
        C.load_av_splits("cremad", tmp_path)
    assert "the reasons of the others in" in capsys.readouterr().err
    assert "1005_DFA_NEU_XX.flv: cannot be decoded" in (tmp_path / "prepare_errors.txt").read_text()
    data = C.load_av_splits("cremad", tmp_path, skip_bad=True)
    assert data["layout"] == "cremad_raw" and data["skipped"] == 1 and len(data["train"] + data["test"]) == 4
    assert len(C.list_frames(tmp_path / "Image-01-FPS" / clips[0])) == 3
    assert (tmp_path / "AudioWAV" / f"{clips[0]}.wav").stat().st_mtime_ns == wav_mtime    # the WAV is kept


def test_without_pyav_or_videos_the_error_says_so(videos, tmp_path, monkeypatch):
    with pytest.raises(C.DataError, match=f"{tmp_path}: no videos found; expected files ending in .mp4, .flv"):
        C.list_videos(tmp_path)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(C.DataError, match="needs PyAV.*pip install av"):
        C.prepare_videos(C.list_videos(videos), tmp_path)


def prepared(root, clips):
    """Clips as prepare leaves them: AudioWAV/<clip>.wav, Image-01-FPS/<clip>/frame_0000{1,2,3}.jpg."""
    for clip in clips:
        (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
        C.write_wav(root / "AudioWAV" / f"{clip}.wav", 0.1 * np.sin(np.arange(8000) / 3), 16000)
        (root / "Image-01-FPS" / clip).mkdir(parents=True)
        for k in (1, 2, 3):
            Image.new("RGB", (20, 16), (30 * k, 90, 40)).save(root / "Image-01-FPS" / clip / f"frame_0000{k}.jpg")


AVE = {"trainSet.txt": ["Church bell&RUhOCu3LNXM&good&0&10", "Dog&dog1&good&2&8", "Church bell&bell2&bad&0&10",
                        "Dog&twice&good&0&3", "Dog&twice&good&5&9", "Dog&dog3&good&1&10"],
       "valSet.txt": ["Dog&dog2&good&0&10", "Church bell&bell3&good&0&10"],
       "testSet.txt": ["Church bell&bell4&good&3&7", "Dog&dog4&good&0&10"]}


def ave_release(root):
    rows = [r for lines in AVE.values() for r in lines] + ["Banjo&banjo1&good&0&10"]
    (root / "Annotations.txt").write_text("\n".join(["Category&VideoID&Quality&StartTime&EndTime", *rows]) + "\n")
    for name, lines in AVE.items():
        (root / name).write_text("\n".join(lines) + "\n")
    prepared(root, {r.split("&")[1] for lines in AVE.values() for r in lines})


def test_ave_release_val_split_validates(tmp_path, capsys):
    ave_release(tmp_path)
    data = C.load_av_splits("ave", tmp_path)
    assert data["layout"] == "ave" and data["classes"] == ["Banjo", "Church bell", "Dog"]   # from Annotations.txt
    assert [c.id for c in data["train"]] == ["RUhOCu3LNXM", "dog1", "bell2", "dog3"]       # 'twice' left out
    assert "2 lines name a video listed more than once" in capsys.readouterr().err
    assert [(c.id, c.label) for c in data["dev"]] == [("dog2", 2), ("bell3", 1)]
    assert data["test"][0].src.endswith("testSet.txt:1") and data["train"][1].label == 2
    splits = C.train_val_test(data, 0.1, 0, "ave", "clips")
    assert splits["val"] == data["dev"] and splits["train"] == data["train"]               # valSet.txt validates
    assert "ave (ave): 3 classes, train 4, val 2 (dev split), test 2" in capsys.readouterr().out
    assert train_av.get_args(["--dataset", "ave"]).epochs == 100      # a data set of train_av.py, paper settings


@pytest.mark.parametrize("line, expected", [("Dog&dog2&good&0", "valSet.txt:2: 'Dog&dog2&good&0'; expected 'Categ"),
                                            ("Dog&dog2&good&zero&10", "valSet.txt:2: 'Dog&dog2&good&zero&10'")])
def test_ave_bad_line_names_file_and_line(tmp_path, line, expected):
    ave_release(tmp_path)
    (tmp_path / "valSet.txt").write_text(f"Dog&dog2&good&0&10\n{line}\n")
    with pytest.raises(C.DataError, match=expected):
        C.load_av_splits("ave", tmp_path)


VGGSOUND = ['---g-f_I2yQ,1,"people marching",test', 'abc_DEF-123,30,"dog barking, growling",train',
            "zz9,0,people marching,train", "yy8,250,dog barking, growling,train"]


def test_vggsound_list_counts_absent_clips_and_skips_them_with_skip_bad(tmp_path):
    rows = VGGSOUND[:3] + ['yy8,250,"dog barking, growling",train', 'xx7,12,"people marching",train']
    (tmp_path / "vggsound.csv").write_text("\n".join(rows) + "\n")
    prepared(tmp_path, ["---g-f_I2yQ_000001", "abc_DEF-123_000030", "zz9_000000", "yy8_000250"])   # xx7 absent
    with pytest.raises(C.DataError, match=r"vggsound\.csv:5: audio of clip 'xx7_000012' missing.*\n\(1 of the 4 "
                                          r"clips of the train split are unusable; --skip_bad leaves them out\)"):
        C.load_av_splits("vggsound", tmp_path)
    data = C.load_av_splits("vggsound", tmp_path, skip_bad=True)
    assert data["layout"] == "vggsound" and data["skipped"] == 1
    assert data["classes"] == ["dog barking, growling", "people marching"]
    assert [(c.id, c.label) for c in data["train"]] == [("abc_DEF-123_000030", 0), ("zz9_000000", 1),
                                                        ("yy8_000250", 0)]
    assert [c.id for c in data["test"]] == ["---g-f_I2yQ_000001"] and "dev" not in data


@pytest.mark.parametrize("line, expected", [
    (VGGSOUND[3], "vggsound.csv:4: 'yy8,250,dog barking, growling,train'; expected 'youtube_id,start_seconds"),
    ("yy8,1.5,dog,train", "vggsound.csv:4: 'yy8,1.5,dog,train'"), ("yy8,1,dog,val", "vggsound.csv:4:")])
def test_vggsound_bad_line_names_file_and_line(tmp_path, line, expected):
    (tmp_path / "vggsound.csv").write_text("\n".join(VGGSOUND[:3] + [line]) + "\n")
    with pytest.raises(C.DataError, match=expected):
        C.load_av_splits("vggsound", tmp_path)
