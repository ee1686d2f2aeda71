"""train_clip.py (Table 7): a tiny CLIP loaded by path, the feature cache, both heads, --finetune, errors."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import common as C
import train_clip
from conftest import command_line, written
from test_data_it import ids, mla_layout

TINY_CLIP = ["--batch_size", "16", "--epochs", "1", "--extract_batch_size", "8"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny toy image-text set and a tiny CLIP (model, image processor, the toy's tokenizer) written by
    save_pretrained; returns (data root, CLIP folder, the in-memory bundle)."""
    root = tmp_path_factory.mktemp("clip")
    C.make_toy_it(root / "data", seed=0, n_train=36, n_dev=12, n_test=12, recipe=C.ToyIT(px=16))
    clip = C.toy_clip(C.load_tokenizer(root / "data" / "tokenizer"), image_size=16, patch_size=8, sizes=(16, 1, 2),
                      max_len=12, seed=3)
    for part in (clip.model, clip.processor, clip.tokenizer):
        part.save_pretrained(root / "clip")
    return root / "data", root / "clip", clip


@pytest.fixture
def tower_calls(monkeypatch):
    """Counts the images and texts that go through a CLIP tower."""
    calls = {"image": 0, "text": 0}
    real = C.CLIPTower.forward

    def counted(self, x):
        calls[self.modality] += len(x)
        return real(self, x)
    monkeypatch.setattr(C.CLIPTower, "forward", counted)
    return calls


def test_clip_loaded_by_path_is_the_saved_one(saved):
    root, folder, clip = saved
    loaded = C.load_clip(folder)
    assert loaded.fingerprint() == clip.fingerprint()             # same config and weights, another place
    assert loaded.processor.crop_size["height"] == 16 and loaded.max_len == 12
    assert loaded.tokenizer.get_vocab() == clip.tokenizer.get_vocab()
    pairs = C.load_it_splits("toy", root)["test"][:4]
    pixels, text, _, _ = next(iter(torch.utils.data.DataLoader(C.CLIPInputs(pairs, loaded), batch_size=4)))
    assert pixels.shape == (4, 3, 16, 16) and text.shape == (4, 2, 12)
    assert (text[:, 0, 0] == loaded.tokenizer.cls_token_id).all() and (text[:, 1, 0] == 0).all()
    with torch.no_grad():
        image, words = loaded.tower("image")(pixels), loaded.tower("text")(text)
        keep = (text[:, 1] == 0).long()
        assert torch.allclose(image, clip.model.get_image_features(pixel_values=pixels).pooler_output, atol=1e-6)
        assert torch.allclose(words, clip.model.get_text_features(input_ids=text[:, 0], attention_mask=keep).pooler_output,
                              atol=1e-6)
        junk = text.clone()
        junk[:, 0][text[:, 1] == 1] = 7                           # other ids under the padding
        assert torch.allclose(loaded.tower("text")(junk), words, atol=1e-6)
    assert loaded.tower("image").dim == 16 and C.load_clip(folder, feature="pooled").tower("text").dim == 16
    with pytest.raises(C.DataError, match=r"--max_len 40 is longer than the model's 12 text positions"):
        C.load_clip(folder, max_len=40)


def test_features_cached_once_reused_and_rebuilt_when_inputs_change(saved, tmp_path, tower_calls):
    root, folder, clip = saved
    pairs = C.load_it_splits("toy", root)["train"]
    cache, rng = tmp_path / "cache", torch.get_rng_state()
    image, text = C.clip_features(C.load_clip(folder), pairs, "train", cache, batch_size=8)
    assert tower_calls == {"image": 36, "text": 36} and image.shape == (36, 16) and text.shape == (36, 16)
    assert torch.equal(torch.get_rng_state(), rng)      # extracting draws nothing: a run then trains as one that reads
    files = sorted(p.name for p in (cache / "clip").iterdir())
    assert len(files) == 2 and [f.split("-")[:2] for f in files] == [["train", "image"], ["train", "text"]]

    for again in (C.load_clip(folder), clip):                      # a second run; the bundle built in memory
        again = C.clip_features(again, pairs, "train", cache, batch_size=8)
        assert tower_calls == {"image": 36, "text": 36}, "the cached features must not touch the towers"
        assert torch.equal(again[0], image) and torch.equal(again[1], text)
    meta = json.loads(torch.load(cache / "clip" / files[0], weights_only=True)["meta"])
    assert meta["modality"] == "image" and meta["ids"] == [p.id for p in pairs]

    shorter = C.clip_features(C.load_clip(folder, max_len=6), pairs, "train", cache, batch_size=8)
    assert tower_calls == {"image": 36, "text": 72}                 # text preprocessing changed: text only
    assert torch.equal(shorter[0], image) and not torch.allclose(shorter[1], text)
    bigger = C.clip_features(C.load_clip(folder, image_size=24), pairs, "train", cache, batch_size=8)
    assert tower_calls == {"image": 72, "text": 72} and not torch.allclose(bigger[0], image)
    st = os.stat(pairs[5].image)                                    # an image file changed
    os.utime(pairs[5].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    C.clip_features(C.load_clip(folder), pairs, "train", cache, batch_size=8)
    assert tower_calls == {"image": 108, "text": 72}
    assert len(list((cache / "clip").iterdir())) == 5 and not list((cache / "clip").glob(".*"))   # no temp files


@pytest.mark.parametrize("fault", ["truncated", "overwritten", "no checksum"])
def test_a_damaged_feature_cache_is_extracted_again_with_one_line(fault, saved, tmp_path, tower_calls, capsys):
    """Each fault of a cached feature file: one line naming it and why, the features extracted again (equal
    to the first ones) and written over it; the next run reads them silently. An overwrite of the tensor's
    bytes loads without complaint in torch.load: only the checksum tells."""
    root, folder, clip = saved
    pairs, cache = C.load_it_splits("toy", root)["train"], tmp_path / "cache"
    image, text = C.clip_features(clip, pairs, "train", cache, batch_size=8)
    [entry] = (cache / "clip").glob("train-text-*.pt")
    raw = entry.read_bytes()
    if fault == "truncated":
        entry.write_bytes(raw[:len(raw) // 2])
        why = "unreadable (RuntimeError: PytorchStreamReader failed"     # then torch's words
    elif fault == "overwritten":                                    # the whole (36, 16) float32 tensor
        at = raw.index(text.numpy().tobytes())
        entry.write_bytes(raw[:at] + np.random.RandomState(0).bytes(36 * 16 * 4) + raw[at + 36 * 16 * 4:])
        assert not torch.equal(torch.load(entry, weights_only=True)["features"], text)
        why = "its features differ from those it was written with (overwritten or damaged)"
    else:                                                           # as written before the checksum existed
        torch.save({"features": text, "meta": json.dumps({"ids": [p.id for p in pairs]})}, entry)
        why = "holds no checksum (written by an earlier version)"
    capsys.readouterr()
    again = C.clip_features(clip, pairs, "train", cache, batch_size=8)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {entry}: {why}") and err.endswith("; building it again\n")
    assert err.count("\n") == 1
    assert tower_calls == {"image": 36, "text": 72}                 # the text features only, once more
    assert torch.equal(again[0], image) and torch.equal(again[1], text)
    C.clip_features(clip, pairs, "train", cache, batch_size=8)
    assert capsys.readouterr().err == "" and tower_calls["text"] == 72


def test_a_damaged_feature_cache_in_a_read_only_folder_is_an_error(saved, tmp_path, monkeypatch):
    root, folder, _ = saved
    cache, out = tmp_path / "cache", tmp_path / "runs"
    argv = ["--data_root", str(root), "--clip_model", str(folder), "--cache_dir", str(cache), "--out_dir", str(out),
            "--method", "clip", *TINY_CLIP]
    train_clip.main(argv)
    [entry] = (cache / "clip").glob("test-image-*.pt")
    entry.write_bytes(entry.read_bytes()[:100])
    monkeypatch.setattr(C.os, "access", lambda path, mode: Path(path) != cache / "clip")
    with pytest.raises(SystemExit) as e:
        C.script_main(lambda: train_clip.main([*argv, "--out_dir", str(tmp_path / "again")]))
    assert e.value.code.startswith(f"error: {entry}: unreadable (") and "\n" not in e.value.code
    assert e.value.code.endswith(f"; the cache cannot be rebuilt in read-only {cache / 'clip'}: give --cache_dir "
                                 "a writable folder")
    assert written(tmp_path / "again") == []


def test_both_methods_train_one_toy_epoch_on_cached_features(saved, tmp_path, tower_calls, capsys):
    root, folder, _ = saved
    out = tmp_path / "runs"
    records = train_clip.main(["--data_root", str(root), "--clip_model", str(folder), "--cache_dir",
                               str(tmp_path / "cache"), "--out_dir", str(out), "--method", "clip,mla", *TINY_CLIP])
    assert tower_calls == {"image": 60, "text": 60}, "the second run (mla) must read the first run's features"
    assert capsys.readouterr().out.count("(cached)") == 6          # 3 splits x 2 modalities in the second run
    assert [r["method"] for r in records] == ["clip", "mla"]
    for rec in records:
        run_dir = out / "toy_clip" / rec["method"] / "seed0"
        on_disk = json.loads((run_dir / "record.json").read_text())
        assert tuple(on_disk) == C.RECORD_KEYS and on_disk == json.loads(json.dumps(rec))
        assert on_disk["script"] == "train_clip.py" and on_disk["dataset"] == "toy"
        assert on_disk["modalities"] == ["image", "text"] and on_disk["select_on"] == "val"
        assert set(on_disk["args"]) == set(vars(train_clip.get_args([]))) | {"revision"}     # + the method's revision
        assert set(on_disk["epochs"][0]["val"]) == set(on_disk["test"]) == {"image", "text", "multi"}
        assert all(0 <= v <= 100 for v in on_disk["test"].values()) and on_disk["best_epoch"] == 1
    heads = {r["method"]: torch.load(out / "toy_clip" / r["method"] / "seed0" / "best.pt", weights_only=False)
             for r in records}
    assert heads["clip"]["state_dict"]["head.weight"].shape == (6, 32)           # concat of two 16-d features
    sd = heads["mla"]["state_dict"]
    assert sd["head.weight"].shape == (6, 16) and not torch.equal(sd["P"], torch.eye(16))
    assert not any(k.startswith("encoders.") for k in sd)           # the cached features have no encoder weights
    table = C.report(out, paper=True)
    assert "| `clip` |" in table and "93.07 ± 0.08" in table and "93.47 ± 0.04" in table    # Table 7 beside


def test_pooled_features_of_different_widths_are_projected(saved, tmp_path):
    root, _, clip = saved
    from transformers import CLIPConfig, CLIPModel
    sizes = dict(intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    tok = clip.tokenizer
    model = CLIPModel(CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=12, max_position_embeddings=12,
                                                  pad_token_id=0, bos_token_id=tok.cls_token_id,
                                                  eos_token_id=tok.sep_token_id, **sizes),
                                 vision_config=dict(hidden_size=20, image_size=16, patch_size=8, **sizes),
                                 projection_dim=8))
    model.save_pretrained(tmp_path / "clip")
    clip.processor.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    [rec] = train_clip.main(["--data_root", str(root), "--clip_model", str(tmp_path / "clip"), "--clip_feature",
                             "pooled", "--cache_dir", str(tmp_path / "cache"), "--out_dir", str(tmp_path / "runs"),
                             "--method", "mla", *TINY_CLIP])
    sd = torch.load(tmp_path / "runs" / "toy_clip" / "mla" / "seed0" / "best.pt", weights_only=False)["state_dict"]
    assert "encoders.0.proj.weight" not in sd and sd["encoders.1.proj.weight"].shape == (20, 12)   # text 12 -> 20
    assert sd["head.weight"].shape == (6, 20) and rec["args"]["clip_feature"] == "pooled"


def test_finetune_trains_the_towers(saved, tmp_path):
    root, folder, clip = saved
    train_clip.main(["--data_root", str(root), "--clip_model", str(folder), "--finetune", "--cache_dir",
                     str(tmp_path / "cache"), "--out_dir", str(tmp_path / "runs"), "--method", "mla", *TINY_CLIP])
    sd = torch.load(tmp_path / "runs" / "toy_clip" / "mla" / "seed0" / "best.pt", weights_only=False)["state_dict"]
    before = clip.model.state_dict()
    for name, theirs in (("encoders.0.tower.model.embeddings.patch_embedding.weight",
                          "vision_model.embeddings.patch_embedding.weight"),
                         ("encoders.1.tower.model.embeddings.token_embedding.weight",
                          "text_model.embeddings.token_embedding.weight"),
                         ("encoders.1.tower.projection.weight", "text_projection.weight")):
        assert sd[name].shape == before[theirs].shape and not torch.equal(sd[name], before[theirs])
    assert not (tmp_path / "cache").exists()                       # no features were cached


def test_toy_default_builds_and_pretrains_its_clip_in_memory(tmp_path, capsys):
    [rec] = train_clip.main(["--out_dir", str(tmp_path), "--toy_train", "24", "--toy_dev", "12", "--toy_test", "12",
                             "--toy_pretrain_epochs", "2", "--toy_width", "16", "--toy_layers", "1", "--image_size",
                             "16", *TINY_CLIP])
    assert rec["method"] == "mla" and rec["dataset"] == "toy" and rec["args"]["clip_model"] is None
    assert (tmp_path / "toy_clip" / "mla" / "seed0" / "record.json").is_file()
    out = capsys.readouterr().out
    assert "toy (jsonl): 6 classes, train 24, val 12 (dev split), test 12" in out
    assert "contrastive pretraining on 24 pairs, epoch 2/2" in out and "extracting with toy-clip" in out


def test_toy_clip_pretraining_aligns_the_pairs(saved):
    root, _, _ = saved
    pairs = C.load_it_splits("toy", root)["train"]
    clip = C.toy_clip(C.load_tokenizer(root / "tokenizer"), image_size=16, patch_size=8, sizes=(16, 1, 2),
                      max_len=12, seed=3)
    batch = next(iter(torch.utils.data.DataLoader(C.CLIPInputs(pairs, clip), batch_size=36)))

    def loss():
        with torch.no_grad():
            return clip.model(input_ids=batch[1][:, 0], attention_mask=(batch[1][:, 1] == 0).long(),
                              pixel_values=batch[0], return_loss=True).loss.item()
    before, print_before = loss(), clip.fingerprint()
    C.pretrain_toy_clip(clip, pairs, epochs=5, batch_size=12, lr=5e-3, seed=0)
    assert loss() < before - 0.1 and clip.fingerprint() != print_before


def test_a_hub_clip_model_not_cached_fails_at_once_offline(monkeypatch):
    """The local HF cache first, the hub only when it can be reached: offline, one line at once (no packet leaves
    the machine: the reachability check's connection fails as without a network)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(C.socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    with pytest.raises(C.DataError) as e:
        C.load_clip("mla-tests-no-such-org/no-such-clip")
    assert str(e.value) == ("mla-tests-no-such-org/no-such-clip: no such CLIP model folder, not in the Hugging Face "
                            "cache, and the hub cannot be reached; pass --clip_model a local folder written by "
                            "save_pretrained (or a hub name such as openai/clip-vit-base-patch32)")


def test_bad_inputs_are_clear_errors(saved, tmp_path):
    root, folder, _ = saved
    with pytest.raises(SystemExit):
        train_clip.get_args(["--dataset", "food101", "--data_root", str(root)])      # --clip_model is needed
    with pytest.raises(C.DataError, match=r"absent: no such CLIP model folder; pass --clip_model a local folder"):
        train_clip.main(["--data_root", str(root), "--clip_model", str(tmp_path / "absent"), "--out_dir", str(tmp_path)])
    mla_layout(tmp_path / "mla", {"train": [("a", "soup", ids("hot", "soup"), (200, 0, 0))],
                                  "test": [("b", "soup", ids("soup"), (200, 0, 0))]})
    with pytest.raises(C.DataError, match=r"a_token\.npy: pre-tokenised text \(pair at .*my_train_food\.txt:1\); "
                                          "CLIP's text tower needs the raw text"):
        train_clip.main(["--dataset", "food101", "--data_root", str(tmp_path / "mla"), "--clip_model", str(folder),
                         "--val_ratio", "0", "--select_on", "last", "--out_dir", str(tmp_path), *TINY_CLIP])
    with pytest.raises(SystemExit):
        train_clip.get_args(["--image_size", "20", "--toy_patch", "8"])
    code, err = command_line("train_clip.py", "--dataset", "food101", "--clip_model", "x", cwd=tmp_path)
    assert code != 0 and err.startswith("error: data/food101: data root not found")
    assert "Traceback" not in err
