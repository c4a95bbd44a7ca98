"""Helpers shared by the tests (imported as `support.*`; tests/ is on pytest's pythonpath): the repository's paths and
experiments (paths.py), the environment of subprocesses and small data files (env.py), running the real launchers
(launching.py), and copying and reading evaluated runs (evaluation.py). Fixtures live in tests/conftest.py."""
