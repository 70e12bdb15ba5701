"""How far below int8 a scalar codec could go: bytes and fidelity of k-bit quantisation of a store's features.

    python -m benchmarks.codec_study features/train.zarr

Decodes an evenly spaced subset of the store's samples and, per level, quantises each channel
uniformly between its min and max with k bits (8, 6, 5, 4), optionally takes the difference of
horizontal neighbours, compresses with zstd (level 9), and prints the bytes as a fraction of fp32
and the lowest Pearson r (decoded vs stored) per level.
"""

from __future__ import annotations

import argparse

import numpy as np
from numcodecs import Zstd

from storage import open_store


def quantise(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 (C, H, W), decoded float32) of per-channel min-max quantisation with ``bits`` bits."""
    low = values.min(axis=(1, 2), keepdims=True)
    high = values.max(axis=(1, 2), keepdims=True)
    step = np.maximum(high - low, 1e-12) / (2**bits - 1)
    codes = np.round((values - low) / step)
    return codes.astype(np.uint8), (codes * step + low).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--samples", type=int, default=24)
    args = parser.parse_args()
    store = open_store(args.store)
    indices = range(0, len(store), max(1, len(store) // args.samples))
    zstd = Zstd(level=9)
    raw_bytes, coded = 0, {}
    lowest_r: dict[tuple[int, int], float] = {}
    for index in indices:
        for stride, values in store.read(index).features.items():
            raw_bytes += values.nbytes
            for bits in (8, 6, 5, 4):
                codes, decoded = quantise(values, bits)
                delta = np.diff(codes.astype(np.int16), axis=2, prepend=0).astype(np.int8)
                coded[f"{bits}-bit"] = coded.get(f"{bits}-bit", 0) + len(zstd.encode(codes.tobytes()))
                coded[f"{bits}-bit + delta"] = coded.get(f"{bits}-bit + delta", 0) + len(zstd.encode(delta.tobytes()))
                r = float(np.corrcoef(decoded.ravel(), values.ravel())[0, 1])
                lowest_r[(bits, stride)] = min(lowest_r.get((bits, stride), 1.0), r)
    print(f"{len(indices)} samples of {args.store}")
    for name, size in coded.items():
        bits = int(name.split("-")[0])
        r = " ".join(f"P{s.bit_length() - 1}:{lowest_r[(bits, s)]:.5f}" for b, s in sorted(lowest_r) if b == bits)
        print(f"{name:<16} {size / raw_bytes:.3f} of fp32   lowest r {r}")


if __name__ == "__main__":
    main()
