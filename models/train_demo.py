"""Train models/demo.onnx: a small 4-conv CNN that reads the glyphs of ``builtin:glyphs``.

Why: the bundled demo model should have *learned* filters, so that decoding it shows what the
supplementary experiment of Rafegas & Vanrell (arXiv 1511.05084) shows on a character-recognition
CNN: oriented edges and colour blobs in conv1, then strokes, corners and curves, then letter parts
as the receptive field grows layer by layer. Hand-made weights cannot show that.

How: every training image is drawn in the style of ``builtin:glyphs`` (``fdsub_onnx.data.images``; its
glyph masks, font and colour rules are imported, not copied): a solid or graded background, one
letter or digit 30-80 % of the image high in a contrasting colour at a random position. The label
is the character case-folded into 36 classes (A-Z, 0-9; 'a' and 'A' are one class, since glyphs
are cropped to their ink and scaled, so size does not tell case apart). Fresh images are rendered
every epoch, each from its own seeded generator, so a run is repeatable. The network is

    image [N,3,64,64] (0..1 RGB) -> conv1 5x5 16 -> ReLU -> MaxPool -> conv2 3x3 32 -> ReLU -> MaxPool
        -> conv3 3x3 64 -> ReLU -> MaxPool -> conv4 3x3 128 -> ReLU -> GlobalAveragePool -> Gemm -> logits [N,36]

(MaxPool 4x4, stride 2, pad 1), trained with BatchNorm after every conv (folded into the conv
weights before export), SGD and a one-cycle learning rate for 6 epochs of 20,000 images; it
reaches 99.8 % on 4,000 held-out images (chance 2.8 %). It is exported with the TorchScript
exporter at opset 13 with a dynamic batch dimension; the tensors are renamed conv1, relu1,
pool1, ..., conv4, relu4, gap, flat, logits, so that ``fdsub decode models/demo.onnx --layer conv4``
finds them. The script prints progress (at least every 10 s), the held-out
accuracy and the largest difference between torch and onnxruntime outputs.

PyTorch is needed only here, never by fdsub_onnx. Retrain (4-5 minutes on one CPU core):

    python3 -m venv /tmp/bench
    /tmp/bench/bin/pip install torch==2.13.0 onnx onnxruntime numpy pillow
    /tmp/bench/bin/python models/train_demo.py            # writes models/demo.onnx
    /tmp/bench/bin/python models/train_demo.py out.onnx   # or elsewhere
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

try:
    from fdsub_onnx.data import images as _images
except ImportError:  # run from a checkout without fdsub-onnx installed: use the one beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fdsub_onnx.data import images as _images

SEED = 2024
OPSET = 13
SIZE = 64
CLASSES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
CHANNELS = (16, 32, 64, 128)
EPOCHS = 6
TRAIN_PER_EPOCH = 20_000
HELD_OUT = 4_000
BATCH = 128
LR = 0.05  # peak of the one-cycle schedule, SGD with Nesterov momentum 0.9
WEIGHT_DECAY = 5e-4
# MaxPool kernel, stride, padding. Overlapping 4x4 windows at stride 2 cover every pixel equally often, so
# the weights decoding (which reads MaxPool as an average) shows neither 2x2 blocks nor a 3x3 checkerboard.
POOL = (4, 2, 1)
# Multiplies the default initialisation of conv1..conv4. BatchNorm makes each conv's scale irrelevant, so a
# small start lets the learned part of the filters outgrow the initial noise (plain Adam/SGD from the default
# initialisation left conv1 as 5x5 colour noise).
INIT_SCALE = (0.01, 0.1, 0.1, 0.1)
THREADS = 1  # one thread: no slower than two on a 2-core machine, and far faster while other jobs run
PROGRESS_SECONDS = 10  # at most this long between two progress lines (a run takes minutes)


class Progress:
    """One line on stdout at most every PROGRESS_SECONDS, so that a long step never looks stuck."""

    def __init__(self):
        self.start = self.last = time.time()

    def say(self, text: str, force: bool = False) -> None:
        now = time.time()
        if force or now - self.last >= PROGRESS_SECONDS:
            print(f"[{now - self.start:5.0f} s] {text}", flush=True)
            self.last = now


PROGRESS = Progress()


def render(rng: np.random.Generator, height: int = SIZE, width: int = SIZE) -> tuple[np.ndarray, int]:
    """One labelled image (float32 [3, H, W] in 0..1, class index) drawn like ``_images._glyphs``.

    Background, glyph colour, size and placement are ``_glyphs``' own (``glyph_background``,
    ``paste_glyph``); the only change is that there is a single glyph, whose class is known.
    """
    image, light_background = _images.glyph_background(rng, height, width)
    label = int(rng.integers(len(CLASSES)))
    char = CLASSES[label]
    if char.isalpha() and rng.random() < 0.5:
        char = char.lower()
    assert char in _images._GLYPH_CHARS
    _images.paste_glyph(rng, image, char, light_background)
    return np.clip(image, 0.0, 1.0).astype(np.float32).transpose(2, 0, 1), label


def dataset(split: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` labelled images; image i of ``split`` comes from its own generator seeded (SEED, split, i)."""
    images, labels = [], []
    for i in range(count):
        image, label = render(np.random.default_rng([SEED, split, i]))
        images.append(image)
        labels.append(label)
        PROGRESS.say(f"rendering images of split {split}: {i + 1}/{count}")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


class DemoNet(nn.Module):
    """The training network: four conv + BatchNorm + ReLU blocks, global average pool, linear classifier."""

    def __init__(self, channels=CHANNELS, classes: int = len(CLASSES)):
        super().__init__()
        ins = (3, *channels[:-1])
        kernels = (5, 3, 3, 3)
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, k, padding=k // 2, bias=False) for i, o, k in zip(ins, channels, kernels)
        )
        with torch.no_grad():
            for conv, scale in zip(self.convs, INIT_SCALE):
                conv.weight.mul_(scale)
        self.norms = nn.ModuleList(nn.BatchNorm2d(o) for o in channels)
        self.fc = nn.Linear(channels[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = torch.relu(norm(conv(x)))
            x = nn.functional.max_pool2d(x, *POOL) if i < 3 else x.mean((2, 3))
        return self.fc(x)


class ExportNet(nn.Module):
    """The same network with BatchNorm folded into conv1..conv4, in the layout exported to ONNX."""

    def __init__(self, net: DemoNet):
        super().__init__()
        fused = [torch.nn.utils.fusion.fuse_conv_bn_eval(c, n) for c, n in zip(net.eval().convs, net.norms)]
        self.conv1, self.conv2, self.conv3, self.conv4 = fused
        self.pool = nn.MaxPool2d(*POOL)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = net.fc

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(image)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = self.pool(torch.relu(self.conv3(x)))
        x = self.gap(torch.relu(self.conv4(x)))
        return self.fc(torch.flatten(x, 1))


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return (predicted == y).float().mean().item()


def train() -> tuple[DemoNet, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    net = DemoNet()
    steps = EPOCHS * (TRAIN_PER_EPOCH // BATCH)
    optimiser = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=LR, total_steps=steps, pct_start=0.2)
    PROGRESS.say(f"rendering {HELD_OUT} held-out images, then {EPOCHS} epochs of {TRAIN_PER_EPOCH}", force=True)
    held_out = dataset(0, HELD_OUT)
    start = time.time()
    for epoch in range(EPOCHS):
        x, y = dataset(epoch + 1, TRAIN_PER_EPOCH)
        order = torch.randperm(len(x))
        net.train()
        total = 0.0
        for b in range(TRAIN_PER_EPOCH // BATCH):
            pick = order[b * BATCH : (b + 1) * BATCH]
            loss = nn.functional.cross_entropy(net(x[pick]), y[pick], label_smoothing=0.05)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
            PROGRESS.say(f"epoch {epoch + 1}/{EPOCHS}: batch {b + 1}/{TRAIN_PER_EPOCH // BATCH}, "
                         f"loss {total / (b + 1):.3f}")
        acc = accuracy(net, *held_out)
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {total / (b + 1):.3f}, held-out accuracy {acc:.3f} "
              f"({time.time() - start:.0f} s)", flush=True)
    return net, held_out


def export(net: ExportNet, path: str) -> None:
    """Export at opset 13 (dynamic batch), then name the tensors conv1, relu1, pool1, ..., conv4, relu4, gap, flat."""
    net.eval()
    dummy = torch.zeros(1, 3, SIZE, SIZE)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but still the simplest at opset 13
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net, (dummy,), path, dynamo=False, opset_version=OPSET, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=True,
        )
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 4 and ops[-1] == "Gemm", ops
    short = {"Conv": "conv", "Relu": "relu", "MaxPool": "pool", "GlobalAveragePool": "gap", "Flatten": "flat"}
    renames, seen = {}, {}
    for node in model.graph.node[:-1]:  # the last node (Gemm) already writes "logits"
        stem = short.get(node.op_type, node.op_type.lower())
        seen[stem] = seen.get(stem, 0) + 1
        renames[node.output[0]] = stem if stem in ("gap", "flat") else f"{stem}{seen[stem]}"
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
        node.name = f"/{node.output[0]}/{node.op_type}"
    for info in model.graph.value_info:
        info.name = renames.get(info.name, info.name)
    model.producer_name = "fdsub-demo (models/train_demo.py)"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def check(path: str, net: nn.Module, x: torch.Tensor) -> float:
    """Largest |torch - onnxruntime| over the logits of ``x``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": x.numpy()})[0]
    with torch.no_grad():
        want = net.eval()(x).numpy()
    return float(np.abs(got - want).max())


def main(path: str = str(Path(__file__).with_name("demo.onnx"))) -> None:
    start = time.time()
    net, (x, y) = train()
    fused = ExportNet(net)
    acc = accuracy(fused, x, y)
    export(fused, path)
    diff = check(path, fused, x[:256])
    print(f"held-out accuracy {acc:.3f} on {len(x)} images, {len(CLASSES)} classes (chance {1 / len(CLASSES):.3f})")
    print(f"max |torch - onnxruntime| over 256 held-out logits: {diff:.2e}")
    print(f"wrote {path} ({Path(path).stat().st_size} bytes) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
