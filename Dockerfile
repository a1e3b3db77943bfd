# The image of mura-ray's Ray nodes, on AWS (cluster.yaml) and on Kubernetes (k8s/): Ray's GPU image
# at the version mura-ray is tested with, plus this checkout installed at /app with the exact versions
# of constraints.txt, so that a node starts with nothing to install.
#   docker build -t REGISTRY/mura-ray:VERSION . && docker push REGISTRY/mura-ray:VERSION
# `docker push` prints the digest (REGISTRY/mura-ray@sha256:...), to pin the image by.
FROM rayproject/ray:2.60.0-py311-gpu
COPY --chown=ray:users . /app
RUN pip install --no-cache-dir -c /app/constraints.txt /app
WORKDIR /app
# Ray's image runs as its user `ray` (uid 1000, group `users`, gid 100), which owns /app and /home/ray
# (Ray writes its temp dir under /tmp, open to every user). Named by number, so that the pods of k8s/
# (runAsUser 1000, runAsGroup 100, runAsNonRoot) run as exactly this user and the kubelet can check it.
USER 1000:100
