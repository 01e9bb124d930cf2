"""The GPU path, measured in one run (`bash bench/gpu.sh`; `--device cpu` is the smoke test of this script).

For a LeNet-5-sized and a ResNet-18-sized reference model (our own code, below) on a synthetic
CIFAR-10-shaped dataset (uint8 3x32x32 noise, 10 classes: throughput does not need real pixels):

1. images/s of training through
   (a) our harness: the real runner (`python -m sandbox.runner spec.json`, train mode, one trial with
       fixed hyperparameters, device-resident loader, the model's own learn()), read from its `point`
       event (`train_ns`: time inside learn() only, synchronised on CUDA);
   (b) a hand-written GPU-resident loop: normalised float tensors already on the device, shuffled index
       slices, the same Net, optimizer and learn() -- the ceiling;
   (c) a DataLoader loop with worker processes and per-image ToTensor/Normalize on the CPU (LEMUR's way);
   targets: (a) >= 0.95 x (b) and (a) >= 4 x (c) on a GPU.
2. Runner start -> first optimizer step (the `first_step` event), for each model: what a submission waits
   before its model trains (interpreter, imports, CUDA init, data to the device, build, check).
3. bf16 vs fp32: the hand-written loop under `torch.autocast(bfloat16)`; the harness too when the job
   spec has a `precision` field (else one line says it was skipped).
4. A killed job frees its GPU memory: a runner that is training is SIGKILLed (its process group) and the
   GPU's used memory must return to where it was before it started (nvidia-smi), within 10 s. On CPU
   the same check is that the killed process is gone.

No network: the data is generated here, the models are in this file, the runner is this checkout's.
Timings are bracketed by torch.cuda.synchronize() on CUDA. Output: one table and a few `key: value` lines.

    python bench/gpu_bench.py [--device cuda|cpu] [--quick] [--workers 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox import protocol  # noqa: E402

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]  # CIFAR-10's, for the synthetic set too
HARNESS_TARGET, DATALOADER_TARGET = 0.95, 4.0
FREED_SLACK_MIB = 64  # GPU memory still "used" after a kill that counts as freed (driver bookkeeping)

# Both models' files share this part: imports, the hyperparameters, and the training loop (Trainable.learn:
# the same optimizer step for the harness, the hand-written loop and the DataLoader loop, which all call it)
MODEL_COMMON = '''
import torch
import torch.nn as nn


def supported_hyperparameters():
    return {"lr", "momentum"}


class Trainable(nn.Module):
    def train_setup(self, prm):
        self.to(self.device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=prm["lr"], momentum=prm["momentum"])

    def learn(self, train_data):
        for inputs, labels in train_data:
            self.optimizer.zero_grad(set_to_none=True)
            self.criterion(self(inputs), labels).backward()
            self.optimizer.step()
'''

LENET5 = MODEL_COMMON + '''

class Net(Trainable):
    """LeNet-5 sized: two 5x5 convolutions (6, 16 channels), three linear layers (~62k parameters)."""

    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.features = nn.Sequential(nn.Conv2d(in_shape[1], 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        side = ((in_shape[2] - 4) // 2 - 4) // 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * side * side, 120), nn.ReLU(),
                                  nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, out_shape[0]))

    def forward(self, x):
        return self.head(self.features(x))
'''

RESNET18 = MODEL_COMMON + '''
WIDTH = {width}


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class Net(Trainable):
    """ResNet-18 sized, CIFAR layout: 3x3 stem, four stages of two basic blocks (WIDTH=64: ~11M parameters)."""

    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        w = WIDTH
        layers = [nn.Conv2d(in_shape[1], w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
            cin = cout
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, out_shape[0])

    def forward(self, x):
        return self.fc(self.body(x))
'''


def resnet18(width: int) -> str:
    """The ResNet-18-sized model file at `width` (64: the real size; 4: the CPU smoke test's)."""
    return RESNET18.replace("{width}", str(width))


@dataclasses.dataclass(frozen=True)
class Case:
    """One reference model and how much it trains."""

    name: str
    code: str
    n_train: int  # images in the synthetic train split (the harness holds 10 % out for validation)
    batch: int
    dataloader_steps: int  # steps timed for the (slow) DataLoader loop


def cases(device: str, quick: bool) -> list[Case]:
    """Full sizes on a GPU (CIFAR-10's 50k images, ResNet-18 at width 64); seconds on a CPU."""
    if device == "cuda" and not quick:
        return [Case("lenet5", LENET5, 50_000, 128, 150), Case("resnet18", resnet18(64), 50_000, 128, 60)]
    return [Case("lenet5", LENET5, 640, 32, 6), Case("resnet18", resnet18(4), 160, 32, 3)]


# --- helpers --------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_module(code: str, name: str, folder: Path) -> Any:
    """Our own reference model file (trusted), imported in this process for the loops (b) and (c)."""
    path = folder / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def synthetic_cifar(folder: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """train_x/train_y/test_x in the runner's layout: uint8 NCHW images, int64 labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "train_x.npy", rng.integers(0, 256, size=(n_train, 3, 32, 32), dtype=np.uint8))
    np.save(folder / "train_y.npy", rng.integers(0, 10, size=n_train).astype(np.int64))
    np.save(folder / "test_x.npy", rng.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8))


def build(module: Any, batch: int, device: torch.device) -> Any:
    prm = {"lr": 0.01, "momentum": 0.9, "batch": batch, "epoch": 1, "transform": "norm_32"}
    torch.manual_seed(0)
    net = module.Net((1, 3, 32, 32), (10,), prm, device)
    net.train_setup(prm)
    net.train()
    return net


def timed(device: torch.device, run: Callable[[], None]) -> float:
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - t0


# --- (a) the harness: the real runner ---------------------------------------------------------------------
def runner_spec(work: Path, case: Case, device: str, threads: int, epochs: float, precision: str | None
                ) -> protocol.JobSpec:
    fields = {f.name for f in dataclasses.fields(protocol.JobSpec)}
    extra = {"precision": precision} if precision is not None and "precision" in fields else {}
    return protocol.JobSpec(
        mode=protocol.MODE_TRAIN, task="img-classification", dataset="synthetic-cifar-10", metric="acc",
        num_classes=10, image_shape=[3, 32, 32], mean=MEAN, std=STD, model_path=str(work / "in" / "model.py"),
        data_dir=str(work / "data"), out_dir=str(work / "out"),
        fixed_prm={"lr": 0.01, "momentum": 0.9, "batch": case.batch, "transform": "norm_32"},
        transforms=["norm_32"], n_trials=1, epochs=epochs, eval_every=epochs, seed=0, time_budget_s=400,
        device=device, max_train_samples=case.n_train, max_test_samples=None, threads=threads, save_weights=False,
        **extra)


def start_runner(work: Path, spec: protocol.JobSpec, code: str) -> tuple[subprocess.Popen[bytes], float]:
    """Start `python -m sandbox.runner` on a fresh job folder (its own process group, for the kill check)."""
    for sub in ("in", "out"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    (work / "in" / "model.py").write_text(code)
    (work / "in" / "spec.json").write_text(spec.to_json())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(spec.threads)}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "sandbox.runner", str(work / "in" / "spec.json")],
                            cwd=work / "out", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    return proc, t0


def events(work: Path) -> list[dict[str, Any]]:
    path = work / "out" / protocol.EVENTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def harness(work: Path, case: Case, device: str, threads: int, precision: str | None = None) -> dict[str, Any]:
    """Train one epoch through the runner; images/s from train_ns, start -> first step from its event."""
    spec = runner_spec(work, case, device, threads, 1.0, precision)
    proc, t0 = start_runner(work, spec, case.code)
    _, err = proc.communicate(timeout=420)
    seen = events(work)
    point = next((e for e in seen if e.get("event") == protocol.EVENT_POINT), None)
    first = next((e for e in seen if e.get("event") == protocol.EVENT_FIRST_STEP), None)
    if point is None or first is None:
        failed = next((e for e in seen if e.get("event") == protocol.EVENT_ERROR), {})
        raise RuntimeError(f"the runner gave no training point for {case.name}: {failed.get('message')} "
                           f"{err.decode(errors='replace')[-800:]}")
    n_train = case.n_train - round(case.n_train * spec.val_fraction)
    return {"images_per_s": n_train / (point["train_ns"] / 1e9), "first_step_s": first["t_unix"] - t0}


# --- (b) and (c): one timed loop over two batch sources --------------------------------------------------
Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # n -> the next n batches


def loop_rate(module: Any, case: Case, device: torch.device, batches: Batches, steps: int, warmup: int,
              bf16: bool = False) -> float:
    """Images/s of the model's own learn() over `steps` batches from `batches`, after `warmup` untimed ones
    (allocator, kernel selection, the loader's workers filling their queues); bf16 autocast around it."""
    net = build(module, case.batch, device)

    def run(n: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            net.learn(batches(n))

    run(warmup)
    return steps * case.batch / timed(device, lambda: run(steps))


def resident_batches(case: Case, device: torch.device) -> Batches:
    """(b) hand-written, GPU-resident: normalised floats already on the device, shuffled index slices."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (case.n_train, 3, 32, 32), generator=gen, dtype=torch.uint8).to(device)
    y = torch.randint(0, 10, (case.n_train,), generator=gen).to(device)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    x = (x.float() / 255 - mean) / std
    perm = torch.randperm(case.n_train, device=device)
    last = case.n_train - case.batch

    def batches(n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(n):
            start = (i * case.batch) % max(1, last)
            idx = perm[start:start + case.batch]
            yield x[idx], y[idx]

    return batches


def hand_written(module: Any, case: Case, device: torch.device, steps: int, bf16: bool = False) -> float:
    """Images/s of the same learn() over normalised floats already on the device: the ceiling."""
    return loop_rate(module, case, device, resident_batches(case, device), steps, warmup=3, bf16=bf16)


class ArrayImages(torch.utils.data.Dataset):
    """uint8 HWC images through ToTensor + Normalize one at a time, in the loader's worker processes."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.labels = rng.integers(0, 10, size=n)
        from torchvision import transforms

        self.pipeline = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.pipeline(self.images[i]), int(self.labels[i])


def loader_batches(case: Case, device: torch.device, workers: int) -> Batches:
    """(c) a DataLoader with worker processes and per-image transforms on the CPU (LEMUR's way)."""
    loader = torch.utils.data.DataLoader(ArrayImages(case.n_train), batch_size=case.batch, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0)
    stream = iter(loader)

    def batches(n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        nonlocal stream
        for _ in range(n):
            try:
                xb, yb = next(stream)
            except StopIteration:
                stream = iter(loader)
                xb, yb = next(stream)
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)

    return batches


def dataloader(module: Any, case: Case, device: torch.device, steps: int, workers: int) -> float:
    return loop_rate(module, case, device, loader_batches(case, device, workers), steps, warmup=2)


# --- 4. a killed job frees its GPU memory ---------------------------------------------------------------
def gpu_used_mib(index: int = 0) -> float | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    out = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(index)],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    return float(out.strip().splitlines()[0])


def kill_check(work: Path, case: Case, device: str, threads: int) -> str:
    """Start a long job, wait for its first step, SIGKILL its process group, see its memory come back."""
    if device == "cuda":
        torch.cuda.empty_cache()
    before = gpu_used_mib() if device == "cuda" else None
    proc, _ = start_runner(work, runner_spec(work, case, device, threads, 50.0, None), case.code)
    deadline = time.monotonic() + 180
    while not any(e.get("event") == protocol.EVENT_FIRST_STEP for e in events(work)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            return f"FAILED: the job never reached its first step (exit {proc.poll()})"
        time.sleep(0.1)
    during = gpu_used_mib() if device == "cuda" else None
    t_kill = time.monotonic()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if device != "cuda":
        return f"freed (cpu: the killed job's process group is gone after {time.monotonic() - t_kill:.2f} s)"
    assert before is not None and during is not None
    while time.monotonic() - t_kill < 10:
        after = gpu_used_mib()
        if after is not None and after <= before + FREED_SLACK_MIB:
            return (f"freed (GPU memory used: {before:.0f} MiB before, {during:.0f} MiB while training, "
                    f"{after:.0f} MiB {time.monotonic() - t_kill:.2f} s after the kill)")
        time.sleep(0.1)
    return f"NOT FREED: {before:.0f} MiB before, {during:.0f} MiB while training, {gpu_used_mib():.0f} MiB 10 s later"


def precision_lines(work: Path, case: Case, module: Any, device: torch.device, threads: int, steps: int,
                    hand: float, ours: float) -> list[str]:
    """bf16 against fp32: the hand-written loop always (on CUDA), the harness when its spec has the option."""
    if device.type != "cuda":
        return [f"bf16 vs fp32 [{case.name}]: skipped on cpu (bf16 autocast is a GPU measurement)"]
    bf16 = hand_written(module, case, device, steps, bf16=True)
    lines = [f"bf16 vs fp32 [{case.name}, hand-written loop]: {bf16:,.0f} vs {hand:,.0f} images/s ({bf16 / hand:.2f}x)"]
    if "precision" not in {f.name for f in dataclasses.fields(protocol.JobSpec)}:
        return lines + [f"bf16 vs fp32 [{case.name}, harness]: skipped (the job spec has no precision option yet)"]
    ours_bf16 = harness(work, case, device.type, threads, precision="bf16")["images_per_s"]
    return lines + [f"bf16 vs fp32 [{case.name}, harness]: {ours_bf16:,.0f} vs {ours:,.0f} images/s "
                    f"({ours_bf16 / ours:.2f}x)"]


# --- the run ---------------------------------------------------------------------------------------------
def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (implied by --device cpu)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 4 on cuda, 2 on cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU (CUDA_VISIBLE_DEVICES, driver?); use --device cpu",
              file=sys.stderr)
        return 2
    quick = args.quick or args.device == "cpu"
    workers = args.workers if args.workers is not None else (4 if args.device == "cuda" else 2)
    threads = args.threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{threads} threads"
    print(f"device: {name}; torch {torch.__version__}; {'quick' if quick else 'full'} sizes; "
          f"DataLoader workers {workers}")
    work = Path(tempfile.mkdtemp(prefix="lemur-gpu-bench-"))
    try:
        return run_all(work, device, quick, workers, threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_all(work: Path, device: torch.device, quick: bool, workers: int, threads: int) -> int:
    all_cases = cases(device.type, quick)
    rows = []
    extra: list[str] = []
    for case in all_cases:
        synthetic_cifar(work / "data", case.n_train, max(64, case.n_train // 10))
        module = load_module(case.code, case.name, work)
        params = sum(p.numel() for p in build(module, case.batch, device).parameters())
        ours = harness(work, case, device.type, threads)
        steps = (case.n_train - round(case.n_train * 0.1)) // case.batch
        hand = hand_written(module, case, device, steps)
        loader = dataloader(module, case, device, case.dataloader_steps, workers)
        rows.append((case.name, params, case.batch, ours["images_per_s"], hand, loader, ours["first_step_s"]))
        extra += precision_lines(work, case, module, device, threads, steps, hand, ours["images_per_s"])
    print()
    print(f"{'model':10s} {'params':>10s} {'batch':>5s} {'harness img/s':>14s} {'hand img/s':>11s} "
          f"{'dataloader img/s':>17s} {'vs hand':>8s} {'vs loader':>9s} {'first step s':>12s}")
    for name, params, batch, ours_rate, hand, loader, first in rows:
        print(f"{name:10s} {params:>10,d} {batch:>5d} {ours_rate:>14,.0f} {hand:>11,.0f} {loader:>17,.0f} "
              f"{ours_rate / hand:>8.2f} {ours_rate / loader:>9.2f} {first:>12.2f}")
    print()
    for name, _, _, ours_rate, hand, loader, _ in rows:
        print(f"target harness >= {HARNESS_TARGET}x hand-written [{name}]: {ours_rate / hand:.2f}x "
              f"{verdict(ours_rate / hand, HARNESS_TARGET)}")
        print(f"target harness >= {DATALOADER_TARGET:g}x DataLoader({workers} workers) [{name}]: "
              f"{ours_rate / loader:.2f}x {verdict(ours_rate / loader, DATALOADER_TARGET)}"
              + ("" if device.type == "cuda" else " (a GPU target; informational on cpu)"))
    for line in extra:
        print(line)
    print(f"memory after kill [{all_cases[0].name}]: {kill_check(work, all_cases[0], device.type, threads)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
