"""The 4-stage MaVEn training recipe (plus stage 0 pretraining), evaluation and ablations.

    maven-edge train --preset tiny --stage all --out artifacts/runs/tiny
    maven-edge eval --checkpoint model_src/checkpoints/tiny --split test

Modules: :mod:`.recipe` (stage configs), :mod:`.batches` (samples -> tensors),
:mod:`.loop` (the resumable, logged training loop), :mod:`.stages` (what each stage trains),
:mod:`.evaluate` (batched greedy exact-match evaluation), :mod:`.ablations` (the paper's analyses),
:mod:`.table4` (the granularity ablation at the full budget),
:mod:`.commands` (CLI).
"""
