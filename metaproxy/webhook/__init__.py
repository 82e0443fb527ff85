"""Kubernetes mutating admission webhook that injects the metaproxy sidecar into labelled pods.

`patch` builds the JSON Patch (a pure function), `app` serves AdmissionReviews, `cli` runs it.
"""
