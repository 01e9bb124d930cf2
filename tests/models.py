"""Small model files for evaluation tests: a tiny good net and broken variants, each provoking one
failure kind. Written for these tests (LeNet-style, a few thousand parameters)."""

from __future__ import annotations

TINY = '''
import torch
import torch.nn as nn


def supported_hyperparameters():
    return {{"lr", "momentum"}}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        channels = in_shape[1]
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(8 * 16, out_shape[0])

    def forward(self, x):
        {forward_extra}
        return self.head(torch.flatten(self.features(x), 1))

    def train_setup(self, prm):
        self.to(self.device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=prm["lr"], momentum=prm["momentum"])

    def learn(self, train_data):
        {learn_extra}
        total = 0.0
        for inputs, labels in train_data:
            self.optimizer.zero_grad()
            loss = self.criterion(self(inputs), labels)
            loss.backward()
            self.optimizer.step()
            total += float(loss)
        return {learn_return}
'''


def tiny(forward_extra: str = "pass", learn_extra: str = "pass", learn_return: str = "total",
         header: str = "") -> str:
    return header + TINY.format(forward_extra=forward_extra, learn_extra=learn_extra, learn_return=learn_return)


GOOD = tiny()
# the same network written differently (comments, blank lines): same normalized code? No: other
# whitespace and comments only, so it must map to the same model.
GOOD_REFORMATTED = "# a comment that changes nothing\n" + GOOD.replace("\n\n\n", "\n\n\n\n")

SYNTAX = GOOD.replace("def forward(self, x):", "def forward(self, x)")
NO_NET = ("import torch\n\ndef supported_hyperparameters():\n    return {'lr'}\n\n"
          "class Model(torch.nn.Module):\n    pass\n")
WRONG_SHAPE = GOOD.replace("return self.head(torch.flatten(self.features(x), 1))",
                           "return self.head(torch.flatten(self.features(x), 1))[:, :3]")
RAISES_IN_LEARN = tiny(learn_extra="raise ValueError('boom in learn')")
NAN_LOSS = tiny(learn_return="float('nan')")
MISSING_MODULE = tiny(header="import tensorflow_that_does_not_exist\n")
OOM = tiny(learn_extra="hog = [bytearray(256 << 20) for _ in range(64)]")
INFINITE_FORWARD = tiny(forward_extra="while True:\n            pass")
EXIT_IN_LEARN = tiny(learn_extra="import os; os._exit(3)")
# Slow by sleeping per batch, not by computing: an epoch takes about 0.1 s x batches on any machine
# (digits: ~8 s per epoch at batch 16, ~4 s at batch 32), so budget, cancel and shutdown tests see it
# mid-training however fast the CPU is.
SLOW = tiny(learn_extra="import time\n        train_data = (time.sleep(0.1) or batch for batch in train_data)",
            learn_return="total")

# Tries to cheat: read test labels from wherever they might be, patch the runner, forge outputs.
CHEAT = tiny(learn_extra='''import glob, os, sys, numpy as np
        found = []
        roots = [os.environ.get("HOME", "/"), "/tmp", "/root", "/mnt", "/work/main/data", "/usr/share/datasets"]
        for pattern in [r + "/**/test_y.npy" for r in roots] + [r + "/**/*.sqlite" for r in roots] + [
                sys.prefix + "/lib/python3.11/site-packages/sklearn/datasets/data/digits.csv.gz"]:
            try:
                found += glob.glob(pattern, recursive=True)[:5]
            except Exception:
                pass
        print("CHEAT found", found)
        for mod in list(sys.modules.values()):
            name = getattr(mod, "__name__", "")
            if name.startswith("sandbox.runner"):
                for attr in dir(mod):
                    if "acc" in attr.lower():
                        try:
                            setattr(mod, attr, lambda *a, **k: 1.0)
                        except Exception:
                            pass
        return None  # no training at all: any accuracy above chance would have to be stolen''',
             learn_return="None")

# Runs out of memory while training at batches above 32 only: forward() in training mode then asks for
# batch x 256 MiB more (16 GiB at batch 64), beyond any test sandbox's memory limit; the check's batch of
# 16, evaluation (eval mode) and batches of 32 fit.
BATCH_HOG = tiny(forward_extra="if self.training and x.shape[0] > 32:\n"
                               "            torch.ones(x.shape[0], 256 << 20, dtype=torch.uint8)")

# GOOD's network written by someone else: other names for the layers, the loss, the loop variables and
# the accumulator, another layout. Another normalized code, the same architecture fingerprint and the
# same training (SGD with lr and momentum on cross-entropy).
GOOD_RENAMED = '''
import torch
from torch import nn


def supported_hyperparameters():
    """Searched by the server."""
    return {"lr", "momentum"}


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.conv = nn.Conv2d(in_shape[1], 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Linear(8 * 16, out_shape[0])

    def forward(self, images):
        features = self.pool(self.act(self.conv(images)))
        return self.classifier(torch.flatten(features, 1))

    def train_setup(self, prm):
        self.to(self.device)
        self.loss_fn = nn.CrossEntropyLoss()
        self.opt = torch.optim.SGD(self.parameters(), lr=prm["lr"], momentum=prm["momentum"])

    def learn(self, loader):
        running = 0.0
        for images, targets in loader:
            self.opt.zero_grad()
            loss = self.loss_fn(self(images), targets)
            loss.backward()
            self.opt.step()
            running += float(loss)
        return running
'''
# The same network trained otherwise (Adam): the same fingerprint, another training code.
GOOD_ADAM = GOOD_RENAMED.replace('torch.optim.SGD(self.parameters(), lr=prm["lr"], momentum=prm["momentum"])',
                                 'torch.optim.Adam(self.parameters(), lr=prm["lr"])')

# Learns for one segment, then its loss turns NaN: the only trial fails after a curve point
NAN_AFTER_FIRST_POINT = tiny(learn_extra="self.calls = getattr(self, 'calls', 0) + 1",
                             learn_return="total if self.calls < 2 else float('nan')")
