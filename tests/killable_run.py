"""Run a job, pausing at a named point so a test can kill the process there.

    python tests/killable_run.py JOB.toml POINT      POINT: read | train | write | publish

Prints `PAUSED AT <POINT>` when it gets there, then sleeps until killed.
"""

import sys
import time

from aefeatures.config import load_job_config
from aefeatures.jobs import run
from aefeatures.model import train
from aefeatures.store import layout, publish, tables


def pause(point):
    print(f"PAUSED AT {point}", flush=True)
    time.sleep(600)


def main(job, point):
    if point == "read":
        real_read = run.read_interactions
        run.read_interactions = lambda cfg, **kw: (pause(point), real_read(cfg, **kw))[1]
    elif point == "train":
        real_epoch, seen = train._epoch, []

        def epoch(*args):
            seen.append(1)
            if len(seen) == 2:
                pause(point)
            return real_epoch(*args)
        train._epoch = epoch
    elif point == "write":
        real_write = tables.write_tables

        def write(folder, *args, **kwargs):
            out = real_write(folder, *args, **kwargs)
            pause(point)  # tables written, model and index not yet
            return out
        tables.write_tables = write
    elif point == "publish":
        real_atomic = publish.atomic_write

        def atomic(path, text):
            if path.name == layout.LATEST:
                pause(point)  # the version is renamed into versions/, LATEST not yet moved
            return real_atomic(path, text)
        publish.atomic_write = atomic
    run.run_job(load_job_config(job), force=True, progress=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
