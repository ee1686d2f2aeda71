"""`python common.py prepare` on short videos encoded here with PyAV, then train_av.py on the result; the raw
CREMA-D download through the same code."""
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
    with pytest.raises(C.DataError, match=r"frame folder of clip '1005_DFA_NEU_XX' missing"):
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
