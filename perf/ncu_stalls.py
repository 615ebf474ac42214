"""Warp-state stall reasons from an Nsight Compute report, without Nsight Compute.

    python perf/ncu_stalls.py REPORT.ncu-rep [--all]

`ncu --page details` prints the Warp State section's cycles per issued instruction but not the
stall reasons behind it (the GUI draws them as a chart). The report keeps every collected metric
as a protobuf record (field 13: metric id, then the value as a double or an integer), the id
indexing a table of metric names (repeated field 1 strings). This finds both by their byte
patterns (no schema; checked on the reports of the device's ncu, 2025.x) and prints, for each
profiled launch that has the Warp State metrics, the cycles per issued instruction and the warps
stalled per issue cycle for each reason, largest first (--all: every reason, zeros included).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import struct

ANCHOR = b"smsp__average_warp_latency_per_inst_issued.ratio"
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")


def _varint(b: bytes, i: int) -> tuple[int, int]:
    r = s = 0
    while True:
        x = b[i]
        i += 1
        r |= (x & 0x7F) << s
        s += 7
        if x < 0x80:
            return r, i


def _entry_end(d: bytes, k: int) -> int | None:
    """End of the string entry (0x0a, varint length, printable bytes) starting at k, or None."""
    if d[k] != 0x0A:
        return None
    n, j = _varint(d, k + 1)
    if n == 0 or n > 400 or j + n > len(d) or not all(32 <= c < 127 for c in d[j : j + n]):
        return None
    return j + n


def metric_names(d: bytes) -> list[str]:
    """The table of metric names that holds ANCHOR: walk back entry by entry, then forward."""
    p = d.find(ANCHOR)
    if p < 0:
        raise ValueError("no Warp State metrics in this report (collect --section WarpStateStats)")
    start = next(k for k in range(p - 1, p - 4, -1) if _entry_end(d, k) == p + len(ANCHOR))
    while True:  # the previous entry is the one that ends where this one starts
        prev = [k for k in range(max(0, start - 402), start) if _entry_end(d, k) == start]
        if not prev:
            break
        start = prev[-1]
    names, k = [], start
    while (end := _entry_end(d, k)) is not None:
        names.append(d[_varint(d, k + 1)[1] : end].decode())
        k = end
    return names


def launches(d: bytes, names: list[str]) -> list[dict[str, float]]:
    """Metric values per profiled launch (a launch ends where a metric id repeats)."""
    out: list[dict[str, float]] = [{}]
    for m in re.finditer(rb"\x6a", d):
        i = m.start()
        try:
            _, j = _varint(d, i + 1)
            if d[j] != 0x08:
                continue
            mid, j = _varint(d, j + 1)
            if d[j] != 0x12 or mid >= len(names):
                continue
            _, j = _varint(d, j + 1)
            if d[j] == 0x19:
                value = struct.unpack_from("<d", d, j + 1)[0]
            elif d[j] in (0x08, 0x10, 0x18):
                value = float(_varint(d, j + 1)[0])
            else:
                continue
        except (IndexError, struct.error):
            continue
        name = names[mid]
        if name in out[-1]:
            out.append({})
        out[-1][name] = value
    return [m for m in out if ANCHOR.decode() in m]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=pathlib.Path)
    p.add_argument("--all", action="store_true", help="every stall reason, zeros included")
    args = p.parse_args()
    d = args.report.read_bytes()
    names = metric_names(d)
    for n, metrics in enumerate(launches(d, names)):
        stalls = sorted(
            ((v, STALL.match(k).group(1)) for k, v in metrics.items() if STALL.match(k)),
            reverse=True,
        )
        print(f"launch {n}: {metrics[ANCHOR.decode()]:.2f} cycles per issued instruction")
        for v, reason in stalls:
            if v >= 0.005 or args.all:
                print(f"  {v:6.3f}  {reason}")


if __name__ == "__main__":
    main()
