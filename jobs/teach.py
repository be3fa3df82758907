"""`ray job submit --working-dir . -- python -m jobs.teach --config C ...`: `qcrd teach` as a Ray job."""

from jobs import run_subcommand

if __name__ == "__main__":
    run_subcommand("teach")
