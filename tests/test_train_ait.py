"""train_ait.py through its own entry point: every method with three modalities, the record, the encoders, errors."""
import json

import pytest
import torch

import common as C
import train_ait
from conftest import command_line, own_log
from test_data_ait import cavmae_checkpoint
from test_encoders_it import hf_models  # noqa: F401  (a fixture)

TINY_AIT = ["--image_size", "16", "--patch_size", "8", "--max_len", "10", "--m3ae_dim", "16", "--m3ae_depth", "1",
            "--m3ae_heads", "2", "--cavmae_dim", "16", "--cavmae_depth", "1", "--cavmae_heads", "2",
            "--cavmae_patch", "4", "--audio_len", "16", "--num_mel_bins", "8", "--batch_size", "16", "--epochs", "1"]


@pytest.fixture(scope="module")
def ait_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_ait")
    C.make_toy_ait(root, seed=0, n_train=36, n_dev=12, n_test=12, frames=16, mel_bins=8, recipe=C.ToyAIT(px=16, faces=2))
    return root


def run(root, out, *extra):
    [record] = train_ait.main(["--data_root", str(root), "--out_dir", str(out), *TINY_AIT, *extra])
    return record


@pytest.mark.parametrize("method", train_ait.METHODS)
def test_every_method_trains_one_toy_epoch_and_writes_record(method, ait_root, tmp_path):
    rec = run(ait_root, tmp_path, "--method", method)
    run_dir = tmp_path / "toy_ait" / method / "seed0"
    on_disk = json.loads((run_dir / "record.json").read_text())
    assert tuple(on_disk) == C.RECORD_KEYS
    assert on_disk == json.loads(json.dumps(rec))
    assert on_disk["script"] == "train_ait.py" and on_disk["dataset"] == "toy" and on_disk["method"] == method
    assert on_disk["modalities"] == ["audio", "image", "text"] and on_disk["select_on"] == "val"
    assert set(on_disk["args"]) == set(vars(train_ait.get_args([]))) | {"revision"}     # + the method's revision
    assert on_disk["args"]["condition"] == "audio" and on_disk["args"]["audio_encoder"] == "cavmae"
    own = own_log(method)                          # a method's own log and the encoders' gradient norms
    assert [set(e) for e in on_disk["epochs"]] == [{"epoch", "lr", "train_loss", "val"} | own]
    assert set(on_disk["epochs"][0]["val"]) == set(on_disk["test"]) == {"audio", "image", "text", "multi"}
    assert all(0 <= v <= 100 for v in on_disk["test"].values())
    assert on_disk["best_epoch"] == 1 and on_disk["wall_time_s"] > 0 and on_disk["version"]
    ckpt = torch.load(run_dir / "best.pt", weights_only=False)
    sd = ckpt["state_dict"]
    assert ckpt["epoch"] == 0 and ckpt["method"] == method
    assert sd["encoders.0.patch_embed.weight"].shape == (16, 1, 4, 4)            # CAV-MAE audio, 4 x 4 patches
    assert sd["encoders.0.pos_embed"].shape == (1, 2 * 4, 16)                    # 8 bins x 16 frames
    assert sd["encoders.1.image_embedding.weight"].shape == (16, 8 * 8 * 3)
    assert sd["encoders.2.text_embedding.weight"].shape[1] == 16
    if method == "mla":
        assert not torch.equal(sd["P"], torch.eye(16)) and sd["head.weight"].shape == (4, 16)
    if method == "qmf":
        assert sd["history"].shape == (3, 36) and (sd["history"].sum(1) > 0).all()
    if method in ("concat", "ogm", "ogm_ge"):
        assert sd["head.weight"].shape == (4, 3 * 16)
    if method in ("film", "bigated"):
        assert sd["head.weight"].shape == (4, 2 * 16)                           # audio conditions the two others


def test_dev_split_validates_and_same_seed_same_record(ait_root, tmp_path, capsys):
    strip = lambda r: {k: v for k, v in r.items() if k not in ("wall_time_s", "args")}
    a = run(ait_root, tmp_path / "a", "--method", "mla", "--epochs", "2")
    out = capsys.readouterr()
    assert "toy (split lists): 4 classes, train 36, val 12 (dev split), test 12" in out.out
    assert "no --cavmae_ckpt: the CAV-MAE audio encoder starts from RANDOM weights" in out.err
    b = run(ait_root, tmp_path / "b", "--method", "mla", "--epochs", "2")
    assert strip(a) == strip(b)


def test_resnet_audio_is_projected_and_fixed_fusion_weights(ait_root, tmp_path):
    rec = run(ait_root, tmp_path, "--method", "mla", "--audio_encoder", "resnet18", "--fusion", "fixed")
    sd = torch.load(tmp_path / "toy_ait" / "mla" / "seed0" / "best.pt", weights_only=False)["state_dict"]
    assert sd["encoders.0.proj.weight"].shape == (16, 512)                      # ResNet-18's 512 -> 16
    assert "encoders.0.encoder.net.conv1.weight" in sd
    assert rec["args"]["audio_encoder"] == "resnet18" and rec["args"]["fusion"] == "fixed"
    with pytest.raises(SystemExit):
        train_ait.get_args(["--audio_encoder", "resnet18", "--cavmae_ckpt", "x.pth"])
    with pytest.raises(SystemExit):
        train_ait.get_args(["--audio_len", "18", "--cavmae_patch", "4"])


def test_hf_image_and_text_with_the_audio_projected_to_their_width(ait_root, tmp_path, hf_models):
    rec = run(ait_root, tmp_path, "--method", "mla", "--encoder", "hf", "--image_model", str(hf_models / "vit"),
              "--text_model", str(hf_models / "bert"), "--tokenizer", str(ait_root / "tokenizer"))
    sd = torch.load(tmp_path / "toy_ait" / "mla" / "seed0" / "best.pt", weights_only=False)["state_dict"]
    assert sd["encoders.0.proj.weight"].shape == (32, 16)                       # CAV-MAE 16 -> ViT's 32
    assert sd["encoders.2.proj.weight"].shape == (32, 24)                       # BERT 24 -> 32
    assert sd["head.weight"].shape == (4, 32) and set(rec["test"]) == {"audio", "image", "text", "multi"}


def test_cavmae_checkpoint_through_the_script(ait_root, tmp_path, capsys):
    torch.manual_seed(5)
    enc = C.CAVMAEAudioEncoder(16, 1, 2, 4, 4, 16, 8)
    torch.save(cavmae_checkpoint(enc, audio_blocks=0), tmp_path / "cav.pth")      # 0 audio + 1 shared block
    run(ait_root, tmp_path, "--method", "sum", "--cavmae_ckpt", str(tmp_path / "cav.pth"), "--lr", "0",
        "--weight_decay", "0")
    out = capsys.readouterr()
    assert "CAV-MAE audio encoder <-" in out.out and "missing keys: none; unexpected keys: none" in out.out
    assert "CAV-MAE audio encoder starts from RANDOM" not in out.err
    sd = torch.load(tmp_path / "toy_ait" / "sum" / "seed0" / "best.pt", weights_only=False)["state_dict"]
    assert torch.equal(sd["encoders.0.encoder.blocks.0.layer_norm1.weight"], enc.encoder.blocks[0].layer_norm1.weight)
    assert torch.equal(sd["encoders.0.patch_embed.weight"], enc.patch_embed.weight)


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(C.DataError, match="(?s)data root not found.*accepted layout"):
        train_ait.main(["--dataset", "iemocap", "--data_root", str(tmp_path / "absent")])
    code, err = command_line("train_ait.py", "--dataset", "iemocap", cwd=tmp_path)
    assert code != 0
    assert err.startswith("error: data/iemocap: data root not found") and "Traceback" not in err
