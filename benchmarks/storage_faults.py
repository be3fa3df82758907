"""A `qcrd run` through a misbehaving object store ends with the same weights as a clean run.

Starts moto's S3 server on loopback (as the test suite's ``s3_server``) and a :class:`qcrd_ray.testing.FaultProxy`
in front of it, then runs a tiny ``qcrd run`` (synthetic task, QCRD: teacher, 2 train workers, negative sampler,
D, eval, report) twice, each in its own process and its own local Ray: once straight to the bucket, once through
the proxy failing ``--share`` of all requests (503 SlowDown, 500, dropped connections, slow answers; seeded).
Prints the faults injected, both run times, and whether the final student and D (``RUN/qcrd/model``: its
safetensors and ``discriminator.pt``) are bit for bit the same.

    python benchmarks/storage_faults.py                  # 10 % of requests fail
    python benchmarks/storage_faults.py --share 0.2 --modes 503,reset
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time

from qcrd_ray.testing import FaultProxy, free_port

TINY = [
    "--methods", "qcrd",
    "--set", "data.synthetic_train_size=64", "--set", "data.synthetic_eval_size=24",
    "--set", "teacher.k=3", "--set", "teacher.shard_rows=32",
    "--set", "train.rounds=2", "--set", "train.round_steps=4", "--set", "train.batch_size=4",
    "--set", "snapshots.j=1", "--set", "snapshots.max_new_tokens=24",
    "--set", "discriminator.pretrain_steps=10", "--set", "discriminator.refresh_steps=2",
    "--set", "student.max_target_len=64", "--set", "train.log_every=1", "--set", "train.seed=3",
]


def start_s3(bucket: str = "qcrd-faults"):
    """moto's S3 server on a free loopback port; its AWS_* environment is set here, so every `qcrd run` started
    afterwards (and its Ray workers) inherits it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    boto3.client("s3").create_bucket(Bucket=bucket)
    return server, f"s3://{bucket}"


def qcrd_run(out: str, log_path: str) -> float:
    """``qcrd run --out out`` in a fresh process (its own local Ray); its wall time in seconds."""
    code = "import sys; from qcrd_ray.cli import main; sys.exit(main())"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call([sys.executable, "-c", code, "run", "--out", out, *TINY], stdout=log, stderr=log)
    if rc != 0:
        raise SystemExit(f"qcrd run --out {out} exited {rc}; see {log_path}")
    return time.perf_counter() - t0


def final_weights(run: str) -> tuple[dict, dict]:
    """The final student's tensors and D's (``RUN/qcrd/model``: ``*.safetensors``, ``discriminator.pt``), read
    from the bucket directly."""
    import torch
    from safetensors.torch import load

    from qcrd_ray import storage
    from qcrd_ray.train.checkpoint import DISC_FILE

    model = storage.join(run, "qcrd", "model")
    student = {f"{storage.basename(f)}:{k}": v for f in storage.list_files(model, "*.safetensors")
               for k, v in load(storage.read_bytes(f)).items()}
    disc = torch.load(io.BytesIO(storage.read_bytes(storage.join(model, DISC_FILE))), weights_only=True)
    return student, disc


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and bool((a[k] == b[k]).all()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--share", type=float, default=0.1, help="share of requests that fail")
    parser.add_argument("--modes", default="503,500,reset,slow",
                        help="fault kinds (qcrd_ray.testing.FAULT_MODES); 'hang' costs storage.S3_REQUEST_TIMEOUT_S "
                             "(20 s) per fault")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logs", default="/tmp", help="folder for the two runs' console output")
    args = parser.parse_args()

    server, bucket = start_s3()
    proxy = FaultProxy(os.environ["AWS_ENDPOINT_URL"])
    try:
        clean, faulty = f"{bucket}/clean", f"{bucket}/faults"
        clean_s = qcrd_run(clean, os.path.join(args.logs, "storage-faults-clean.log"))
        proxy.configure(share=args.share, modes=args.modes.split(","), seed=args.seed, delay_s=1.0)
        faulty_s = qcrd_run(proxy.uri(faulty), os.path.join(args.logs, "storage-faults-faults.log"))
        requests, injected = proxy.requests, dict(proxy.injected)
        proxy.configure(share=0.0)
        (student_a, disc_a), (student_b, disc_b) = final_weights(clean), final_weights(faulty)
        result = {"share": args.share, "requests": requests, "injected": injected,
                  "injected_total": sum(injected.values()), "clean_s": round(clean_s, 1),
                  "faults_s": round(faulty_s, 1), "student_identical": same(student_a, student_b),
                  "student_tensors": len(student_a), "disc_identical": same(disc_a, disc_b),
                  "disc_tensors": len(disc_a), "load_avg": os.getloadavg()[0]}
        print(json.dumps(result, indent=2))
        if not (result["student_identical"] and result["disc_identical"]):
            raise SystemExit("the run through faults ended with other weights than the clean run")
    finally:
        proxy.close()
        server.stop()


if __name__ == "__main__":
    main()
