"""Structure of OES masks side by side: ours (.safetensors) and the authors' published ones (.npz).

    python scripts/mask_structure.py ../shared/data/oes_published_masks/pepper_density0.05.npz \
        runs/quality/pepper_mask.safetensors runs/quality/pepper_mask40k.safetensors bundled

Per mask: overall conv-weight density, the range of per-layer conv-weight densities, the first
three conv layers' densities, the largest fraction of a conv's output channels left with no
weight, and the fraction kept of conv biases, batch-norm weights and batch-norm biases. A
published mask is a numpy.packbits of the flat mask in the OES network's parameter order
(../shared/data/README.md); "bundled" is oes_fast.masks.bundled().
"""
import argparse
import os

import torch

import oes_fast


def load(path: str) -> dict[str, torch.Tensor]:
    if path == "bundled":
        return dict(oes_fast.masks.bundled().tensors)
    if path.endswith(".npz"):
        return dict(oes_fast.masks.load_published(path, oes_fast.models.skip_oes()).tensors)
    return dict(oes_fast.masks.load(path).tensors)


def structure(tensors: dict[str, torch.Tensor]) -> dict:
    conv_w = [n for n, t in tensors.items() if t.dim() == 4]
    conv_b = [n[:-len("weight")] + "bias" for n in conv_w if n[:-len("weight")] + "bias" in tensors]
    bn_w = [n for n, t in tensors.items() if t.dim() == 1 and n.endswith("weight")]
    bn_b = [n for n, t in tensors.items() if t.dim() == 1 and n.endswith("bias") and n not in conv_b]

    def kept(names):
        return sum(int(tensors[n].sum()) for n in names) / sum(tensors[n].numel() for n in names)

    density = [float(tensors[n].float().mean()) for n in conv_w]
    empty = [float((tensors[n].flatten(1).sum(1) == 0).float().mean()) for n in conv_w]
    return dict(conv=kept(conv_w), low=min(density), high=max(density), first=density[:3], empty=max(empty),
                conv_b=kept(conv_b), bn_w=kept(bn_w), bn_b=kept(bn_b))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("masks", nargs="+", help=".safetensors, published .npz, or 'bundled'")
    args = parser.parse_args()
    print("| mask | conv weights kept | per-layer range | first three convs | most empty output channels "
          "| conv biases | BN weights | BN biases |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for path in args.masks:
        s = structure(load(path))
        first = ", ".join(f"{d:.3f}" for d in s["first"])
        print(f"| {os.path.basename(path)} | {s['conv']:.4f} | {s['low']:.3f}-{s['high']:.3f} | {first} | "
              f"{s['empty']:.0%} | {s['conv_b']:.3f} | {s['bn_w']:.3f} | {s['bn_b']:.3f} |")


if __name__ == "__main__":
    main()
