"""Tokens and attention at real scale: ViT-S/16 (timm, random init, 224 px, legacy exporter), the last block's
output, 16 neurons at the centre token, ``weights`` mode (attention held at the all-zeros reference), against the
strongest baseline a careful user would run in the same process: batched torch autograd of the same held-attention
network (``torch.autograd.grad`` with ``is_grads_batched``), its filters compared with fdsub's.

    python benchmarks/bench_tokens.py [--out benchmarks/results/tokens.json]

Needs torch and timm (development aids, never fdsub's dependencies); the export is cached in
~/.cache/fdsub-bench/tokens/. Prints a table of seconds and peak memory (VmHWM) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "fdsub-bench" / "tokens"
NEURONS, REPEATS = 16, 3


def _model():
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval()


def _export(model, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), str(path), opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamo=False)


def _held_network(model):
    """The network weights mode decodes, in torch: each attention matrix and each LayerNorm's 1/std (its mean over
    the tokens) held at the all-zeros input, GELU read as the identity (its asymptote)."""
    import torch

    held, hooks = {}, []

    def keep_norm(name):
        def hook(module, args, out):
            x = args[0].double()
            held[name] = (1 / torch.sqrt(x.var(dim=-1, unbiased=False) + module.eps)).mean().item()
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            hooks.append(module.register_forward_hook(keep_norm(name)))
    attention = {}
    for i, block in enumerate(model.blocks):
        def keep_attention(module, args, out, i=i):
            x = args[0]
            b, n, c = x.shape
            qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, c // module.num_heads).permute(2, 0, 3, 1, 4)
            q, k = qkv[0] * module.scale, qkv[1]
            attention[i] = (q @ k.transpose(-2, -1)).softmax(dim=-1).detach()
        hooks.append(block.attn.register_forward_hook(keep_attention))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()

    def norm(module, name, x):
        centred = x - x.mean(dim=-1, keepdim=True)
        return centred * held[name] * module.weight + module.bias

    def forward(image, last: int):
        x = model.patch_embed(image)
        x = model._pos_embed(x)
        for i, block in enumerate(model.blocks[: last + 1]):
            a = block.attn
            y = norm(block.norm1, f"blocks.{i}.norm1", x)
            b, n, c = y.shape
            v = a.qkv(y).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)[2]
            x = x + a.proj((attention[i] @ v).transpose(1, 2).reshape(b, n, c))
            x = x + block.mlp.fc2(block.mlp.fc1(norm(block.norm2, f"blocks.{i}.norm2", x)))
        return x

    return forward


PHOTOS = Path.home() / ".cache" / "fdsub-bench" / "train"  # 1920x1080 photographs (see benchmarks/README.md)
LOCAL_IMAGES, LOCAL_TOP = 256, 32


def _torch_local(model, images: np.ndarray, top: int, neurons: int, batch: int = 16):
    """A careful user's ``local``: the top instances (image, token) of each neuron of the last block's output (the
    best token of each image, the ``top`` best images), then their input gradients by batched autograd on the real
    network: images in batches of ``batch``, one backward pass per instance rank within an image."""
    import torch

    def blocks(x):
        return model.blocks(model._pos_embed(model.patch_embed(x)))

    with torch.no_grad():
        acts = torch.cat([blocks(torch.from_numpy(images[i : i + 32]))[:, :, :neurons]
                          for i in range(0, len(images), 32)])  # [N, T, K]
    best, token = acts.max(dim=1)  # per image and neuron
    order = best.argsort(dim=0, descending=True)[:top]  # [top, K]
    instances = [(int(order[r, k]), int(token[order[r, k], k]), k) for k in range(neurons) for r in range(top)]
    by_image = {}
    for n, (image, t, k) in enumerate(instances):
        by_image.setdefault(image, []).append((n, t, k))
    grads = np.zeros((len(instances), *images.shape[1:]), np.float32)
    wanted = sorted(by_image)
    for lo in range(0, len(wanted), batch):
        chunk = wanted[lo : lo + batch]
        x = torch.from_numpy(images[chunk]).requires_grad_(True)
        y = blocks(x)
        ranks = max(len(by_image[i]) for i in chunk)
        seeds = torch.zeros((ranks, *y.shape))
        for b, i in enumerate(chunk):
            for rank, (_, t, k) in enumerate(by_image[i]):
                seeds[rank, b, t, k] = 1.0
        (g,) = torch.autograd.grad(y, x, seeds, is_grads_batched=True)
        for b, i in enumerate(chunk):
            for rank, (n, _, _) in enumerate(by_image[i]):
                grads[n] = g[rank, b].numpy()
    return instances, grads


def run_local(model, loaded, target: str) -> dict:
    """``local`` at real scale: top 32 of 256 photographs, 16 neurons of the last block's output (512 instances),
    fdsub (capture and decode) against ``_torch_local`` in the same process; instance filters compared."""
    import torch

    import fdsub_onnx as fd

    names = sorted(PHOTOS.glob("*.png"))[:LOCAL_IMAGES]
    images = fd.open_images(str(PHOTOS), loaded.input_shape[1:], preset="torchvision")
    images = fd.ArrayImages(np.concatenate([b for _, b in images.batches(32)])[: len(names)])
    start = time.perf_counter()
    decoded = fd.decode(loaded, target, mode="local", images=images, top=LOCAL_TOP, neurons=f"0-{NEURONS - 1}",
                        per_instance=True)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode(False):
        instances, grads = _torch_local(model, images.array, LOCAL_TOP, NEURONS)
    theirs = time.perf_counter() - start
    found, errors = decoded.instances, []
    for n, (image, token, k) in enumerate(instances[:: LOCAL_TOP // 4]):  # a sample: the same (image, token) found
        slot = np.flatnonzero((found.image_index[k] == image) & (found.position[k, :, 1] == token))
        if len(slot):
            mine = decoded.instance_filters[k, slot[0]]
            want = grads[n * (LOCAL_TOP // 4)]
            errors.append(float(np.abs(mine - want).max() / np.abs(want).max()))
    return {"local_images": len(images), "local_top": LOCAL_TOP, "local_fdsub_s": ours, "local_torch_s": theirs,
            "local_ratio_torch_over_fdsub": theirs / ours, "local_instances_compared": len(errors),
            "local_max_rel_diff": max(errors) if errors else None}


def run(out: Path | None) -> dict:
    import torch

    import fdsub_onnx as fd

    torch.set_num_threads(2)
    path = CACHE / "vit_s16.onnx"
    model = _model()
    if not path.exists():
        _export(model, path)
    loaded = fd.load_model(str(path))
    target = "/blocks/blocks.11/Add_1_output_0"
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        decoded = fd.decode(loaded, target, neurons=f"0-{NEURONS - 1}", dtype="float32")
        times.append(time.perf_counter() - start)
    fdsub_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    token = decoded.position[1]  # the default: the patch grid's centre (7, 7), after the class token
    forward = _held_network(model)
    torch_times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        image = torch.zeros(1, 3, 224, 224, requires_grad=True)
        response = forward(image, 11)[0, token, :NEURONS]
        (grads,) = torch.autograd.grad(response, image, torch.eye(NEURONS),
                                       is_grads_batched=True)
        torch_times.append(time.perf_counter() - start)
    filters = grads.detach().numpy()[:, 0]  # [16, 3, 224, 224]
    (y, x), (ry, rx) = decoded.origin, decoded.filters.shape[2:]
    ours = np.zeros_like(filters)
    ours[:, :, y : y + ry, x : x + rx] = decoded.filters
    error = float(np.abs(ours - filters).max() / np.abs(filters).max())
    result = {"model": "vit_small_patch16_224 (timm, random init, 224 px, legacy exporter)", "layer": target,
              "token": int(token), "neurons": NEURONS, "fdsub_s": min(times), "torch_s": min(torch_times),
              "ratio_torch_over_fdsub": min(torch_times) / min(times), "filters_max_rel_diff": error,
              "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "fdsub_peak_gib": fdsub_peak}
    print(f"{'':28s}{'seconds':>10s}")
    print(f"{'fdsub weights (adjoint)':28s}{result['fdsub_s']:10.2f}")
    print(f"{'torch autograd, batched':28s}{result['torch_s']:10.2f}")
    print(f"ratio torch / fdsub {result['ratio_torch_over_fdsub']:.2f}; filters differ by {error:.1e} of their "
          f"largest value; VmHWM after fdsub {fdsub_peak:.2f} GiB, after both {result['peak_gib']:.2f} GiB")
    result |= run_local(model, loaded, target)
    print(f"local, top {LOCAL_TOP} of {result['local_images']} photographs, {NEURONS} neurons: fdsub "
          f"{result['local_fdsub_s']:.1f} s, torch autograd batched {result['local_torch_s']:.1f} s (ratio torch / "
          f"fdsub {result['local_ratio_torch_over_fdsub']:.2f}); {result['local_instances_compared']} instance filters "
          f"compared, largest difference {result['local_max_rel_diff']} of their largest value")
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    run(parser.parse_args().out)
