"""A public fault benchmark for gradwatch: real small architectures with injected root causes.

``python -m benchmarks.faults [--quick] [--json FILE] [--only NAME,...]``

- :mod:`.scenarios`: what is injected, and what a correct diagnosis is (code, op, module);
- :mod:`.archs`, :mod:`.data`: the five architecture families and the tasks they learn;
- :mod:`.harness`: runs a scenario through ``gradwatch.Watch`` (and ``gw.probe``) as a user would;
- :mod:`.scoring`: pure functions from outcomes to the figures (confusion table, detection
  rate per code, localization accuracy, false positives per 1000 healthy steps, time to detect);
- :mod:`.tables`: the Markdown tables the command prints.
"""
