"""How many kept weights two OES masks share, against what random masks would share:

    python scripts/mask_overlap.py MASK_A MASK_B

MASK_A, MASK_B: .safetensors masks of this package, the authors' published .npz masks, or
"bundled" (oes_fast.masks.bundled()). Prints the kept count of each, the count kept by both,
and the count two random masks with the same per-parameter kept counts share on average
(sum over parameters of kept_a * kept_b / numel).
"""
import argparse

from mask_structure import load


def overlap(a: dict, b: dict) -> tuple[int, int, int, float]:
    """(kept in a, kept in b, kept in both, expected in both at random with the same per-parameter counts)."""
    if list(a) != list(b) or any(a[n].shape != b[n].shape for n in a):
        raise SystemExit("the two masks belong to different networks")
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    at_random = sum(int(a[n].sum()) * int(b[n].sum()) / a[n].numel() for n in a)
    return sum(int(t.sum()) for t in a.values()), sum(int(t.sum()) for t in b.values()), both, at_random


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mask_a")
    parser.add_argument("mask_b")
    args = parser.parse_args()
    kept_a, kept_b, both, at_random = overlap(load(args.mask_a), load(args.mask_b))
    print(f"kept: {kept_a:,} in {args.mask_a}, {kept_b:,} in {args.mask_b}")
    print(f"kept by both: {both:,} ({both / min(kept_a, kept_b):.1%} of the smaller); "
          f"at random with the same per-parameter counts: {at_random:,.0f}")


if __name__ == "__main__":
    main()
