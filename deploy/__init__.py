"""Deployment: the RoleBasedGroup (RBG) manifest generator behind ``dynamo-rt manifests``.

- :mod:`deploy.rbg`: the RBG vocabulary (API group, kinds, labels, role names, Service and adapter names),
  shared with the planner's RBG connector (:mod:`planner.rbg`).
- :mod:`deploy.spec`: :class:`~deploy.spec.ManifestSpec` (what one file depends on), presets, validation.
- :mod:`deploy.render`: a spec -> the RoleBasedGroup, CoordinatedPolicy and frontend Service documents.
- :mod:`deploy.deps`: the etcd and NATS Deployments and Services.
- :mod:`deploy.catalog`: YAML text and the checked-in files (``--write-all``, ``--check``).
- :mod:`deploy.suggest`: tp and replica counts from the model size and the GPU (``... suggest``).
- :mod:`deploy.manifests`: the ``dynamo-rt manifests`` command line.

The files in the repository's ``manifests/`` folder are this package's checked-in output.
"""
