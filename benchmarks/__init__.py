"""maven-edge's benchmark suite (`maven-edge bench`, see docs/usage/benchmarks.md).

- :mod:`benchmarks.suite`: options, planning, one worker process per job, the report;
- :mod:`benchmarks.worker`: the jobs (limits, source model, export, text engines, pipeline);
- :mod:`benchmarks.harness`: repeats, medians and spread, peak RSS, machine description;
- :mod:`benchmarks.anchors`: the text-generation protocol, our engines and the anchors
  (transformers, onnxruntime-genai, Optimum, llama.cpp);
- :mod:`benchmarks.roofline`: measured bandwidth / FLOP/s and the decoder's cost model;
- :mod:`benchmarks.efficiency`: hybrid vs continuous vs discrete token math and speed-ups;
- :mod:`benchmarks.report`, :mod:`benchmarks.plots`: ratios, tables, CSV/JSON, figures;
- :mod:`benchmarks.profile_decode`: where a decode step's time goes (ONNX Runtime profiler).

Importing this package imports nothing heavy.
"""
