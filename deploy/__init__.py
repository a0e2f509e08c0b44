"""Deployment: the RoleBasedGroup (RBG) manifest generator behind ``dynamo-rt manifests``.

- :mod:`deploy.manifests`: renders ``manifests/{backend}/{agg,disagg}[-multinode].yaml`` and suggests shapes.

The files in the repository's ``manifests/`` folder are this package's checked-in output.
"""
