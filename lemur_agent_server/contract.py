"""The Net contract and hyperparameter conventions, as text an agent reads.

One source for `list_catalog`, the `design_model` prompt and the README, so they never disagree.
"""

from __future__ import annotations

from sandbox import protocol

NET_CONTRACT = """\
A model file (LEMUR nn-dataset compatible; LEMUR's own files run unchanged):

    import torch, torch.nn as nn

    def supported_hyperparameters():
        return {'lr', 'momentum'}          # names the model reads from prm; values lie in [0, 1]

    class Net(nn.Module):
        def __init__(self, in_shape: tuple, out_shape: tuple, prm: dict, device: torch.device):
            super().__init__()
            # in_shape = (1, C, H, W): one sample with a batch dimension of 1, AFTER the transform's
            # resize (e.g. norm_32 -> H = W = 32); out_shape = (num_classes,)
            # prm holds every declared hyperparameter plus 'batch', 'epoch' and 'transform'
            self.device = device
            ...

        def train_setup(self, prm: dict):
            self.to(self.device)
            self.criteria = (nn.CrossEntropyLoss().to(self.device),)
            self.optimizer = torch.optim.SGD(self.parameters(), lr=prm['lr'], momentum=prm['momentum'])

        def learn(self, train_data):
            # iterate (inputs, labels) batches already on self.device and transformed; step the optimizer.
            # May return (train_accuracy, train_loss), a loss, or None.
            for inputs, labels in train_data:
                self.optimizer.zero_grad()
                loss = self.criteria[0](self(inputs), labels)
                loss.backward()
                self.optimizer.step()

        def forward(self, x):
            return ...                       # logits of shape (batch, num_classes)

Rules: no network, no files outside the working directory, no reading of labels other than those
passed to learn(); accuracy is computed by the server from your predictions on held-out test images.
"""

HYPERPARAMETERS = {
    "lr": "learning rate; searched log-uniform in [1e-5, 1]",
    "momentum": "searched uniform in [0, 1]",
    "dropout": "searched uniform in [0, 0.5]",
    "batch": "batch size, searched over powers of two 2^4..2^8 (fix it with prm={'batch': 64})",
    "epoch": "number of epochs (set from the submission's `epochs`; a LEMUR prm's `epoch` stands for `epochs` "
             "when that is not given)",
    "transform": "input transform; unless fixed in prm, searched over the dataset's default transform and the "
                 "others of the same size (e.g. norm_32, norm_32_flip, echo_32, echo_32_flip); pass "
                 "search_space={'transform': {'choices': [...]}} for larger resizes",
    "other": "any other declared name is searched uniform in [0, 1]",
}

TRANSFORM_HELP = (
    "norm_N resizes images to N x N and normalizes with the dataset's mean/std; norm_N_flip also flips "
    "training batches horizontally at random; echo_N resizes without normalizing; norm, norm_flip, echo and "
    "echo_flip keep the dataset's own size (no resize). Classic nets with large strides (AlexNet: 11x11 "
    "stride 4) need norm_224 or larger. complex[_N][_flip]: pixels in [0, 1] as complex64 for complex-valued "
    "nets; soft_pad: zero-pad to 800 x 800; bf-v1-RandomCrop_Pad_RandomHorizontalFlip: random 29 x 29 crop, "
    "pad 1, flip with p=0.64, resize to 64, normalize. These are used only when named in prm or search_space."
)

# The search_space format, quoted by the submit tool's description; validated by the one function both
# the server and the sandbox call (sandbox.protocol.validate_search_space).
SEARCH_SPACE_HELP = protocol.SEARCH_SPACE_FORMAT
