# The guest side of the `s3_bench` check (src/check/s3_bench.rs): S3 object
# throughput with boto3 (Debian's python3-boto3), in one process so that
# interpreter start-up is not measured.
#
# Usage: python3 s3_bench.py '<json config>'; the secret key comes from the
# environment variable the config names (S3_SECRET, from /photon/node.env),
# so it never appears on a command line or in the output.
#
# Config: endpoint, bucket, access_key, secret_env, large_mib, large_count,
# small_count, small_kib, runs, prefix, seconds (the time left for the whole
# benchmark; the script stops before it).
#
# Prints ONE JSON object on stdout and exits 0 when it could report, whatever
# the server did (the Rust side judges):
#   runs      one object of figures per completed run
#   error     the first failed request: op, key, HTTP status, S3 code and the
#             raw response body; or a connection error (status null)
#   mismatch  the first object whose GET differs from its PUT (sha256)
#   deadline  true when the time ran out before every run finished
import hashlib
import json
import os
import sys
import time

import boto3
import botocore.config
import botocore.exceptions

BODY_LIMIT = 4096


def main():
    cfg = json.loads(sys.argv[1])
    stop_at = time.monotonic() + float(cfg["seconds"])
    out = {
        "version": 1,
        "client": "boto3 %s (botocore %s)" % (boto3.__version__, botocore.__version__),
        "endpoint": cfg["endpoint"],
        "bucket": cfg["bucket"],
        "prefix": cfg["prefix"],
        "large_mib": cfg["large_mib"],
        "large_count": cfg["large_count"],
        "small_kib": cfg["small_kib"],
        "small_count": cfg["small_count"],
        "runs": [],
        "error": None,
        "mismatch": None,
        "deadline": False,
    }
    # The last HTTP response, kept only when it is an error: its raw body is
    # the evidence (reading a successful GET's body here would consume it).
    last = {}

    def keep_error(http_response=None, **_):
        if http_response is not None and http_response.status_code >= 300:
            last["status"] = http_response.status_code
            last["body"] = http_response.content[:BODY_LIMIT].decode("utf-8", "replace")

    client = boto3.client(
        "s3",
        endpoint_url=cfg["endpoint"],
        aws_access_key_id=cfg["access_key"],
        aws_secret_access_key=os.environ.get(cfg["secret_env"], ""),
        region_name="us-east-1",
        config=botocore.config.Config(
            s3={"addressing_style": "path"},
            # A benchmark reports what the server did: no silent retries.
            retries={"total_max_attempts": 1},
            connect_timeout=10,
            read_timeout=120,
        ),
    )
    client.meta.events.register("after-call.s3", keep_error)
    bucket, prefix = cfg["bucket"], cfg["prefix"]
    written = {}  # every key PUT, in order, for the clean-up

    def call(op, key, fn):
        last.clear()
        try:
            return fn()
        except botocore.exceptions.ClientError as e:
            err = e.response.get("Error", {})
            raise Failed({
                "op": op,
                "key": key,
                "status": last.get("status", e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")),
                "code": err.get("Code"),
                "message": err.get("Message") or str(e),
                "body": last.get("body"),
            })
        except botocore.exceptions.BotoCoreError as e:
            raise Failed({"op": op, "key": key, "status": None, "code": type(e).__name__,
                          "message": str(e), "body": None})

    def left():
        if time.monotonic() > stop_at:
            raise Deadline()

    # Every request first checks the time left, so the script reports
    # before the driver's deadline even when the server is slow.
    def put(key, data):
        left()
        call("PutObject", key, lambda: client.put_object(Bucket=bucket, Key=key, Body=data))
        written[key] = None

    def get(key):
        left()
        return call("GetObject", key,
                    lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def verify(key, want, size, got):
        if hashlib.sha256(got).hexdigest() != want:
            raise Mismatch({
                "key": key,
                "put_sha256": want,
                "get_sha256": hashlib.sha256(got).hexdigest(),
                "put_bytes": size,
                "get_bytes": len(got),
            })

    def pct(values, p):
        s = sorted(values)
        return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))] * 1000.0

    try:
        # The bucket must exist and the credentials work, before anything is
        # timed (a listing, not HeadBucket: a HEAD answer has no body to keep).
        call("ListObjectsV2", None,
             lambda: client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1))
        large = cfg["large_mib"] << 20
        small = cfg["small_kib"] << 10
        for run in range(cfg["runs"]):
            started = time.monotonic()
            r = {}
            # Large objects: fresh random bytes per object and run, so a
            # stale or cached object cannot pass the content check.
            keys = ["%s/large-%d" % (prefix, i) for i in range(cfg["large_count"])]
            datas = [os.urandom(large) for _ in keys]
            sums = [hashlib.sha256(d).hexdigest() for d in datas]
            t = time.monotonic()
            for k, d in zip(keys, datas):
                put(k, d)
            r["large_put_mb_s"] = large * len(keys) / 1e6 / max(time.monotonic() - t, 1e-9)
            del datas
            t = time.monotonic()
            got = []
            for k in keys:
                got.append(get(k))
            r["large_get_mb_s"] = large * len(keys) / 1e6 / max(time.monotonic() - t, 1e-9)
            for k, s, g in zip(keys, sums, got):
                verify(k, s, large, g)
            del got
            # Small objects: one request at a time, each timed.
            keys = ["%s/small-%d" % (prefix, i) for i in range(cfg["small_count"])]
            datas = [os.urandom(small) for _ in keys]
            sums = [hashlib.sha256(d).hexdigest() for d in datas]
            lat = []
            t = time.monotonic()
            for k, d in zip(keys, datas):
                t0 = time.monotonic()
                put(k, d)
                lat.append(time.monotonic() - t0)
            r["small_put_ops_s"] = len(keys) / max(time.monotonic() - t, 1e-9)
            r["small_put_p50_ms"] = pct(lat, 50)
            r["small_put_p99_ms"] = pct(lat, 99)
            lat = []
            t = time.monotonic()
            for k, s in zip(keys, sums):
                t0 = time.monotonic()
                g = get(k)
                lat.append(time.monotonic() - t0)
                verify(k, s, small, g)
            r["small_get_ops_s"] = len(keys) / max(time.monotonic() - t, 1e-9)
            r["small_get_p50_ms"] = pct(lat, 50)
            r["small_get_p99_ms"] = pct(lat, 99)
            r["seconds"] = time.monotonic() - started
            out["runs"].append(r)
    except Failed as f:
        out["error"] = f.args[0]
    except Mismatch as m:
        out["mismatch"] = m.args[0]
    except Deadline:
        out["deadline"] = True
    # Leave the bucket as it was (not timed; a failure here is reported too).
    if out["error"] is None and written:
        keys = list(written)
        try:
            for i in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[i:i + 1000]]
                call("DeleteObjects", keys[i],
                     lambda: client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}))
        except Failed as f:
            out["error"] = f.args[0]
    out["deleted"] = len(written) if out["error"] is None else 0
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


class Failed(Exception):
    pass


class Mismatch(Exception):
    pass


class Deadline(Exception):
    pass


main()
