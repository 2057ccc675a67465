"""S3 requests to replace a finished ``debias`` artifact of N labels with a rerun of another key.

Runs ``StageDir`` (``mars_ray.artifacts``) against an in-process moto S3 server and counts the
requests the server answers (its access log) in ``begin`` and in ``finish``: the replacement's own
cost, not the N uploads of the new labels (those any rerun pays). Three generations are written
(keys k1, k2, k3) so the measured replacement is a steady state: a previous artifact exists, and
with pointer prefixes one stale prefix is deleted. Runs against whichever ``mars_ray`` is on
``PYTHONPATH`` (compare two checkouts).

    PYTHONPATH=. python benchmarks/replace_requests.py --labels 100 1000 [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import uuid
from collections import Counter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kind(method: str, target: str) -> str:
    """A request's S3 operation, roughly: uploads are multipart (create, part, complete) in pyarrow."""
    if method == "POST" and "?delete" in target:
        return "DeleteObjects"
    if method == "POST":
        return "upload (create/complete)"
    if method == "PUT" and "partNumber" in target:
        return "upload (part)"
    if method == "PUT":
        return "PUT (copy or folder marker)"
    if method == "GET" and "list-type" in target:
        return "LIST"
    return method


def measure(bucket: str, n: int) -> dict[str, object]:
    from mars_ray.artifacts import StageDir, atomic_write_bytes
    from mars_ray.storage import upath
    from tests.s3_log import collect

    root = upath(bucket) / f"n{n}" / "debias"

    def write(sd: StageDir, tag: str) -> None:
        for i in range(n):
            atomic_write_bytes(sd.path / f"{i:06d}.png", f"{tag}{i}".encode())

    for key in ("k1", "k2"):
        sd = StageDir(root, "debias", key, {}, {})
        with sd.guard():
            write(sd, key)
            sd.finish({"n": n})
    sd = StageDir(root, "debias", "k3", {}, {})
    with collect() as begin:
        sd.begin()
    write(sd, "k3")
    with collect() as finish:
        sd.finish({"n": n})
    calls = [*begin, *finish]
    return {"labels": n, "begin": len(begin), "finish": len(finish), "total": len(calls),
            "naming_a_label": sum(1 for _, t in calls if ".png" in t),
            "by_kind": dict(Counter(_kind(m, t) for m, t in calls))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    port = _free_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                       "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"})
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    logging.getLogger("werkzeug").addHandler(logging.NullHandler())  # no access log on the terminal
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        name = f"replace-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=name)
        rows = [measure(f"s3://{name}", n) for n in args.labels]
    finally:
        server.stop()
    for r in rows:
        print(f"N={r['labels']:>6}: begin {r['begin']:>6}  finish {r['finish']:>6}  total {r['total']:>6}  "
              f"naming a label {r['naming_a_label']:>6}  {r['by_kind']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
