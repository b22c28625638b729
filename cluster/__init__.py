"""GPU-cluster launch tooling for jpost (run as `python cluster/launch.py ...`; see cluster/README.md)."""
