"""Benchmark: what a LoRA step costs against full fine-tuning and the frozen model.

Run ``python -m experiments.bench`` (``--quick`` for a smoke run, ``--help`` for flags); what it
measures and writes is described in :mod:`experiments.bench.cli`. The modules, one per concept:

* :mod:`~experiments.bench.workloads`: the models (GPT, MiniLM) as pure functions and a batch;
* :mod:`~experiments.bench.steps`: the LoRA, full and frozen-floor steps and forward passes;
* :mod:`~experiments.bench.cost`: XLA's cost and memory analysis of the compiled steps;
* :mod:`~experiments.bench.timing`: interleaved wall time;
* :mod:`~experiments.bench.footprint`: bytes of trees, optimizer state and checkpoints; peak RSS;
* :mod:`~experiments.bench.scale`: scale planning on abstract Llama-2-shaped trees;
* :mod:`~experiments.bench.ranks`: the rank-scaling sweep;
* :mod:`~experiments.bench.tracetime`: trace time of the LoRA step against the full step;
* :mod:`~experiments.bench.nnx_lora`: lorax against qwix on an NNX transformer;
* :mod:`~experiments.bench.report`: the markdown report and machine information;
* :mod:`~experiments.bench.cli`: the command line and the per-model benchmark.
"""
