"""Benchmark (issue 10): many uploads at once through hcx-images against one raw boto3 stream, on
an embedded stack of its own.

Starts `hcx-image up` in a temporary HCX_HOME and writes --count files of --size random bytes.
Then, in each round (--rounds), measures one raw boto3 `upload_file` process of one file, and
--count `hcx-image create --type DATABLOCK --path F --wait` processes started together, each until
its image is READY. The aggregate throughput of ours (all the bytes over the wall time of the
slowest) is printed as a ratio of the single raw stream's, with the image API's peak RSS meanwhile.
Nothing is asserted: the issue's target is printed next to the figure.

    .venv/bin/python bench/concurrent_uploads.py [--count 16] [--size 256M] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_harness import (  # noqa: E402
    HCX, MB, RssSampler, cpu_seconds, descendants, embedded_stack, human, machine, median, parse_size,
    prefect_database, random_file, run_timed,
)
from upload_vs_raw import Raw  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefect-database-url", default=None,
                        help="HCX_PREFECT_DATABASE_URL of the stack (default: its SQLite, which stalls up to 60 s under load)")
    parser.add_argument("--count", type=int, default=16, help="uploads at once (default 16)")
    parser.add_argument("--size", default="256M", help="size of each file, binary units (default 256M)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; medians are shown")
    args = parser.parse_args()
    size = parse_size(args.size)
    raw_times, ours_times, api_peaks, cpu_used = [], [], [], []
    with embedded_stack(**prefect_database(args.prefect_database_url)) as stack:
        raw = Raw(stack)
        files = [random_file(stack.home / f"file-{n}.raw", size) for n in range(args.count)]
        for round_ in range(args.rounds):
            tag = uuid.uuid4().hex[:6]
            print(f"round {round_ + 1}/{args.rounds}: one raw boto3 stream", file=sys.stderr, flush=True)
            (ran, _call) = raw.boto3("upload", f"single-{tag}", str(files[0]))
            raw.check_size(f"single-{tag}", size)
            raw.drop(f"single-{tag}")
            raw_times.append(ran.wall)

            print(f"round {round_ + 1}/{args.rounds}: {args.count} uploads at once", file=sys.stderr, flush=True)
            roles = _cpu_roles(stack)
            cpu_before = {role: cpu() for role, cpu in roles.items()}
            with RssSampler(stack.our_pids()) as sampler:
                start = time.perf_counter()
                clients = [subprocess.Popen([HCX, "create", "--name", f"many-{tag}-{n}", "--type", "DATABLOCK",
                                             "--driver", "raw", "--path", str(path), "--wait"],
                                            env=stack.env, cwd=str(stack.home), stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
                           for n, path in enumerate(files)]
                outcomes = [client.communicate() + (client.returncode,) for client in clients]
                ours_times.append(time.perf_counter() - start)
            cpu_used.append({role: cpu() - cpu_before[role] for role, cpu in roles.items()})
            failed = [err for _, err, rc in outcomes if rc != 0]
            if failed:
                raise SystemExit(f"{len(failed)} uploads failed; the first:\n{failed[0][-3000:]}")
            api_peaks.append(sampler.by_role().get("api", 0.0))
            for out, _, _ in outcomes:  # untimed: the disk stays small
                image_id = out.split("ID:")[1].split()[0]
                run_timed([HCX, "delete", image_id, "--wait"], stack.env).check()

    single, together = median(raw_times), median(ours_times)
    aggregate = args.count * size / MB / together
    print(f"\nconcurrent_uploads: {args.count} x {human(size)} of random bytes, SeaweedFS on loopback, "
          f"{args.rounds} round(s), medians")
    print(f"machine: {machine()}")
    print(f"{'one raw boto3 upload_file process':<52}{single:>8.2f} s{size / MB / single:>10.1f} MB/s")
    print(f"{f'{args.count} hcx-image create --wait at once (all READY)':<52}{together:>8.2f} s{aggregate:>10.1f} MB/s")
    ratio = aggregate / (size / MB / single)
    print(f"{'aggregate / one raw stream':<52}{ratio:>8.2f}x  [>= 0.8x]{'  met' if ratio >= 0.8 else '  missed'}")
    print(f"{'image API peak RSS meanwhile':<52}{max(api_peaks):>8.0f} MiB  [<= 300 MB]")
    last = cpu_used[-1]
    print(f"CPU seconds while they ran (last round; {os.cpu_count()} cores x {ours_times[-1]:.1f} s = "
          f"{os.cpu_count() * ours_times[-1]:.0f} s available):")
    for role, seconds in sorted(last.items(), key=lambda item: -item[1]):
        print(f"  {role:<50}{seconds:>8.1f} s")


def _cpu_roles(stack) -> dict:
    """What CPU each part of the stack has used so far, by role."""
    state = stack.reload()
    api = state["api"]["pid"]
    servers = [pid for pid in descendants([api]) if "flows.fork_server" in _cmd(pid)]
    return {
        "SeaweedFS (weed mini)": lambda: cpu_seconds(state["s3"]["pid"]),
        "image API": lambda: cpu_seconds(api),
        "flow runs (forked by the fork server)": lambda: sum(cpu_seconds(pid, reaped_children=True) for pid in servers),
        "Prefect server": lambda: sum(cpu_seconds(pid) for pid in [state["prefect"]["pid"],
                                                                   *descendants([state["prefect"]["pid"]])]),
        "hcx-image CLIs (ended)": lambda: _children_cpu(),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


if __name__ == "__main__":
    main()
