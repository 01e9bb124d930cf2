# ruff: noqa: N999 - LEMUR model files are named after the model (CamelCase)
"""A light MobileNet-style network: a 3x3 stem, then depthwise-separable blocks (3x3 depthwise conv +
1x1 pointwise conv, each with batch norm and ReLU6), global average pooling, dropout and a linear layer.

Written for the LEMUR Net contract; padded strided convolutions keep every map at least 1 pixel, so
inputs from 8x8 to 299x299 work.
"""

import torch
from torch import nn


def supported_hyperparameters():
    return {'lr', 'momentum', 'dropout'}


class SeparableBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
            nn.BatchNorm2d(cin), nn.ReLU6())
        self.pointwise = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        self.stem = nn.Sequential(
            nn.Conv2d(in_shape[1], 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        plan = ((16, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 2))
        self.blocks = nn.Sequential(*[SeparableBlock(cin, cout, stride) for cin, cout, stride in plan])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(prm['dropout']),
                                  nn.Linear(128, out_shape[0]))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))

    def train_setup(self, prm):
        self.to(self.device)
        self.criteria = (nn.CrossEntropyLoss().to(self.device),)
        self.optimizer = torch.optim.SGD(self.parameters(), lr=prm['lr'], momentum=prm['momentum'])

    def learn(self, train_data):
        self.train()
        correct, seen, loss_sum = 0, 0, 0.0
        for inputs, labels in train_data:
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad()
            outputs = self(inputs)
            loss = self.criteria[0](outputs, labels)
            loss.backward()
            nn.utils.clip_grad_norm_(self.parameters(), 3)
            self.optimizer.step()
            correct += (outputs.argmax(1) == labels).sum().item()
            seen += labels.size(0)
            loss_sum += loss.item() * labels.size(0)
        if seen == 0:
            return None
        return correct / seen, loss_sum / seen
