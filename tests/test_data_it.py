"""Image-text loaders on tiny fixtures written here in both accepted layouts, the tokenizer, bad inputs."""
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common as C

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["apple", "pie", "creme", "brulee", "tres", "bon", "soup", "cafe", "hot", "with", "milk"]
VOCAB = SPECIALS + WORDS


@pytest.fixture
def tokenizer(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return C.load_tokenizer(folder)


def ids(*words):
    return [VOCAB.index(w) for w in words]


def write_image(path, rgb, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path, quality=100)


def jsonl_layout(root, splits, bom=False):
    """MMBT/QMF layout: {split}.jsonl lines {"id","label","text","img"}, images/<split>/<id>.jpg."""
    for split, rows in splits.items():
        lines = []
        for pid, label, text, rgb in rows:
            write_image(root / "images" / split / f"{pid}.jpg", rgb)
            lines.append(json.dumps({"id": pid, "label": label, "text": text, "img": f"images/{split}/{pid}.jpg"},
                                    ensure_ascii=False))
        (root / f"{split}.jsonl").write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return root


def food_splits():
    return {"train": [("t0", "soup", "Hot soup", (200, 0, 0)), ("t1", "apple_pie", "Crème Brûlée — très bon ☕", (0, 200, 0)),
                      ("t2", "creme_brulee", "cafe with milk", (0, 0, 200))],
            "dev": [("d0", "soup", "soup", (200, 0, 0))],
            "test": [("s0", "apple_pie", "apple pie", (0, 200, 0)), ("s1", "soup", "hot", (200, 0, 0))]}


def mla_layout(root, splits, tokens=True, stat=True, length=6):
    """MLA layout: my_{split}_food.txt, stat_food.txt, visual/{split}_imgs/, text_token/{split}_token/."""
    for split, rows in splits.items():
        lines = []
        for stem, label, token_ids, rgb in rows:
            write_image(root / "visual" / f"{split}_imgs" / f"{stem}.jpg", rgb)
            lines.append(f"{stem}.jpg {label}")
            if tokens:
                folder = root / "text_token" / f"{split}_token"
                folder.mkdir(parents=True, exist_ok=True)
                tok = np.zeros((1, length), np.int64)
                tok[0, :len(token_ids)] = token_ids
                pm = np.ones((1, length), np.float32)
                pm[0, :len(token_ids)] = 0
                np.save(folder / f"{stem}_token.npy", tok)
                np.save(folder / f"{stem}_pm.npy", pm)
            else:
                folder = root / "text" / split
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{stem}.txt").write_text(" ".join(VOCAB[i] for i in token_ids) + "\n")
        (root / f"my_{split}_food.txt").write_text("\n".join(lines) + "\n")
    if stat:
        (root / "stat_food.txt").write_text("soup\napple_pie\ncreme_brulee\n")
    return root


def mla_splits():
    return {"train": [("apple_pie_0", "apple_pie", ids("apple", "pie"), (0, 200, 0)),
                      ("soup_3", "soup", ids("hot", "soup", "with", "milk"), (200, 0, 0)),
                      ("creme_brulee_1", "creme_brulee", ids("creme", "brulee"), (0, 0, 200))],
            "test": [("soup_9", "soup", ids("soup"), (200, 0, 0))]}


def test_jsonl_layout_dev_split_unicode_text_and_images(tmp_path, tokenizer):
    jsonl_layout(tmp_path, food_splits(), bom=True)
    data = C.load_it_splits("food101", tmp_path)
    assert data["layout"] == "jsonl" and data["skipped"] == 0
    assert data["classes"] == ["apple_pie", "creme_brulee", "soup"]           # sorted train labels
    assert [p.id for p in data["train"]] == ["t0", "t1", "t2"]                # the BOM did not break line 1
    assert [p.label for p in data["train"]] == [2, 0, 1]
    assert [p.id for p in data["dev"]] == ["d0"] and [p.id for p in data["test"]] == ["s0", "s1"]
    assert data["train"][1].src.endswith("train.jsonl:2") and data["train"][1].text == "Crème Brûlée — très bon ☕"
    ds = C.ITDataset(data["train"], train=False, image_size=8, max_len=9, tokenizer=tokenizer)
    image, text, label, i = ds[1]
    assert image.shape == (3, 8, 8) and text.shape == (2, 9) and text.dtype == torch.long and (label, i) == (0, 1)
    # lower-cased, accents stripped, unknown symbols -> [UNK]; no special tokens for M3AE (it adds its own CLS)
    assert text[0].tolist() == ids("creme", "brulee", "[UNK]", "tres", "bon", "[UNK]", "[PAD]", "[PAD]", "[PAD]")
    assert text[1].tolist() == [0] * 6 + [1] * 3                                # padding mask = 1 - attention mask
    green = image[1] * C.IMAGENET_STD[1] + C.IMAGENET_MEAN[1]                  # resized, ImageNet-normalised
    assert torch.allclose(green * 255, torch.full((8, 8), 200.0), atol=3)
    with_special = C.ITDataset(data["train"], False, 8, 6, tokenizer, special_tokens=True)[0][1]
    assert with_special[0].tolist() == ids("[CLS]", "hot", "soup", "[SEP]", "[PAD]", "[PAD]")
    cut = C.ITDataset(data["train"], False, 8, 2, tokenizer)[1][1]
    assert cut.tolist() == [ids("creme", "brulee"), [0, 0]]                    # truncated to --max_len


def test_train_transform_is_random_crop_and_flip(tmp_path, tokenizer):
    root = tmp_path / "d"
    jsonl_layout(root, food_splits())
    left_red = Image.new("RGB", (32, 32), (0, 0, 255))
    left_red.paste((255, 0, 0), (0, 0, 16, 32))
    left_red.save(root / "images" / "train" / "t0.jpg", quality=100)
    data = C.load_it_splits("food101", root)
    ds = C.ITDataset(data["train"], train=True, image_size=16, max_len=4, tokenizer=tokenizer)
    torch.manual_seed(0)
    views = [ds[0][0] for _ in range(12)]
    assert all(v.shape == (3, 16, 16) for v in views)
    assert any(not torch.allclose(views[0], v) for v in views[1:])             # random crops differ
    red_left = [v[0, :, :8].mean() > v[0, :, 8:].mean() for v in views]
    assert any(red_left) and not all(red_left)                                 # and some are flipped


def test_mla_layout_pre_tokenised_files_used_as_they_are(tmp_path):
    mla_layout(tmp_path, mla_splits())
    data = C.load_it_splits("food101", tmp_path)
    assert data["layout"] == "mla" and data["dev"] is None
    assert data["classes"] == ["apple_pie", "creme_brulee", "soup"]            # stat_food.txt, sorted
    assert [(p.id, p.label) for p in data["train"]] == [("apple_pie_0", 0), ("soup_3", 2), ("creme_brulee_1", 1)]
    assert data["train"][1].tokens.endswith("text_token/train_token/soup_3_token.npy")
    assert data["test"][0].image.endswith("visual/test_imgs/soup_9.jpg")
    ds = C.ITDataset(data["train"], train=False, image_size=8, max_len=6)      # no tokenizer needed
    text = ds[1][1]
    assert text.tolist() == [ids("hot", "soup", "with", "milk") + [0, 0], [0, 0, 0, 0, 1, 1]]
    longer = C.ITDataset(data["train"], False, 8, 8)[0][1]
    assert longer.tolist() == [ids("apple", "pie") + [0] * 6, [0, 0] + [1] * 6]
    shorter = C.ITDataset(data["train"], False, 8, 3)[1][1]
    assert shorter.tolist() == [ids("hot", "soup", "with"), [0, 0, 0]]


def test_mla_layout_raw_text_and_classes_from_labels(tmp_path, tokenizer):
    mla_layout(tmp_path, mla_splits(), tokens=False, stat=False)
    data = C.load_it_splits("food101", tmp_path)
    assert data["classes"] == ["apple_pie", "creme_brulee", "soup"]
    assert data["train"][1].text == "hot soup with milk" and data["train"][1].tokens == ""
    text = C.ITDataset(data["train"], False, 8, 5, tokenizer)[1][1]
    assert text[0].tolist() == ids("hot", "soup", "with", "milk", "[PAD]")


def error(tmp_path, match, **kw):
    with pytest.raises(C.DataError, match=match):
        C.load_it_splits("food101", tmp_path, **kw)


def test_jsonl_bad_inputs_name_file_and_line(tmp_path):
    jsonl_layout(tmp_path, food_splits())
    (tmp_path / "images" / "train" / "t1.jpg").unlink()
    error(tmp_path, r"train\.jsonl:2: image 'images/train/t1\.jpg' not found: expected .*t1\.jpg")
    data = C.load_it_splits("food101", tmp_path, skip_bad=True)
    assert data["skipped"] == 1 and [p.id for p in data["train"]] == ["t0", "t2"]

    jsonl_layout(tmp_path, food_splits())
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:2] + ['{"id": "x", "label": "soup",'] + lines[2:]))
    error(tmp_path, r"train\.jsonl:3: not valid JSON .*expected one object a line")
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:1] + ['{"id": "x", "label": "soup"}']))
    error(tmp_path, r"train\.jsonl:2: got \['id', 'label'\]; expected an object with keys id, label, text, img")
    (tmp_path / "train.jsonl").write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    error(tmp_path, r"train\.jsonl:4: not valid UTF-8")

    jsonl_layout(tmp_path, food_splits())
    (tmp_path / "test.jsonl").write_text('{"id": "q", "label": "pizza", "text": "x", "img": "images/test/s0.jpg"}\n')
    error(tmp_path, r"test\.jsonl:1: label 'pizza' is not a known class; expected one of \['apple_pie'")
    (tmp_path / "test.jsonl").write_text("\n\n")
    error(tmp_path, r"test\.jsonl: the list is empty")


def test_mla_bad_inputs_name_file_and_line(tmp_path):
    mla_layout(tmp_path, mla_splits())
    (tmp_path / "text_token" / "train_token" / "soup_3_pm.npy").unlink()
    error(tmp_path, r"my_train_food\.txt:2: text of 'soup_3\.jpg' not found: expected .*soup_3_pm\.npy")
    (tmp_path / "visual" / "train_imgs" / "creme_brulee_1.jpg").unlink()
    data = C.load_it_splits("food101", tmp_path, skip_bad=True)
    assert data["skipped"] == 2 and [p.id for p in data["train"]] == ["apple_pie_0"]

    mla_layout(tmp_path, mla_splits())
    (tmp_path / "my_test_food.txt").write_text("soup_9.jpg soup\nsoup_9_no_label\n")
    error(tmp_path, r"my_test_food\.txt:2: 'soup_9_no_label'; expected '<file>\.jpg <label>'")
    (tmp_path / "my_test_food.txt").write_text("soup_9.jpg ramen\n")
    error(tmp_path, r"my_test_food\.txt:1: label 'ramen' is not a known class.*stat_food\.txt")

    mla_layout(tmp_path, mla_splits())
    np.save(tmp_path / "text_token" / "train_token" / "soup_3_token.npy", np.array([[5, 99, 6, 0, 0, 0]]))
    data = C.load_it_splits("food101", tmp_path)
    with pytest.raises(C.DataError, match=r"soup_3_token\.npy: token id 99 outside the vocabulary of 16 "
                                          r"\(pair at .*my_train_food\.txt:2\)"):
        C.ITDataset(data["train"], False, 8, 6, vocab_size=len(VOCAB))[1]


def test_a_label_past_the_data_sets_classes_is_refused_others_warned(tmp_path, capsys):
    # MVSA-Single has 3 classes: a 4th label without a stat_mvsa.txt is a typo; the rarest one is named
    rgb = (9, 9, 9)
    rows = [(f"t{i}", lab, "x", rgb) for i, lab in enumerate(["positive"] * 3 + ["neutral"] * 3 + ["negative"] * 3)]
    jsonl_layout(tmp_path, {"train": rows[:7] + [("t7", "negatve", "x", rgb)] + rows[8:],
                            "test": [("s0", "positive", "x", rgb)]})
    with pytest.raises(C.DataError, match=r"train\.jsonl:8: label 'negatve' \(1 of 9 lines\) makes 4 classes; "
                                          r"MVSA-Single has 3: fix the label, or name the classes in .*stat_mvsa\.txt"):
        C.load_it_splits("mvsa", tmp_path)
    # any data set: classes missing from a split, or far rarer than the others, are warned about by name
    many = [(f"t{i}", "a" if i < 30 else "b", "x", rgb) for i in range(60)] + [("t60", "c", "x", rgb)]
    jsonl_layout(tmp_path, {"train": many, "test": [("s0", "a", "x", rgb), ("s1", "d", "x", rgb)]})
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\n")
    assert [p.label for p in C.load_it_splits("toy", tmp_path)["test"]] == [0, 3]
    assert capsys.readouterr().err.splitlines() == [
        "warning: classes in train but not in test (2): b, c",
        "warning: classes in test but not in train (1): d",
        "warning: classes with under a tenth of the median 30 training items: c (1)"]


def test_missing_root_or_layout_is_a_clear_error(tmp_path):
    error(tmp_path / "absent", r"(?s)data root not found.*accepted layouts")
    error(tmp_path, r"(?s)no known food101 layout found \(neither train\.jsonl nor my_train_food\.txt\).*MLA lists")
    mla_layout(tmp_path, mla_splits())
    error(tmp_path, r"train\.jsonl: file not found \(--layout jsonl\)", layout="jsonl")
    with pytest.raises(C.DataError, match="no_such_tokenizer: (no such tokenizer folder|cannot load a tokenizer)"):
        C.load_tokenizer(tmp_path / "no_such_tokenizer")


def test_a_hub_tokenizer_not_cached_fails_at_once_offline(monkeypatch):
    # the local HF cache is asked first (local_files_only); offline, the hub is not retried for a minute. No packet
    # leaves the machine: the connection the reachability check opens fails here as it does without a network
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    asked = []

    def no_network(address, *args, **kwargs):
        asked.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(C.socket, "create_connection", no_network)
    import transformers  # noqa: F401  (its import time is not the tokenizer's)
    start = time.time()
    with pytest.raises(C.DataError) as e:
        C.load_tokenizer("mla-tests-no-such-org/no-such-tokenizer")
    assert time.time() - start < 5 and "\n" not in str(e.value) and asked
    assert str(e.value).startswith("mla-tests-no-such-org/no-such-tokenizer: no such tokenizer folder, not in the "
                                   "Hugging Face cache, and the hub cannot be reached; pass --tokenizer")


def test_toy_it_is_deterministic_and_text_names_the_pair(tmp_path):
    a, b = C.make_toy_it(tmp_path / "a", seed=3, n_train=12, n_dev=6, n_test=6, recipe=C.ToyIT(px=16)), \
        C.make_toy_it(tmp_path / "b", seed=3, n_train=12, n_dev=6, n_test=6, recipe=C.ToyIT(px=16))
    assert (a / "train.jsonl").read_text() == (b / "train.jsonl").read_text()
    assert (a / "images/test/test0001.jpg").read_bytes() == (b / "images/test/test0001.jpg").read_bytes()
    data = C.load_it_splits("toy", a)
    assert data["classes"] == sorted(C.TOY_IT_CLASSES) and len(data["dev"]) == 6
    pair_word = {0: "dessert", 1: "dessert", 2: "salad", 3: "salad", 4: "soup", 5: "soup"}
    assert all(pair_word[C.TOY_IT_CLASSES.index(data["classes"][p.label])] in p.text.split() for p in data["train"])
    tok = C.load_tokenizer(a / "tokenizer")
    assert all(1 not in tok(p.text)["input_ids"] for p in data["train"])        # every caption word is in the vocab
