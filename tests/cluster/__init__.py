"""The image as a cluster runs it, on one machine: podman with this machine's settings.

    podman.py   the podman command line with this machine's settings (runtime, cgroups, limits)
    images.py   the images: metaproxy's from the Dockerfile, its base, the workloads' image
    conftest.py what the suite needs (root, the tools), its marker `image`, the images

The suite: test_image.py (the image as a user runs it), `make image-test`. `make image` builds
the images alone (`python -m tests.cluster.images`).
"""
