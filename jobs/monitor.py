"""Ray Job entrypoint: the nightly monitor of a scoring output, after the night's scoring job.

    ray job submit --submission-id monitor-2026-11-27 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/monitor.py --scores s3://bucket/scores --model s3://bucket/runs/2026-11/model

Takes the arguments of ``mura-ray monitor`` (see ``mura-ray monitor --help``).
Exit status 4 (the latest night's PSI or error rate is over its limit) ends
the job FAILED, with the alert as the last lines of its log.
"""

import sys

from mura_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["monitor", *sys.argv[1:]], own_process=True))
