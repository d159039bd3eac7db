"""maven-edge's benchmark suite (`maven-edge bench`, see docs/usage/benchmarks.md).

- :mod:`maven_edge.benchmarks.suite`: options, planning, one worker process per job, the report;
- :mod:`maven_edge.benchmarks.worker`: the jobs (limits, source model, export, text engines, pipeline);
- :mod:`maven_edge.benchmarks.harness`: repeats, medians and spread, peak RSS, machine description;
- :mod:`maven_edge.benchmarks.anchors`: the text-generation protocol, our engines and the anchors
  (transformers, onnxruntime-genai, Optimum, llama.cpp);
- :mod:`maven_edge.benchmarks.roofline`: measured bandwidth / FLOP/s and the decoder's cost model;
- :mod:`maven_edge.benchmarks.efficiency`: hybrid vs continuous vs discrete token math and speed-ups;
- :mod:`maven_edge.benchmarks.report`, :mod:`maven_edge.benchmarks.plots`: ratios, tables, CSV/JSON, figures;
- :mod:`maven_edge.benchmarks.profile_decode`: where a decode step's time goes (ONNX Runtime profiler).

Importing this package imports nothing heavy.
"""
