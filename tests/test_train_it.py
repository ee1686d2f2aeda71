"""train_it.py through its own entry point: every method, the record, the encoders' flags, errors."""
import json

import pytest
import torch

import common as C
import train_it
from conftest import command_line, own_log
from test_encoders_it import hf_models  # noqa: F401  (a fixture)

TINY_IT = ["--image_size", "16", "--patch_size", "8", "--max_len", "10", "--m3ae_dim", "16", "--m3ae_depth", "1",
           "--m3ae_heads", "2", "--batch_size", "16", "--epochs", "1"]


@pytest.fixture(scope="module")
def it_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_it")
    C.make_toy_it(root, seed=0, n_train=36, n_dev=12, n_test=12, recipe=C.ToyIT(px=16))
    return root


def run(root, out, *extra):
    [record] = train_it.main(["--data_root", str(root), "--out_dir", str(out), *TINY_IT, *extra])
    return record


@pytest.mark.parametrize("method", train_it.METHODS)
def test_every_method_trains_one_toy_epoch_and_writes_record(method, it_root, tmp_path):
    rec = run(it_root, tmp_path, "--method", method)
    run_dir = tmp_path / "toy_it" / method / "seed0"
    on_disk = json.loads((run_dir / "record.json").read_text())
    assert tuple(on_disk) == C.RECORD_KEYS
    assert on_disk == json.loads(json.dumps(rec))
    assert on_disk["script"] == "train_it.py" and on_disk["dataset"] == "toy" and on_disk["method"] == method
    assert on_disk["modalities"] == ["image", "text"] and on_disk["select_on"] == "val"
    assert set(on_disk["args"]) == set(vars(train_it.get_args([]))) | {"revision"}     # + the method's revision
    assert on_disk["args"]["condition"] == "text" and on_disk["args"]["encoder"] == "m3ae"
    own = own_log(method)                          # a method's own log and the encoders' gradient norms
    assert [set(e) for e in on_disk["epochs"]] == [{"epoch", "lr", "train_loss", "val"} | own]
    assert set(on_disk["epochs"][0]["val"]) == {"image", "text", "multi"}
    assert set(on_disk["test"]) == {"image", "text", "multi"}
    assert all(0 <= v <= 100 for v in on_disk["test"].values())
    assert on_disk["best_epoch"] == 1 and on_disk["wall_time_s"] > 0 and on_disk["version"]
    ckpt = torch.load(run_dir / "best.pt", weights_only=False)
    sd = ckpt["state_dict"]
    assert ckpt["epoch"] == 0 and ckpt["method"] == method
    assert sd["encoders.0.image_embedding.weight"].shape == (16, 8 * 8 * 3)
    assert sd["encoders.1.text_embedding.weight"].shape[1] == 16
    if method == "mla":
        assert not torch.equal(sd["P"], torch.eye(16))
    if method == "qmf":
        assert sd["history"].abs().sum() > 0


def test_condition_and_toy_dev_split(it_root, tmp_path, capsys):
    args = train_it.get_args(["--method", "film"])
    film = C.build_method("film", [C.M3AEEncoder("image", 16, 1, 2, 2, 8, 10), C.M3AEEncoder("text", 16, 1, 2, 2, 8, 10)],
                          6, ["image", "text"], 10, **C.method_options("film", args))
    assert film.condition == 1                                     # the text
    with C.torch_threads(2):
        rec = run(it_root, tmp_path, "--method", "sum", "--cpu_threads", "1")
        assert torch.get_num_threads() == 2                        # the toy's single thread is given back
    out = capsys.readouterr()
    assert "toy (jsonl): 6 classes, train 36, val 12 (dev split), test 12" in out.out
    assert "no --m3ae_ckpt: the M3AE encoders start from RANDOM weights" in out.err
    rec = run(it_root, tmp_path / "n", "--method", "sum", "--val_ratio", "0", "--select_on", "last")
    assert rec["epochs"][0]["val"] is None and "train 36, val 0, test 12" in capsys.readouterr().out


def test_m3ae_checkpoint_through_the_script(it_root, tmp_path, capsys):
    vocab = len((it_root / "tokenizer" / "vocab.txt").read_text().split())
    torch.manual_seed(5)
    image = C.M3AEEncoder("image", 16, 1, 2, 4, 8, vocab)
    text = C.M3AEEncoder("text", 16, 1, 2, 4, 8, vocab)
    text.encoder.load_state_dict(image.encoder.state_dict())
    text.cls_token.data.copy_(image.cls_token.data)
    torch.save({**image.state_dict(), **text.state_dict()}, tmp_path / "m3ae.pth")
    run(it_root, tmp_path, "--method", "concat", "--m3ae_ckpt", str(tmp_path / "m3ae.pth"), "--lr", "0",
        "--weight_decay", "0")
    out = capsys.readouterr()
    assert out.out.count("tensors loaded; missing keys: none; unexpected keys: none") == 2
    assert "RANDOM" not in out.err
    sd = torch.load(tmp_path / "toy_it" / "concat" / "seed0" / "best.pt", weights_only=False)["state_dict"]
    assert torch.equal(sd["encoders.0.encoder.blocks.0.attention.qkv_linear.weight"],
                       image.encoder.blocks[0].attention.qkv_linear.weight)     # lr 0: still the loaded weights
    assert torch.equal(sd["encoders.1.text_embedding.weight"], text.text_embedding.weight)

    torch.save(image.state_dict(), tmp_path / "image_only.pth")     # the text encoder's input layers are absent
    with pytest.raises(C.DataError, match=r"image_only\.pth: 2 of the text encoder's 17 tensors are not in the M3AE "
                                          r"checkpoint \(encoder_text_type_embedding, text_embedding\.weight\)"):
        run(it_root, tmp_path / "strict", "--method", "concat", "--m3ae_ckpt", str(tmp_path / "image_only.pth"))
    run(it_root, tmp_path / "partial", "--method", "concat", "--m3ae_ckpt", str(tmp_path / "image_only.pth"),
        "--partial_ckpt")
    assert "missing keys: encoder_text_type_embedding, text_embedding.weight" in capsys.readouterr().out


def test_hf_encoders_by_local_path(it_root, tmp_path, hf_models):
    rec = run(it_root, tmp_path, "--method", "mla", "--encoder", "hf", "--image_model", str(hf_models / "vit"),
              "--text_model", str(hf_models / "bert"), "--tokenizer", str(it_root / "tokenizer"))
    assert rec["args"]["encoder"] == "hf" and set(rec["test"]) == {"image", "text", "multi"}
    sd = torch.load(tmp_path / "toy_it" / "mla" / "seed0" / "best.pt", weights_only=False)["state_dict"]
    assert sd["encoders.1.proj.weight"].shape == (32, 24)           # BERT 24 -> ViT's 32
    assert sd["head.weight"].shape == (6, 32) and not torch.equal(sd["P"], torch.eye(32))


def test_same_seed_gives_identical_records(it_root, tmp_path):
    strip = lambda r: {k: v for k, v in r.items() if k not in ("wall_time_s", "args")}
    a = run(it_root, tmp_path / "a", "--method", "ogm_ge", "--epochs", "2")
    b = run(it_root, tmp_path / "b", "--method", "ogm_ge", "--epochs", "2")
    assert strip(a) == strip(b)


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(C.DataError, match="(?s)data root not found.*accepted layouts"):
        train_it.main(["--dataset", "food101", "--data_root", str(tmp_path / "absent")])
    code, err = command_line("train_it.py", "--dataset", "mvsa", cwd=tmp_path)
    assert code != 0
    assert err.startswith("error: data/mvsa: data root not found") and "Traceback" not in err
    with pytest.raises(SystemExit):
        train_it.get_args(["--image_size", "20", "--patch_size", "8"])


def test_mla_epochs_record_the_trace_of_P(it_root, tmp_path, capsys):
    """Each MLA epoch entry carries hgm_p_trace = trace(P)/dim (it falls as P absorbs directions, within
    (0, 1]); None with --no_hgm; other methods' entries have no such key."""
    rec = run(it_root, tmp_path / "hgm", "--method", "mla", "--epochs", "3")
    traces = [e["hgm_p_trace"] for e in rec["epochs"]]
    assert all(0 < t <= 1 for t in traces) and traces == sorted(traces, reverse=True) and traces[0] > traces[-1]
    P = torch.load(tmp_path / "hgm" / "toy_it" / "mla" / "seed0" / "best.pt", weights_only=False)["state_dict"]["P"]
    assert abs(traces[rec["best_epoch"] - 1] - float(torch.trace(P)) / P.shape[0]) < 1e-5
    assert f"P trace {traces[-1]:.3f}" in capsys.readouterr().out
    off = run(it_root, tmp_path / "off", "--method", "mla", "--no_hgm", "--epochs", "2")
    assert [e["hgm_p_trace"] for e in off["epochs"]] == [None, None]
    assert all("hgm_p_trace" not in e for e in run(it_root, tmp_path / "sum", "--method", "sum")["epochs"])
