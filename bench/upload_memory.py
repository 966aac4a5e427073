"""Benchmark: a 1 GiB upload through hcx-images against a raw boto3 baseline, in one run.

Prints, per process of ours (the CLI that stages, the flow-run process that inspects and copies),
its peak RSS (VmHWM from /proc, sampled until it exits; for direct children also wait4's
ru_maxrss) and wall time, with ratios against a plain boto3 `upload_file` of the same file to the
same SeaweedFS. The S3 server and the Prefect server are not ours and are not counted.

    .venv/bin/python bench/upload_memory.py [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MiB = 1024 * 1024


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class LauncherWatcher(threading.Thread):
    """Samples the peak RSS of every `flows.launcher` process (detached flow runs) that appears."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[int, float] = {}
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"flows.launcher" in cmdline:
                    peak = peak_rss_mib(int(entry.name))
                    if peak:
                        self.peaks[int(entry.name)] = max(peak, self.peaks.get(int(entry.name), 0))
            time.sleep(0.05)


def timed_child(argv: list[str], env: dict) -> tuple[float, float, str, str, int]:
    """(wall s, peak RSS MiB, stdout, stderr, exit code) of `argv`, measured by a small wrapper
    process through getrusage(RUSAGE_CHILDREN).ru_maxrss."""
    wrapper = (
        "import os,resource,subprocess,sys,time,json;"
        "t=time.monotonic();p=subprocess.run(sys.argv[1:],capture_output=True);"
        "r=resource.getrusage(resource.RUSAGE_CHILDREN);"
        "print(json.dumps({'wall':time.monotonic()-t,'maxrss':r.ru_maxrss/1024,'rc':p.returncode,"
        "'out':p.stdout.decode(errors='replace'),'err':p.stderr.decode(errors='replace')}))"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *argv], env=env, capture_output=True, text=True, check=True)
    data = json.loads(done.stdout)
    return data["wall"], data["maxrss"], data["out"], data["err"], data["rc"]


BASELINE = """
import sys, boto3
from botocore.config import Config
endpoint, key, secret, bucket, path = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                  region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
s3.upload_file(path, bucket, "baseline/" + path.rsplit("/", 1)[-1])
s3.delete_object(Bucket=bucket, Key="baseline/" + path.rsplit("/", 1)[-1])
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="hcx-bench-"))
    env = {**os.environ, "HCX_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    hcx = str(BIN / "hcx-image")
    try:
        subprocess.run([hcx, "up"], env=env, check=True, capture_output=True)
        state = json.loads((home / "stack.json").read_text())
        endpoint = f"http://127.0.0.1:{state['s3']['ports']['s3.port']}"

        image = home / "bench.raw"
        with open(image, "wb") as out:
            for _ in range(args.size_mib):
                out.write(os.urandom(MiB))

        base_wall, base_rss, _, err, rc = timed_child(
            [sys.executable, "-c", BASELINE, endpoint, state["s3_access_key"], state["s3_secret_key"],
             "hcx-images", str(image)], env)
        assert rc == 0, err

        watcher = LauncherWatcher()
        watcher.start()
        cli_wall, cli_rss, out, err, rc = timed_child(
            [hcx, "create", "--name", f"bench-{uuid.uuid4().hex[:6]}", "--type", "DATABLOCK",
             "--path", str(image), "--driver", "raw", "--wait"], env)
        time.sleep(0.5)
        watcher.stop = True
        assert rc == 0, err
        flow_rss = max(watcher.peaks.values(), default=0.0)

        size = image.stat().st_size
        print(f"\n1 upload of {size / MiB:.0f} MiB on the embedded default (SeaweedFS at {endpoint})")
        print(f"{'process':<42}{'peak RSS MiB':>14}{'wall s':>10}{'MiB/s':>10}")
        print(f"{'baseline: boto3 upload_file':<42}{base_rss:>14.0f}{base_wall:>10.1f}{size / MiB / base_wall:>10.0f}")
        print(f"{'hcx-image create --wait (CLI, staging)':<42}{cli_rss:>14.0f}{cli_wall:>10.1f}{size / MiB / cli_wall:>10.0f}")
        print(f"{'flow run process (inspect + adopt)':<42}{flow_rss:>14.0f}{'':>10}{'':>10}")
        print(f"\nratios vs baseline: CLI RSS x{cli_rss / base_rss:.2f}, flow RSS x{flow_rss / base_rss:.2f}, "
              f"end-to-end time x{cli_wall / base_wall:.2f}")
        limit = 300
        verdict = "OK" if max(cli_rss, flow_rss) < limit else "OVER"
        print(f"goal: each of our processes under {limit} MB peak RSS -> {verdict}")
    finally:
        subprocess.run([hcx, "down"], env=env, capture_output=True)
        subprocess.run(["rm", "-rf", str(home)])


if __name__ == "__main__":
    main()
