"""`python -m api --host 127.0.0.1 --port 8080`: serve the image API with uvicorn (what `hcx-image up` starts)."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from api.app import create_app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m api", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Access lines name paths and ids, never tokens (they travel in a header uvicorn does not log).
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info", timeout_keep_alive=30,
                http="httptools")


if __name__ == "__main__":
    main()
