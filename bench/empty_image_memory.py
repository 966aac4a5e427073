"""Benchmark: an empty raw image of a few GiB (`create --size`) against a raw boto3 baseline, in one run.

Prints the peak RSS (VmHWM) of the flow-run process that writes the zeros and of the CLI, and the
wall time, next to a plain boto3 `upload_file` of a sparse file of the same size to the same
SeaweedFS, measured in the same run. Ours runs twice: with the default part size and with parts of
--big-part-mib, to show that memory does not grow with the part size (an empty raw image is read
from /dev/zero part by part as it is sent; the stream upload it replaced buffered whole parts,
~11 GiB each for `--size 100T`). The S3 and Prefect servers are not ours and are not counted.

    .venv/bin/python bench/empty_image_memory.py [--size-gib 4] [--big-part-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upload_memory import BIN, MiB, LauncherWatcher, timed_child  # noqa: E402

GiB = 1024 * MiB

BASELINE = """
import sys, boto3
from botocore.config import Config
endpoint, key, secret, bucket, path = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                  region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
s3.upload_file(path, bucket, "baseline/sparse")
s3.delete_object(Bucket=bucket, Key="baseline/sparse")
"""


def ours(hcx: str, env: dict, size_gib: int) -> tuple[float, float, float]:
    """(wall s, CLI peak RSS MiB, flow-run peak RSS MiB) of `create --size` followed to READY, then
    the image deleted (its bytes leave the S3 server's disk)."""
    watcher = LauncherWatcher()
    watcher.start()
    name = f"bench-{uuid.uuid4().hex[:6]}"
    wall, cli_rss, out, err, rc = timed_child(
        [hcx, "create", "--name", name, "--type", "DATABLOCK", "--size", f"{size_gib}G", "--wait"], env)
    time.sleep(0.5)
    watcher.stop = True
    assert rc == 0, err
    image_id = out.split("ID:")[1].split()[0]
    subprocess.run([hcx, "delete", image_id, "--wait"], env=env, capture_output=True, check=True)
    return wall, cli_rss, max(watcher.peaks.values(), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gib", type=int, default=4)
    parser.add_argument("--big-part-mib", type=int, default=1024)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="hcx-bench-"))
    env = {**os.environ, "HCX_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    hcx = str(BIN / "hcx-image")
    size = args.size_gib * GiB
    try:
        subprocess.run([hcx, "up"], env=env, check=True, capture_output=True)
        state = json.loads((home / "stack.json").read_text())
        endpoint = f"http://127.0.0.1:{state['s3']['ports']['s3.port']}"

        sparse = home / "sparse.raw"
        with open(sparse, "wb") as out:
            out.truncate(size)  # a hole: no disk used
        base_wall, base_rss, _, err, rc = timed_child(
            [sys.executable, "-c", BASELINE, endpoint, state["s3_access_key"], state["s3_secret_key"],
             "hcx-images", str(sparse)], env)
        assert rc == 0, err
        sparse.unlink()

        rows = [("baseline: boto3 upload_file (sparse file)", base_rss, None, base_wall)]
        for label, part_mib in (("default parts", None), (f"{args.big_part_mib} MiB parts", args.big_part_mib)):
            run_env = dict(env) if part_mib is None else {**env, "HCX_PART_SIZE": str(part_mib * MiB)}
            wall, cli_rss, flow_rss = ours(hcx, run_env, args.size_gib)
            rows.append((f"hcx create --size, {label}", flow_rss, cli_rss, wall))

        print(f"\nempty raw image of {args.size_gib} GiB on the embedded default (SeaweedFS at {endpoint})")
        print(f"{'process':<46}{'peak RSS MiB':>14}{'CLI RSS MiB':>13}{'wall s':>9}{'MiB/s':>8}")
        for label, rss, cli_rss, wall in rows:
            cli = f"{cli_rss:>13.0f}" if cli_rss is not None else f"{'':>13}"
            print(f"{label:<46}{rss:>14.0f}{cli}{wall:>9.1f}{size / MiB / wall:>8.0f}")
        print("\nratios vs baseline (flow-run process peak RSS, wall time):")
        for label, rss, _, wall in rows[1:]:
            print(f"  {label:<44} RSS x{rss / base_rss:.2f}, time x{wall / base_wall:.2f}")
        big = rows[-1][1]
        print(f"peak RSS with {args.big_part_mib} MiB parts is {big / rows[1][1]:.2f} x the default-part run "
              f"(a stream upload would hold up to {args.big_part_mib} MiB x (concurrency + queued parts))")
    finally:
        subprocess.run([hcx, "down"], env=env, capture_output=True)
        subprocess.run(["rm", "-rf", str(home)])


if __name__ == "__main__":
    main()
