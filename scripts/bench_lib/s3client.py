"""The benchmark's own S3 client: boto3, run as a co-process under the test tools' venv Python
(boto3 lives there, not in the Python that runs the benchmark).

It reads one JSON request a line on stdin, `[command, arg...]`, and answers one JSON line on
stdout, `{"ok": result}` or `{"err": "message"}`:

    ["get", KEY]              the object's sha256, or null when there is none
    ["list", PREFIX]          {key: size} of every object under PREFIX
    ["copy", SRC, DST]        server-side copy (boto3's managed copy)
    ["upload", FILE, KEY]     upload_file at boto3's defaults (multipart); seconds it took
    ["download", KEY, SIZE]   download_fileobj at boto3's defaults to nowhere; seconds it took

Endpoint and credentials come from the AWS_* environment, the bucket from S3_BUCKET. One
attempt per request (no retries): a failure shows instead of being papered over. Timed commands
time the transfer call only, not Python's start-up or boto3's import: the figure of a program
that uses boto3 as its S3 library.
"""

import hashlib
import json
import os
import sys
import time

import boto3
from botocore.config import Config

BUCKET = os.environ["S3_BUCKET"]


class _Sink:
    """A file object that throws away what it is given but counts it. Seekable, so that
    download_fileobj writes each part at its offset instead of queueing them in memory (with a
    non-seekable target s3transfer 0.16 was seen to deadlock on a 256 MiB object)."""

    def __init__(self):
        self.n = self.pos = 0

    def write(self, b):
        self.n += len(b)
        self.pos += len(b)
        return len(b)

    def seek(self, off, whence=0):
        self.pos = off if whence == 0 else self.pos + off
        return self.pos

    def tell(self):
        return self.pos

    def seekable(self):
        return True


def handle(s3, req):
    cmd, args = req[0], req[1:]
    if cmd == "get":
        try:
            body = s3.get_object(Bucket=BUCKET, Key=args[0])["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None
        return hashlib.sha256(body).hexdigest()
    if cmd == "list":
        out = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=args[0]):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out
    if cmd == "copy":
        s3.copy({"Bucket": BUCKET, "Key": args[0]}, BUCKET, args[1])
        return None
    if cmd == "upload":
        t0 = time.perf_counter()
        s3.upload_file(args[0], BUCKET, args[1])
        return time.perf_counter() - t0
    if cmd == "download":
        sink = _Sink()
        t0 = time.perf_counter()
        s3.download_fileobj(BUCKET, args[0], sink)
        dt = time.perf_counter() - t0
        if sink.n != int(args[1]):
            raise RuntimeError(f"downloaded {sink.n} bytes, expected {args[1]}")
        return dt
    raise RuntimeError(f"unknown command {cmd!r}")


def main():
    s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"},
                                          retries={"total_max_attempts": 1}))
    for line in sys.stdin:
        try:
            out = {"ok": handle(s3, json.loads(line))}
        except Exception as e:  # noqa: BLE001 - reported to the caller
            out = {"err": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
