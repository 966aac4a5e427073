"""Benchmark (issue 10): how long each CLI command takes, as a whole process, median and p95 over
repeated runs, on an embedded stack of its own.

Starts `hcx-image up` in a temporary HCX_HOME and registers --images READY rows (default 1,000)
through the catalog's own insert path (catalog.rules.new_image + catalog.operations.register, as a
flow registers an image; their objects are not written: these rows only make `list` long). Then
times, each command a fresh process from spawn to exit, after --warmup untimed runs:

  floor   `python -c pass`; `python -c 'httpx.get(API/health)'`; `hcx-image --help`; and in this
          process, a reused httpx client's GET /health and GET /api/v1/images (the server alone)
  fast    `hcx-image list` (every image: the administrator sees all), `show ID`, `disable ID` /
          `enable ID` (alternately, on a READY image), `rename ID NAME`: --repeat runs each (20)
  flows   `create --path <1 MiB file> --wait`, `clone ID --wait` of a 64 MiB image, `delete ID
          --wait` (of those clones): --slow-repeat runs each (5)

The targets of issue 10 are printed next to the figures; nothing is asserted.

    .venv/bin/python bench/op_latency.py [--images 1000] [--repeat 20] [--slow-repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_harness import (  # noqa: E402
    HCX, MiB, ROOT, Ran, Stack, embedded_stack, machine, median, p95, prefect_database, random_file, run_timed,
)

# Run with the stack's environment (its HCX_HOME, so its catalog and directory), from the repository.
REGISTER = """
import getpass, sys, time, uuid
from catalog import operations, rules
from catalog.identity import open_directory
from catalog.model import Bus, DiskFormat, ImageState, ImageType
from catalog.store import open_catalog

count, prefix, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
catalog = open_catalog()
actor = open_directory().actor(getpass.getuser())  # the administrator `hcx-image up` made
start = time.perf_counter()
for n in range(count):
    upload_id = uuid.uuid4().hex
    image = rules.new_image(actor=actor, name=f"{prefix}-{n:05d}", type_=ImageType.DATABLOCK, persistent=False,
                            bus=Bus.VIRTIO, format_=DiskFormat.RAW, datastore="default", run_id=None,
                            upload_id=upload_id, state=ImageState.READY, size=size, virtual_size=size,
                            source=f"s3://hcx-images/images/{upload_id}", source_etag='"bench"')
    operations.register(catalog, image, message="registered by bench/op_latency.py", limit_bytes=None)
print(f"{count} rows in {time.perf_counter() - start:.1f} s")
"""

HEALTH = "import sys, httpx; httpx.get(sys.argv[1] + '/health', timeout=30).raise_for_status()"


class Series:
    """Wall times (seconds) by label, in the order measured."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.times: dict[str, list[float]] = {}
        self.notes: dict[str, str] = {}

    def process(self, label: str, repeat: int, argv: Callable[[int], list], stack: Stack,
                after: Callable[[int, Ran], None] | None = None, warm: bool = True) -> list[Ran]:
        """`argv(i)` as a whole process, `warmup` + `repeat` times (the warm-up runs untimed);
        `after(i, ran)` untimed after each run."""
        print(f"  {label} x{repeat}", file=sys.stderr, flush=True)
        done = []
        for i in range(-(self.warmup if warm else 0), repeat):
            ran = run_timed([str(a) for a in argv(i)], stack.env, cwd=str(stack.home)).check()
            if after:
                after(i, ran)
            if i >= 0:
                self.times.setdefault(label, []).append(ran.wall)
                done.append(ran)
        return done

    def alternate(self, labels: tuple[str, ...], repeat: int, argvs: list[list], stack: Stack) -> None:
        """Each argv in turn, as one cycle (disable, then enable: each leaves what the next needs),
        `warmup` + `repeat` cycles; each command timed under its label."""
        print(f"  {' / '.join(labels)} x{repeat}", file=sys.stderr, flush=True)
        for i in range(-self.warmup, repeat):
            for label, argv in zip(labels, argvs):
                ran = run_timed([str(a) for a in argv], stack.env, cwd=str(stack.home)).check()
                if i >= 0:
                    self.times.setdefault(label, []).append(ran.wall)

    def call(self, label: str, repeat: int, call: Callable[[], object]) -> None:
        for i in range(-self.warmup, repeat):
            start = time.perf_counter()
            call()
            if i >= 0:
                self.times.setdefault(label, []).append(time.perf_counter() - start)


def image_id(ran: Ran) -> int:
    return int(ran.out.split("ID:")[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefect-database-url", default=None,
                        help="HCX_PREFECT_DATABASE_URL of the stack (default: its SQLite, which stalls up to 60 s under load)")
    parser.add_argument("--images", type=int, default=1000, help="rows registered before `list` is timed (1000)")
    parser.add_argument("--repeat", type=int, default=20, help="runs of list, show, enable, rename (20)")
    parser.add_argument("--slow-repeat", type=int, default=5, help="runs of create, clone, delete --wait (5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each series (1)")
    args = parser.parse_args()
    series = Series(args.warmup)
    r, slow = args.repeat, args.slow_repeat

    with embedded_stack(**prefect_database(args.prefect_database_url)) as stack:
        import httpx

        tag = uuid.uuid4().hex[:6]
        print(f"registering {args.images} READY rows ...", file=sys.stderr, flush=True)
        done = run_timed([sys.executable, "-c", REGISTER, str(args.images), f"row-{tag}", str(MiB)], stack.env,
                         cwd=str(ROOT)).check()
        print(f"  {done.out.strip()}", file=sys.stderr, flush=True)

        print("floor:", file=sys.stderr, flush=True)
        series.process("python -c pass", r, lambda i: [sys.executable, "-c", "pass"], stack)
        series.process("python: httpx GET /health", r, lambda i: [sys.executable, "-c", HEALTH, stack.api_url], stack)
        series.process("hcx-image --help", r, lambda i: [HCX, "--help"], stack)
        headers = {"Authorization": f"Bearer {stack.token}"}
        with httpx.Client(base_url=stack.api_url, headers=headers, timeout=60) as client:
            series.call("in-process GET /health", r, lambda: client.get("/health").raise_for_status())
            listed = len(client.get("/api/v1/images").raise_for_status().json())
            series.call(f"in-process GET /api/v1/images ({listed})", r,
                        lambda: client.get("/api/v1/images").raise_for_status())

        print("fast commands:", file=sys.stderr, flush=True)
        series.process(f"list ({listed} images)", r, lambda i: [HCX, "list"], stack)

        one_mib = random_file(stack.home / "one.raw", MiB)
        created: list[int] = []
        series.process("create --path 1 MiB --wait", slow,
                       lambda i: [HCX, "create", "--name", f"small-{tag}-{i + 1}", "--type", "DATABLOCK",
                                  "--driver", "raw", "--path", one_mib, "--wait"],
                       stack, after=lambda i, ran: created.append(image_id(ran)))
        target = created[0]
        series.process("show ID", r, lambda i: [HCX, "show", target], stack)
        series.alternate(("disable ID", "enable ID"), r, [[HCX, "disable", target], [HCX, "enable", target]], stack)
        series.process("rename ID NAME", r, lambda i: [HCX, "rename", target, f"renamed-{tag}-{i % 2}"], stack)

        print("flows:", file=sys.stderr, flush=True)
        big = random_file(stack.home / "sixty-four.raw", 64 * MiB)
        source = image_id(stack.hcx("create", "--name", f"source-{tag}", "--type", "DATABLOCK", "--driver", "raw",
                                    "--path", big, "--wait").check())
        clones: list[int] = []
        series.process("clone 64 MiB --wait", slow, lambda i: [HCX, "clone", source, f"clone-{tag}-{i + 1}", "--wait"],
                       stack, after=lambda i, ran: clones.append(image_id(ran)))
        series.process("delete 64 MiB clone --wait", slow, lambda i: [HCX, "delete", clones.pop(), "--wait"], stack,
                       warm=args.warmup > 0)

        report(args, listed, series)


TARGETS = {
    "list": ("median <= 250 ms, p95 <= 400 ms", lambda m, p: m <= 0.250 and p <= 0.400),
    "show ID": ("median <= 250 ms, p95 <= 400 ms", lambda m, p: m <= 0.250 and p <= 0.400),
    "enable ID": ("median <= 250 ms, p95 <= 400 ms", lambda m, p: m <= 0.250 and p <= 0.400),
    "rename ID NAME": ("median <= 250 ms, p95 <= 400 ms", lambda m, p: m <= 0.250 and p <= 0.400),
    "create --path 1 MiB --wait": ("median <= 1.0 s", lambda m, p: m <= 1.0),
    "clone 64 MiB --wait": ("median <= 1.0 s", lambda m, p: m <= 1.0),
    "delete 64 MiB clone --wait": ("median <= 1.0 s", lambda m, p: m <= 1.0),
}


def report(args, listed: int, series: Series) -> None:
    print(f"\nop_latency: each command a whole process (spawn to exit), {args.warmup} untimed warm-up run(s) first; "
          f"{listed} images listed")
    print(f"machine: {machine()}")
    print(f"\n{'what':<40}{'runs':>6}{'median ms':>11}{'p95 ms':>9}{'min ms':>9}   issue 10 target")
    print("-" * 110)
    for label, values in series.times.items():
        key = "list" if label.startswith("list (") else label
        target, met = TARGETS.get(key, ("", None))
        m, p = median(values), p95(values)
        verdict = "" if met is None else ("  met" if met(m, p) else "  missed")
        if label == "hcx-image --help":
            target = "(every command pays this much start-up)"
        print(f"{label:<40}{len(values):>6}{m * 1000:>11.0f}{p * 1000:>9.0f}{min(values) * 1000:>9.0f}   "
              f"{target}{verdict}")
    print("\np95: nearest rank (of 20 runs the 19th; of 5 the slowest). The floor rows are what any Python "
          "process and any HTTP round trip cost here.")


if __name__ == "__main__":
    main()
