"""Ray Job entrypoint: fine-tune on the cluster.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py --data s3://bucket/MURA-v1.1 --out s3://bucket/runs/2026-11 --workers 4

Takes the arguments of ``mura-ray train`` (see ``mura-ray train --help``).
Bad input ends the job FAILED with one line at the end of its log.
"""

import sys

from mura_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], own_process=True))
