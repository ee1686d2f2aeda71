"""MLA's parts one at a time (the paper's own question), on the toy set of every script, 3 seeds.

    python tests/bench/hgm_ablation.py --out runs/hgm_ablation            # runs what is missing, then the table
    python tests/bench/hgm_ablation.py --out runs/hgm_ablation --jobs 2   # two runs at a time
    python tests/bench/hgm_ablation.py --out runs/hgm_ablation --table    # the table and plot only

Each variant is `--method mla` with the flags below, in its own --out_dir (the scripts skip the runs
they finished, so an interrupted ablation continues). Prints a markdown table of the fused test
accuracy (mean ± std over seeds) and of trace(P)/d at the last epoch, and writes <out>/hgm_ablation.png:
per script, trace(P)/d and the fused validation accuracy over epochs (mean over seeds; needs matplotlib).
Ends with how many settings `mla --no_hgm` beats `mla` on (the rule that sets HGM's default).
"""
import argparse
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402
VARIANTS = {                                      # folder: (label, flags)
    "fixed_no_hgm": ("alternating, fixed fusion", ["--no_hgm", "--fusion", "fixed"]),
    "no_hgm": ("+ dynamic fusion (`--no_hgm`)", ["--no_hgm"]),
    "hgm": ("+ HGM, the paper's (`--hgm`)", ["--hgm"]),
    "hgm_scaled": ("+ HGM, `--hgm_alpha_scale`", ["--hgm", "--hgm_alpha_scale"]),
    "hgm_forget": ("+ HGM, `--hgm_forget 0.99`", ["--hgm", "--hgm_forget", "0.99"]),
}
SCRIPTS = {"train_av.py": [], "train_it.py": [], "train_ait.py": [], "train_missing.py": ["--missing_rate", "0.5"],
           "train_clip.py": []}


def run(script, variant, seeds, out):
    log = out / variant / f"{Path(script).stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, script, "--method", "mla", "--seeds", seeds, "--out_dir", str(out / variant),
           *SCRIPTS[script], *VARIANTS[variant][1]]
    with open(log, "a") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"{'ok ' if rc == 0 else f'rc={rc}'} {' '.join(cmd[1:])}  (log {log})", flush=True)
    return rc


def records(out, variant, script):
    return [r for r in C.load_records(out / variant) if r["script"] == script]


def cell(values, digits=1):
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f}±{sd:.{digits}f}"


def table(out):
    head = "| variant | " + " | ".join(f"{Path(s).stem} toy" for s in SCRIPTS) + " |"
    lines = [head, "|" + "---|" * (len(SCRIPTS) + 1)]
    fused = {}
    for v, (label, _) in VARIANTS.items():
        cells = []
        for s in SCRIPTS:
            recs = records(out, v, s)
            fused[v, s] = [r["test"]["multi"] for r in recs]
            traces = [r["epochs"][-1].get("hgm_p_trace") for r in recs]
            trace = f" (P {statistics.mean(traces):.2f})" if traces and None not in traces else ""
            cells.append(cell(fused[v, s]) + trace)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    wins = sum(statistics.mean(fused["no_hgm", s]) > statistics.mean(fused["hgm", s])
               for s in SCRIPTS if fused["no_hgm", s] and fused["hgm", s])
    n = sum(bool(fused["no_hgm", s] and fused["hgm", s]) for s in SCRIPTS)
    return "\n".join(lines), wins, n


def plot(out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install matplotlib)")
        return None
    fig, axes = plt.subplots(2, len(SCRIPTS), figsize=(3.3 * len(SCRIPTS), 5.4), squeeze=False)
    for col, s in enumerate(SCRIPTS):
        for i, (v, (label, _)) in enumerate(VARIANTS.items()):
            recs = records(out, v, s)
            if not recs:
                continue
            n = min(len(r["epochs"]) for r in recs)
            mean = lambda get: [statistics.mean(get(r["epochs"][i]) for r in recs) for i in range(n)]
            if recs[0]["epochs"][0].get("hgm_p_trace") is not None:
                axes[0, col].plot(range(1, n + 1), mean(lambda e: e["hgm_p_trace"]), f"C{i}", label=label)
            axes[1, col].plot(range(1, n + 1), mean(lambda e: e["val"]["multi"]), f"C{i}", label=label)
        axes[0, col].set_title(f"{Path(s).stem} toy", fontsize=9)
        axes[0, col].set_ylabel("trace(P) / d")
        axes[1, col].set_ylabel("fused val accuracy (%)")
        for ax in axes[:, col]:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    axes[1, 0].legend(handles=[plt.Line2D([], [], color=f"C{i}", label=label)
                               for i, (label, _) in enumerate(VARIANTS.values())], fontsize=7)
    fig.tight_layout()
    path = out / "hgm_ablation.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/hgm_ablation"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (when > 1, each gets OMP_NUM_THREADS=1 unless it is set)")
    p.add_argument("--table", action="store_true", help="only print the table and write the plot")
    args = p.parse_args()
    out = args.out.resolve()
    if not args.table:
        if args.jobs > 1:
            os.environ.setdefault("OMP_NUM_THREADS", "1")
        with ThreadPoolExecutor(args.jobs) as pool:
            rcs = list(pool.map(lambda sv: run(*sv, args.seeds, out), [(s, v) for s in SCRIPTS for v in VARIANTS]))
        if any(rcs):
            print(f"{sum(1 for r in rcs if r)} of {len(rcs)} commands failed; see their logs")
    text, wins, n = table(out)
    print(text)
    print(f"\n`mla --no_hgm` beats `mla` on fused test accuracy in {wins} of {n} settings")
    path = plot(out)
    if path:
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
