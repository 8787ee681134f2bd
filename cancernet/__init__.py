"""cancernet: distributed training of cancer classifiers on histopathology patches and slides.

The packages, lowest layer first. A module imports only from lower layers or from its own
package (tests/test_layers.py holds it to this, imports inside functions included); packages
in the same layer do not import each other.
"""

LAYERS = (
    ("runtime",),  # process plumbing: errors, logging, signals, fork server, distributed, atomic writes
    ("data", "models"),  # patch sources, packs, splits, augmentation / networks, weights, model families
    ("config",),  # the run configuration: the sections, YAML, overrides, cross-key checks
    ("engine",),  # what every command that runs a model shares: loaders, prediction, checkpoints, run dir
    ("evaluate",),  # metrics, reports, calibration, inference on patches, aggregation
    ("train", "wsi"),  # the training run / whole slides
    ("bench",),  # benchmarks of all of the above
    ("cli",),  # the commands and the launcher
    ("__main__",),  # python -m cancernet
)
