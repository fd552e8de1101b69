"""What a sweep on Ray costs (issue 19): 8 short trials on Chewie-1 as ``swapvae sweep`` runs
them with 1 and with 2 concurrent trials, against a plain loop of ``swapvae train --validation``
subprocesses with the same configs, in the same run; and the peak memory of the driver and of
the Ray processes.

    python benchmarks/sweep.py                     # 8 trials of 40 epochs
    python benchmarks/sweep.py --epochs 10 --trials 4

Ray's overhead per trial is (the sweep's trial phase at concurrency 1, Ray's start included,
minus the plain loop) / trials, and its share is that over the plain loop's time per trial.
The chosen point's final training (the sweep's last step) is timed apart and left out. Ray
probes the network and picks an address, so each sweep runs in a network namespace that holds
only loopback (as root; the benchmark says so and stops where one cannot be made). Memory: the
peak resident set (VmHWM) of the driver, and the sum of the peaks of every process under it
(Ray's GCS, raylet and workers), sampled every 100 ms from /proc.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import CHEWIE, ROOT, cpu_name, write_result  # benchmarks/ is on sys.path when run as a script


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def watched(argv: list[str]) -> tuple[float, dict, str]:
    """Run ``argv``; (wall seconds, peak memory in MB of it and of everything under it, stderr)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        kids, todo = _children(), [proc.pid]
        while todo:
            pid = todo.pop()
            peaks[pid] = max(peaks.get(pid, 0), _hwm_kb(pid))
            todo.extend(kids.get(pid, []))
        time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{argv[:4]}... exited {proc.returncode}: {err[-2000:]}")
    return wall, {"driver_mb": peaks.get(proc.pid, 0) / 1024, "all_mb": sum(peaks.values()) / 1024,
                  "processes": len(peaks)}, out


def loopback_only(argv: list[str]) -> list[str]:
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode:
        sys.exit(f"sweep.py runs Ray in a loopback-only network namespace and cannot make one here "
                 f"({probe.stderr.strip() or 'unshare failed'}): run it as root")
    return ["unshare", "-n", "sh", "-c", "ip link set lo up && exec " + " ".join(f"'{a}'" for a in argv)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--data", default=str(CHEWIE))
    p.add_argument("--out", default=str(ROOT / "results/sweep.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    try:
        base = {"optim": {"epochs": args.epochs, "cpu_threads": 1}}
        spec = {"sessions": [args.data], "seeds": list(range(args.trials)), "config": base, "resources": {"cpus": 1}}
        (work / "spec.yaml").write_text(yaml.safe_dump(spec))
        swapvae = [sys.executable, "-m", "swapvae"]
        rows = {}
        t = time.perf_counter()
        for seed in range(args.trials):  # the plain loop: one swapvae train per trial, one after another
            (work / "c.json").write_text(json.dumps({**base, "seed": seed}))
            watched([*swapvae, "train", "--validation", "--data", args.data, "--config", str(work / "c.json"),
                     "--out", str(work / f"loop{seed}"), "--quiet"])
        rows["plain loop"] = {"wall_s": time.perf_counter() - t, "concurrent": 1}
        for k in (1, 2):
            wall, mem, out = watched(loopback_only([*swapvae, "sweep", str(work / "spec.yaml"), "--out",
                                                    str(work / f"ray{k}"), "--num-cpus", str(k), "--json"]))
            s = json.loads(out)["seconds"]
            rows[f"ray, {k} concurrent"] = {"wall_s": s["ray_start"] + s["trials"], "concurrent": k,
                                            "process_wall_s": wall, "chosen_s": s["chosen"], **s, **mem}
        for name, r in rows.items():
            print(f"{name:<18} trials {r['wall_s']:7.1f} s" + (
                f"  (Ray start {r['ray_start']:.1f} s; driver peak {r['driver_mb']:.0f} MB, all {r['processes']} "
                f"processes {r['all_mb']:.0f} MB)" if "ray_start" in r else ""))
        loop = rows["plain loop"]["wall_s"]
        per_trial = loop / args.trials
        overhead = (rows["ray, 1 concurrent"]["wall_s"] - loop) / args.trials
        speedup = rows["ray, 1 concurrent"]["wall_s"] / rows["ray, 2 concurrent"]["wall_s"]
        print(f"Ray's overhead per trial: {overhead:+.2f} s on {per_trial:.1f} s a trial "
              f"({overhead / per_trial:+.1%}); 2 concurrent trials x{speedup:.2f} faster than 1")
        loop_metrics = [json.loads((work / f"loop{s}" / "metrics.json").read_text()) for s in range(args.trials)]
        same = all({k: v for k, v in m.items() if k != "train_seconds"} == {
            k: v for k, v in json.loads((work / "ray1" / "trials" / Path(args.data).stem / "base" / f"seed{s}" /
                                         "metrics.json").read_text()).items() if k != "train_seconds"}
            for s, m in enumerate(loop_metrics))
        print(f"the sweep's trials equal the plain loop's runs (metrics, bit for bit): {same}")
        write_result(args.out, {"trials": args.trials, "epochs": args.epochs, "data": args.data, "rows": rows,
                                "overhead_per_trial_s": overhead, "overhead_share": overhead / per_trial,
                                "trial_s_plain": per_trial, "speedup_2_concurrent": speedup,
                                "median_train_seconds": statistics.median(m["train_seconds"] for m in loop_metrics),
                                "same_metrics": same, "machine": {"cpu": cpu_name()}})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
