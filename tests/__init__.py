"""Test suite. A package so helpers import as ``from tests.conftest import arun`` and test module names
under sub-folders (``tests/frontend``) never shadow the runtime's own packages."""
