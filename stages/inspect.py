"""``pkd-offline inspect``: a store's manifest, sizes per level and content digest."""

from __future__ import annotations

import json

from storage import describe, open_store


def layout_text(layout: dict) -> str:
    """One line naming the layout; for a projected one, which teacher levels serve which student levels."""
    if layout["name"] != "projected":
        return "full (every level the teacher's map)"
    pairs = ", ".join(f"P{t.bit_length() - 1}->P{s.bit_length() - 1}" + ("" if t in layout["projected"] else " (map)")
                      for s, t in layout["pairs"])
    return (f"projected for {layout['pairing']} pairs {pairs}; {layout['resize']}, "
            f"batches padded to x{layout['size_divisor']}")


def inspect_store(path: str, *, as_json: bool = False) -> str:
    """The store's summary as JSON (``samples``, ``digest``, sizes) or as a short human-readable table."""
    reader = open_store(path)
    summary = describe(reader)
    manifest = reader.manifest
    if as_json:
        return json.dumps({**summary, "teacher": manifest.teacher, "views": manifest.views,
                           "codec_side": manifest.codec_side,
                           "dataset": {k: v for k, v in manifest.dataset.items() if k != "image_ids"}})
    side = manifest.codec_side
    codec = summary["codec"] + (f", step {side['step']:g} channel std at the finest level, basis in {side['file']}"
                                if side else "")
    lines = [f"store      {path} ({summary['format']}, codec {codec})",
             f"teacher    {manifest.teacher}",
             f"samples    {summary['samples']} in {summary['shards']} shards "
             f"({len(manifest.image_ids)} images x {manifest.n_views} views, {len(manifest.skipped)} skipped)",
             f"size       {summary['bytes_total'] / 1e6:.2f} MB, {summary['bytes_per_image'] / 1e3:.1f} kB per sample",
             f"layout     {layout_text(manifest.layout)}",
             "level  stride  channels  stored      kB/sample  x smaller than fp32 map"]
    for stride, level in sorted(summary["levels"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"P{int(stride).bit_length() - 1:<5} {int(stride):<7} {level['channels']:<9} {level['stored']:<11} "
                     f"{level['bytes_per_image'] / 1e3:<10.1f} {level['compression_ratio_vs_fp32']:.2f}")
    lines.append(f"digest     {summary['digest']}")
    return "\n".join(lines)
