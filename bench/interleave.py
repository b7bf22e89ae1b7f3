"""``make bench-interleave``: CPU per request of a few rows in short slices, interleaved.

    python bench/interleave.py --targets gateway-keys-off,gateway-idem,gateway-idem-64k

``make bench`` measures its rows one after the other, ~20 s apart; on a shared
2-vCPU machine the CPU time per request drifts by more than a keyed request
costs between two of them. This starts the same rows as ``make bench`` (one
process each, the same upstream, tokens and keys), fills them with
``--warm`` seconds of load, then measures every row for ``--slice`` seconds,
in turn, ``--slices`` times (forward, then backward, so that no row is always
measured first), and sets each slice against the first row's in the same turn:
the median of those ratios and its quartiles. Nothing is checked here but wrk's
count; ``make bench`` is the run that checks the answers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

import bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--targets",
        type=bench.target_list,
        default=["gateway-keys-off", "gateway-keys-off-burn", "gateway-idem", "gateway-idem-64k"],
        help="gateway rows of make bench, the first the reference "
        "[gateway-keys-off,gateway-keys-off-burn,gateway-idem,gateway-idem-64k]",
    )
    parser.add_argument("--slices", type=int, default=12, help="turns over every row [12]")
    parser.add_argument("--slice", type=float, default=3, help="wrk run per row per turn, s [3]")
    parser.add_argument("--warm", type=float, default=6, help="unrecorded load per row first [6]")
    parser.add_argument("--conns", type=int, default=50, help="wrk connections [50]")
    parser.add_argument(
        "--port-base", type=int, default=19280, help="as make bench's, another default [19280]"
    )
    args = parser.parse_args(argv)
    if any(not name.startswith("gateway") for name in args.targets):
        parser.error("only gateway rows: CPU per request is read from the gateway's processes")
    # make bench's own options, so that every setting this tool does not name is its default
    run = bench.Bench(bench.parser().parse_args([
        "--targets", ",".join(args.targets), "--port-base", str(args.port_base),
        "--conns", str(args.conns), "--duration", str(args.slice), "--warmup", "0",
        "--rate", "0",
    ]))  # fmt: skip
    targets = sorted(run.start(), key=lambda t: args.targets.index(t.name))
    try:
        for target in targets:  # every memory store full before the first slice
            run.wrk(target, args.warm, run.key_prefix(target, 0, "warm"))
        cpu: dict[str, list[float]] = {t.name: [] for t in targets}
        for turn in range(args.slices):
            for target in targets if turn % 2 == 0 else targets[::-1]:
                pids = common.tree(target.root)
                before = common.cpu_seconds(pids)
                data, _, _ = run.wrk(target, args.slice, run.key_prefix(target, turn + 1, "wrk"))
                used = common.cpu_seconds(pids) - before
                cpu[target.name].append(used / max(data["requests"], 1) * 1e6)
            print(f"[interleave] turn {turn + 1}: "
                  + ", ".join(f"{name} {v[-1]:.1f}" for name, v in cpu.items()),
                  file=sys.stderr, flush=True)  # fmt: skip
    finally:
        run.stop()
        run.forget_work()  # (a temp dir: these tools take no --workdir)
    print(report(cpu, args))
    return 0


def report(cpu: dict[str, list[float]], args: argparse.Namespace) -> str:
    first, *_ = cpu
    lines = [
        f"CPU µs per request, {args.slices} turns of {args.slice:g} s per row "
        f"(wrk -c{args.conns}), interleaved; each slice against `{first}` in the same turn:",
        "",
        f"| target | CPU µs/req (median) | × {first}: median | quartiles |",
        "|---|---|---|---|",
    ]
    for name, values in cpu.items():
        ratios = [v / ref for v, ref in zip(values, cpu[first], strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios * 3)
        lines.append(f"| {name} | {statistics.median(values):.1f} "
                     f"| {statistics.median(ratios):.3f} | {q1:.3f}-{q3:.3f} |")  # fmt: skip
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    lines.append(f"\nMachine: load average {load} at the end; gateway: {common.git_state()}.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
