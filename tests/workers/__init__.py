"""Tests of the worker engines (``workers.reference``, ``workers.mocker``) and the worker runtime."""
