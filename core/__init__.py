"""maven-edge's torch-free core: what every other layer shares.

- :mod:`.errors` — the one exception hierarchy (:class:`~.errors.MavenError` and subclasses);
- :mod:`.config` — the model configuration (presets, overrides, derived geometry);
- :mod:`.tokenizer` — the byte-level BPE text tokenizer and the unified-vocabulary layout;
- :mod:`.preprocess` — image decoding, limits and ``pixel_values``;
- :mod:`.sampling` — the one sampler and stop checker every backend uses;
- :mod:`.prompt` — prompt assembly: where each image's visual sequence goes, and the context check;
- :mod:`.manifest` — ``manifest.json``, the contract between export and every runtime;
- :mod:`.paths` — where outputs go by default (a per-user cache directory);
- :mod:`.registry` — the name -> factory tables behind backends, providers, modes and recipes.

Nothing here imports torch, and nothing here imports another layer of maven-edge.
"""
