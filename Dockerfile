# The image of mura-ray's Ray nodes on Kubernetes (k8s/): Ray's GPU image at the version
# mura-ray is tested with, plus this checkout at /app.
#   docker build -t REGISTRY/mura-ray:VERSION . && docker push REGISTRY/mura-ray:VERSION
FROM rayproject/ray:2.60.0-py311-gpu
COPY --chown=ray:users . /app
RUN pip install --no-cache-dir /app
WORKDIR /app
