"""Model editing and data selection outside the training loop (ALGORITHMS.md §7).

  merging  task vectors, task arithmetic and LiNeS layer scaling on param pytrees
  zipfit   ZIP-FIT: gzip-NCD alignment of candidate rows to a target set, top-k selection

The submodules are imported on use: zipfit needs neither JAX nor the data pipeline.
"""
