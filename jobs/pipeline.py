"""`ray job submit --working-dir . -- python -m jobs.pipeline --config C ...`: `qcrd run` as a Ray job."""

from jobs import run_subcommand

if __name__ == "__main__":
    run_subcommand("run")
