"""Ray Job entrypoint: score an archive, nightly and incrementally.

    ray job submit --submission-id score-archive-2026-11-27 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/score.py --model s3://bucket/runs/2026-11/model --data s3://bucket/archive \
        --out s3://bucket/scores

Takes the arguments of ``mura-ray score`` (see ``mura-ray score --help``).
Exit status 2 (bad input) or 3 (too many unreadable images) ends the job
FAILED, with the reason as the last line of its log.
"""

import sys

from mura_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]], own_process=True))
