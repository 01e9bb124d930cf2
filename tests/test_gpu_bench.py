"""bench/gpu.sh runs on a machine without a GPU too (`--device cpu`, small sizes): the smoke test of the
script CI runs, so that the one prepared GPU run does not fail on a typo. Asserts its output table."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NUMBER, RATIO = r"\s+([\d,]+)", r"\s+([\d.]+)"
ROW = re.compile(rf"^(lenet5|resnet18){NUMBER}{NUMBER}{NUMBER * 3}{RATIO * 3}$", re.MULTILINE)


def test_the_gpu_bench_runs_on_cpu_and_prints_its_table():
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--device", "cpu"], capture_output=True,
                          text=True, timeout=400, cwd=REPO)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert "harness img/s" in out and "hand img/s" in out and "dataloader img/s" in out
    rows = {m.group(1): m.groups() for m in ROW.finditer(out)}
    assert sorted(rows) == ["lenet5", "resnet18"], out
    for name, params, batch, ours, hand, loader, vs_hand, vs_loader, first in rows.values():
        assert int(params.replace(",", "")) > 10_000 and int(batch) == 32
        assert min(int(v.replace(",", "")) for v in (ours, hand, loader)) > 0, name
        # the ratio columns are the rates' quotients (rounded in print)
        assert float(vs_hand) > 0 and float(vs_loader) > 0 and float(first) > 0
    for name in rows:
        assert re.search(rf"target harness >= 0.95x hand-written \[{name}\]: [\d.]+x (PASS|MISS)", out)
        assert re.search(rf"target harness >= 4x DataLoader\(2 workers\) \[{name}\]: [\d.]+x (PASS|MISS)", out)
        assert f"bf16 vs fp32 [{name}]: skipped on cpu" in out
    assert "memory after kill [lenet5]: freed" in out
