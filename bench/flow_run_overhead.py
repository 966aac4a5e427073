"""Benchmark: the fixed cost of a flow run, with Prefect's own heartbeat thread and with ours
(flows/heartbeat.py), measured in the same run against a real Prefect API (the test harness).

An empty flow does no work, so its wall time is the engine's overhead. Prefect 3.8.8 joins a
heartbeat thread that sleeps in 1 s steps; ours waits on the stop event instead.

    .venv/bin/python bench/flow_run_overhead.py [--runs 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect import flow, flow_engine  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows import heartbeat  # noqa: E402


@flow
def empty_flow() -> int:
    return 1


def median_run_seconds(runs: int) -> float:
    took = []
    for _ in range(runs):
        start = time.perf_counter()
        empty_flow()
        took.append(time.perf_counter() - start)
    return statistics.median(took)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if not heartbeat.install():  # as flows/launcher.py does in a process that runs flows
        sys.exit(f"the heartbeat change is not installed (Prefect {heartbeat.PATCHED_PREFECT_VERSION} only)")
    ours = flow_engine._send_heartbeats
    with prefect_test_harness(server_startup_timeout=120):
        empty_flow()  # warm up the client and the flow's registration
        patched = median_run_seconds(args.runs)
        flow_engine._send_heartbeats = heartbeat.PREFECT_SEND_HEARTBEATS
        try:
            original = median_run_seconds(args.runs)
        finally:
            flow_engine._send_heartbeats = ours
    print(f"\nempty flow run, median of {args.runs} (Prefect {heartbeat.PATCHED_PREFECT_VERSION}, test harness API)")
    print(f"{'heartbeat':<32}{'s per run':>10}")
    print(f"{'baseline: Prefect own':<32}{original:>10.3f}")
    print(f"{'hcx flows/heartbeat.py':<32}{patched:>10.3f}")
    print(f"\nratio vs baseline: x{patched / original:.2f} ({original - patched:.2f} s saved per flow run)")


if __name__ == "__main__":
    main()
