"""capsafe: fine-tune a model to a declared capability target, stop there, and measure the safety of that exact
checkpoint, so that mitigations are compared at equal capability.

The packages follow the data flow of one run (``capsafe.pipeline``)::

    spec.py (the YAML, typed)  ->  run_inputs.py (every file resolved)  ->  preflight.py (does it fit?)
      ->  train/     Ray Tune sweep, Ray Train + DeepSpeed trials stopped at the target, kept checkpoints
      ->  evaluate/  a Ray Serve pool of vLLM engines generates; judges judge; Parquet rows
      ->  report/    tables, statistics, plots: from the Parquet files alone

Below the stages: ``common/`` (what more than one stage uses: the tokenization contract, generation, the
capability ladder, the results schema, checkpoint metadata), ``judging/`` (rule judges and LLM judges'
published formats), ``inputs/`` (task and suite file formats), ``mitigations/`` (the methods compared),
``world/`` (the demo's self-built model and data) and ``runtime/`` (the Ray cluster). ``cli.py`` is the
command line. Which package may import which is pinned by ``tests/test_layout.py``.
"""
