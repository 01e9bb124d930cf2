# ruff: noqa: N999 - LEMUR model files are named after the model (CamelCase)
"""A small VGG-style CNN: three blocks of two 3x3 convolutions with batch norm, each followed by max
pooling, global average pooling and a dropout + linear classifier.

Written for the LEMUR Net contract; pooling is skipped once the feature map is 1 pixel wide, so inputs
from 8x8 to 299x299 work.
"""

import torch
import torch.nn.functional as F
from torch import nn


def supported_hyperparameters():
    return {'lr', 'momentum', 'dropout'}


def conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Net(nn.Module):
    def __init__(self, in_shape, out_shape, prm, device):
        super().__init__()
        self.device = device
        widths = (16, 32, 64)
        blocks, cin = [], in_shape[1]
        for width in widths:
            blocks.append(nn.Sequential(conv_bn(cin, width), conv_bn(width, width)))
            cin = width
        self.blocks = nn.ModuleList(blocks)
        self.dropout = nn.Dropout(prm['dropout'])
        self.fc = nn.Linear(cin, out_shape[0])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            if min(x.shape[-2:]) >= 2:
                x = F.max_pool2d(x, 2)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(self.dropout(x))

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
