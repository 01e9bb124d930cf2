"""Evaluation speed, measured in one run on this machine (GPU when present, else CPU).

1. Throughput: images/s of one reference model trained through
   (a) our device-resident loader (sandbox.runner.loader: uint8 on the device, per-batch resize, flip and
       normalize on the device) with the model's own learn(),
   (b) a plain hand-written loop over pre-transformed float tensors already on the device (the ceiling),
   (c) a torchvision DataLoader with PIL transforms (LEMUR's way), num_workers as given,
   printed as ratios (targets on a GPU: a >= 0.95 b, a >= 3 c).
2. Fixed cost: seconds from submit to the first optimizer step of a real job through the evaluator,
   for each sandbox backend that works here (process; docker cold; docker pre-started).

    python bench/evaluate.py [--dataset fashion-mnist] [--model LeNet5] [--steps 200] [--batch 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lemur_agent_server.config import Settings  # noqa: E402
from lemur_agent_server.evaluator.queue import JobQueue  # noqa: E402
from lemur_agent_server.evaluator.requests import EvalRequest  # noqa: E402
from lemur_agent_server.reference_models import read_code  # noqa: E402
from sandbox import datasets  # noqa: E402
from sandbox.runner import loader  # noqa: E402
from sandbox.runner.params import parse_transform  # noqa: E402
from zoo.store import ZooStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_model_class(name: str) -> Any:
    """Our own reference model (trusted code), imported in-process for the throughput part only."""
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(read_code(name))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(module: Any, shape: tuple[int, ...], classes: int, batch: int, device: torch.device) -> Any:
    prm = {"lr": 0.01, "momentum": 0.9, "dropout": 0.2, "batch": batch, "epoch": 1, "transform": "norm_32_flip"}
    torch.manual_seed(0)
    net = module.Net((1, *shape), (classes,), prm, device)
    net.train_setup(prm)
    net.train()
    return net


def interleaved_rates(loops: dict[str, Any], steps: int, batch: int, device: torch.device,
                      rounds: int = 5) -> dict[str, float]:
    """Median images/s per loop; the loops take turns each round, so machine noise hits all alike."""
    for run in loops.values():
        run(5)  # warm-up: allocator, kernels, DataLoader workers
    samples: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, run in loops.items():
            sync(device)
            t = time.perf_counter()
            run(steps)
            sync(device)
            samples[name].append(steps * batch / (time.perf_counter() - t))
    return {name: statistics.median(values) for name, values in samples.items()}


def throughput(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    prepared = datasets.prepare(args.dataset, args.data_root, args.cache)
    info = prepared.info
    data = loader.load_data(prepared.public_dir, list(info.mean), list(info.std), 0.1, 42, None, 0, device)
    tf = parse_transform("norm_32_flip")
    module = load_model_class(args.model)
    shape = (info.image_shape[0], tf.size, tf.size)
    gen = torch.Generator().manual_seed(0)

    # (a) ours: the runner's stream feeding the model's own learn()
    net_a = build(module, shape, info.num_classes, args.batch, device)
    stream = loader.TrainStream(data, args.batch, tf, gen)

    def ours(n: int) -> None:
        net_a.learn(stream.next_batch() for _ in range(n))

    # (b) hand-written: pre-transformed floats on the device, shuffled index slices, same learn()
    net_b = build(module, shape, info.num_classes, args.batch, device)
    x_all = loader.apply_transform(data.train_x, parse_transform("norm_32"), data.mean, data.std, False)
    y_all = data.train_y
    perm = torch.randperm(len(y_all), device=device)

    def hand(n: int) -> None:
        def batches():
            for i in range(n):
                start = (i * args.batch) % (len(y_all) - args.batch)
                idx = perm[start:start + args.batch]
                yield x_all[idx], y_all[idx]
        net_b.learn(batches())

    # (c) LEMUR's way: torchvision dataset-style PIL pipeline + DataLoader
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    images = np.load(prepared.public_dir / "train_x.npy")
    labels = np.load(prepared.public_dir / "train_y.npy")
    pipeline = transforms.Compose([transforms.Resize(tf.size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(list(info.mean), list(info.std))])

    class PilDataset(Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            img = images[i]
            pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
            return pipeline(pil), int(labels[i])

    dl = DataLoader(PilDataset(), batch_size=args.batch, shuffle=True, num_workers=args.workers,
                    pin_memory=device.type == "cuda", persistent_workers=args.workers > 0, drop_last=True)
    net_c = build(module, shape, info.num_classes, args.batch, device)
    dl_iter = iter(dl)

    def lemur(n: int) -> None:
        nonlocal dl_iter

        def batches():
            nonlocal dl_iter
            for _ in range(n):
                try:
                    x, y = next(dl_iter)
                except StopIteration:
                    dl_iter = iter(dl)
                    x, y = next(dl_iter)
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        net_c.learn(batches())

    return interleaved_rates({"ours": ours, "hand_written": hand, "dataloader": lemur}, args.steps, args.batch,
                             device)


async def first_step_latency(args: argparse.Namespace, sandbox: str, prestart_wait_s: float) -> dict[str, float]:
    """Submit LeNet5 and time submit -> first optimizer step (read from the runner's first_step event)."""
    root = Path(tempfile.mkdtemp())
    settings = Settings.from_env(root / "zoo.sqlite", data_root=args.data_root, sandbox=sandbox)
    settings.threads = max(1, min(4, (torch.get_num_threads())))
    store = await ZooStore.open(settings.zoo_path)
    out: dict[str, float] = {}
    try:
        async with JobQueue.running(settings, store, workers=False) as queue:
            request = EvalRequest(code=read_code("LeNet5"), dataset=args.dataset, n_trials=1, epochs=0.5,
                                  eval_every=0.5, time_budget_s=120, max_train_samples=512,
                                  prm={"batch": 64, "lr": 0.05, "momentum": 0.9, "transform": "norm_32"})
            for label in ("cold", "warm"):
                if label == "warm":
                    if not hasattr(queue.backend, "prestart"):
                        break
                    await anyio.sleep(prestart_wait_s)  # the previous job asked for a warm sandbox
                t = time.time()
                job_id, outcome = await queue.run_now(request.model_copy(update={"seed": len(out)}))
                first = queue.last_timings.get(job_id, {}).get("first_step")
                if outcome.status == "succeeded" and first:
                    out[label] = first - t
                else:
                    out[label] = float("nan")
                    print(f"  {sandbox}/{label}: {outcome.status} {outcome.error}", file=sys.stderr)
    finally:
        await store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="LeNet5")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the LEMUR-style loop")
    parser.add_argument("--data-root", type=Path, default=REPO / "data")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lemur-bench-cache")
    parser.add_argument("--sandboxes", default="process,docker")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model {args.model}; dataset {args.dataset}; batch {args.batch}; steps {args.steps}")

    rates = throughput(args, device)
    print(f"{'loop':14s} {'images/s':>10s}")
    for key, value in rates.items():
        print(f"{key:14s} {value:10.0f}")
    print(f"ours / hand-written = {rates['ours'] / rates['hand_written']:.2f} (target >= 0.95)")
    print(f"ours / DataLoader({args.workers} workers) = {rates['ours'] / rates['dataloader']:.2f} "
          "(target >= 3 on a GPU)")

    for sandbox in [s for s in args.sandboxes.split(",") if s]:
        try:
            lat = anyio.run(first_step_latency, args, sandbox, 8.0)
        except Exception as exc:  # noqa: BLE001 - a backend that does not work here is reported, not fatal
            print(f"submit -> first step [{sandbox}]: unavailable ({exc})")
            continue
        shown = ", ".join(f"{k} {v:.2f} s" for k, v in lat.items())
        print(f"submit -> first training step [{sandbox}]: {shown}")


if __name__ == "__main__":
    main()
