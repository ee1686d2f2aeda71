"""`python common.py report` and `plot` on hand-made records."""
import csv
import io
import json
import sys

import pytest

import common as C


def record(root, script, dataset, method, seed, test, select_on="val", missing_rate=None, epochs=2):
    mods = [k for k in test if k != "multi"]
    args = {"missing_rate": missing_rate} if missing_rate is not None else {}
    rec = {"script": script, "dataset": dataset, "method": method, "seed": seed, "args": args,
           "modalities": mods,
           "epochs": [{"epoch": e, "train_loss": 1.0 / (e + 1), "val": {k: 10.0 * (e + 1) for k in test}}
                      for e in range(epochs)],
           "select_on": select_on, "best_epoch": epochs - 1, "test": test, "wall_time_s": 1.0, "version": "x"}
    extra = [f"missing{missing_rate}"] if missing_rate is not None else []
    path = root.joinpath(dataset, method, f"seed{seed}", *extra, "record.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


@pytest.fixture
def runs(tmp_path):
    for seed, a in enumerate([50.0, 52.0, 54.0]):
        record(tmp_path, "train_av.py", "cremad", "concat", seed, {"audio": a, "video": 20.0, "multi": 60.0 + seed})
    for seed in (0, 1):                                               # seed 2 missing
        record(tmp_path, "train_av.py", "cremad", "mla", seed, {"audio": 60.0, "video": 64.0, "multi": 80.0},
               select_on="test" if seed == 1 else "val")
    record(tmp_path, "train_av.py", "toy", "mla", 0, {"audio": 90.0, "video": 91.0, "multi": 97.0})
    for rate in (0.1, 0.3):
        for seed in (0, 1, 2):
            record(tmp_path, "train_missing.py", "features", "mla", seed,
                   {"audio": 1.0, "visual": 1.0, "text": 1.0, "multi": 70.0 - 10 * rate + seed},
                   missing_rate=rate)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "record.json").write_text("{not json")
    return tmp_path


def test_report_cells_mean_std_counts_and_marks(runs):
    text = C.report(runs)
    lines = text.splitlines()
    concat = next(l for l in lines if l.startswith("| `concat`"))
    assert concat.split(" | ")[1] == "52.00 ± 2.00 (n=3)"             # mean ± sample std over seeds
    assert concat.split(" | ")[3].startswith("61.00 ± 1.00 (n=3)")
    mla = next(l for l in lines if l.startswith("| `mla`") and "64.00" in l)
    assert "60.00 ± 0.00 (n=2 of 3) †" in mla                          # a missing seed; selected on test
    assert "† epoch selected on the test set" in text
    # rows in the paper's order, Table 6 columns are the missing rates
    assert text.index("| `concat`") < text.index("| `mla` | 60.00")
    t6 = text[text.index("train_missing.py"):]
    assert "| method | 10 | 30 |" in t6 and "| `mla` | 70.00 ± 1.00 (n=3) | 68.00 ± 1.00 (n=3) |" in t6


def test_report_paper_columns_and_toy_is_labelled_other_data(runs):
    text = C.report(runs, paper=True)
    concat = next(l for l in text.splitlines() if l.startswith("| `concat`"))
    cells = concat.strip("| ").split(" | ")
    assert cells[1:4] == ["52.00 ± 2.00 (n=3)", "55.65 ± 0.82", "-3.65"]
    toy = text[text.index("train_av.py · toy"):]
    assert "DIFFERENT DATA" in toy.splitlines()[1] and "not a reproduction" in toy.splitlines()[1]
    assert "paper: cremad, Table 5\n" in text                          # real data: no such label
    t6 = text[text.index("train_missing.py"):]
    assert "| `mla` | 70.00 ± 1.00 (n=3) | 75.07 ± 1.04 | -5.07 |" in t6


def test_report_csv(runs):
    rows = list(csv.DictReader(io.StringIO(C.report(runs, paper=True, fmt="csv"))))
    r = next(r for r in rows if r["dataset"] == "cremad" and r["method"] == "concat" and r["column"] == "audio")
    assert float(r["mean"]) == 52.0 and float(r["std"]) == 2.0 and r["n"] == "3"
    assert float(r["paper_mean"]) == 55.65 and float(r["diff"]) == pytest.approx(-3.65)
    assert {r["table"] for r in rows} == {"5", "6"}


def test_plot_writes_png(runs, tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    out = C.plot_curves(runs, tmp_path / "fig" / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    # records with diagnostics: a row per method, its accuracies, then a panel per diagnostic, a line per modality
    for seed in (0, 1):
        record(tmp_path / "diag", "train_av.py", "toy", "ogm", seed, {"audio": 1.0, "video": 2.0, "multi": 3.0})
        path = tmp_path / "diag" / "toy" / "ogm" / f"seed{seed}" / "record.json"
        rec = json.loads(path.read_text())
        for e in rec["epochs"]:
            e |= {"ogm_coeff": {"audio": 0.5 + seed, "video": 1.0}, "grad_norm": {"audio": 2.0, "video": None}}
        path.write_text(json.dumps(rec))
    record(tmp_path / "diag", "train_av.py", "toy", "mla", 0, {"audio": 1.0, "video": 2.0, "multi": 3.0})
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    C.plot_curves(tmp_path / "diag", tmp_path / "diag.png")
    axes = [ax for ax in figures[0].axes if ax.axison]
    assert [ax.get_title() for ax in axes] == ["ogm · toy · train_av (2 seeds)", "ogm_coeff · ogm", "grad_norm · ogm",
                                               "mla · toy · train_av (1 seed)"]
    lines = {line.get_label(): list(line.get_ydata()) for line in axes[1].lines}
    assert lines == {"audio": [1.0, 1.0], "video": [1.0, 1.0]}           # the mean over the seeds, per epoch
    assert [line.get_label() for line in axes[2].lines] == ["audio"]     # no value of video: no line


def test_plot_without_matplotlib_fails_clearly(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="plot needs matplotlib.*pip install matplotlib"):
        C.plot_curves(runs, tmp_path / "c.png")


def test_two_records_of_one_seed_are_an_error_and_a_missing_folder_too(runs, tmp_path):
    other = tmp_path / "more"
    record(other, "train_av.py", "cremad", "concat", 1, {"audio": 10.0, "video": 20.0, "multi": 30.0})
    with pytest.raises(C.DataError, match=r"more/cremad/concat/seed1/record.json: a second record of cremad concat "
                                          r"seed 1 \(audio\), besides .*cremad/concat/seed1/record.json"):
        C.report(runs)
    with pytest.raises(C.DataError, match="nowhere: folder not found"):
        C.report(tmp_path / "nowhere")


def test_report_notes_runs_of_one_method_with_other_settings(tmp_path):
    for seed, epochs in enumerate([1, 12, 12]):
        record(tmp_path, "train_av.py", "toy", "mla", seed, {"audio": 1.0, "video": 1.0, "multi": 1.0})
        path = tmp_path / "toy" / "mla" / f"seed{seed}" / "record.json"
        rec = json.loads(path.read_text())
        rec["args"] = {"epochs": epochs, "seed": seed, "lr": 0.01}
        path.write_text(json.dumps(rec))
    text = C.report(tmp_path)
    assert "note: `mla` averages runs of other settings (--epochs 1 there, 12 now)" in text
    for seed in (0, 1):
        record(tmp_path / "same", "train_av.py", "toy", "mla", seed, {"audio": 1.0, "video": 1.0, "multi": 1.0})
    assert "note:" not in C.report(tmp_path / "same")


def test_sweep_line_counts_epochs_from_1_in_new_and_older_records(capsys):
    # a record with first_epoch 1 counts as the console does; an older one (no first_epoch) from 0
    new = {"test": {"multi": 80.0}, "best_epoch": 9, "select_on": "val", "wall_time_s": 3.0, "first_epoch": 1}
    old = {k: v for k, v in new.items() if k != "first_epoch"} | {"best_epoch": 8}
    C.announce(new, "mla seed 0")
    C.announce(old, "mla seed 1")
    assert [line.split("(")[1] for line in capsys.readouterr().out.splitlines()] == ["epoch 9 by val, 3s)"] * 2
