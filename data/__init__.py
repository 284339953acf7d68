"""Embedded datasets, formats (webdataset, HF datasets) and readers.

Modules, one concept each:

* `sample`, `images`, `skips`: the Sample record, robust image decoding/conversion, skip counting;
* `shapes` (+ `shapes_scene`, `shapes_captions`, `shapes_judge`), `digits`, `photos`: the
  embedded datasets, deterministic from a seed and available offline;
* `folder`: a user's image folder with captions;
* `writers`, `readers`, `torch_dataset` (all re-exported by `formats`): storage and training access;
* `build`: the `python -m data.build` CLI.
"""
