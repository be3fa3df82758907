"""`ray job submit --working-dir . -- python -m jobs.evaluate --config C ...`: `qcrd eval` as a Ray job."""

from jobs import run_subcommand

if __name__ == "__main__":
    run_subcommand("eval")
