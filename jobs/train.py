"""`ray job submit --working-dir . -- python -m jobs.train --config C ...`: `qcrd train` as a Ray job."""

from jobs import run_subcommand

if __name__ == "__main__":
    run_subcommand("train")
