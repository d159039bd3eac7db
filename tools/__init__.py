"""Development tools run from a clone (not part of the installed package): soak, perf and parity checks.

    python -m tools.parity_check --artifacts DIR      # torch vs ONNX Runtime, every test question
    python -m tools.perf_check                         # decode-loop latency / RSS report
    python -m tools.soak --artifacts DIR              # long concurrent load with cancellations
"""
