"""Cloud TPU launch tooling for jpost (run as `python tpu/launch.py ...`; see tpu/README.md)."""
