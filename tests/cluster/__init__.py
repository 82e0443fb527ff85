"""Pods as a cluster runs them, on one machine: podman, a node of our own, a kubelet of our own.

    podman.py   the podman command line with this machine's settings (runtime, cgroups, limits)
    images.py   the images: metaproxy's from the Dockerfile, its base, the workloads' image
    node.py     the node: a network namespace with two CNI networks, metaproxy-cni chained in
    kubelet.py  plays a Pod spec (the manifests' templates, the webhook's output) as a podman pod
    service.py  a Service's virtual address in the node, forwarding to its ready endpoints
    cluster.py  the eks overlay, as kubectl kustomize renders it, played there: Valkey, the
                broker fleet, the webhook
    conftest.py what the suite needs (root, the tools), its marker `image`, the images

The suite: test_image.py (the image as a user runs it) and test_cluster.py (the overlay in
pods), `make image-test`. `make image` builds the images alone (`python -m tests.cluster.images`).
"""
