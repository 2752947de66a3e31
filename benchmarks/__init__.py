"""The benchmark harness: ``smoledge bench``.

Measures smoledge bundles side by side with their peers on the same model and threads:

* **subjects** are what gets measured: one per (bundle, format) of ours, plus the peers' artifacts
  (transformers eager fp32, llama.cpp Q4_0 / Q4_K_M, onnxruntime-genai INT4).  A peer is one module
  registered in :data:`smoledge.benchmarks.peers.PEERS`; a bundle format is measured through the
  runtime's backend registry, so a new backend (ExecuTorch, Core ML) needs no change here.
* every subject runs in its **own subprocess** (:mod:`smoledge.benchmarks.worker`), so load time and
  peak RSS are per subject; rounds **alternate** between subjects and the report gives the median of
  the rounds with their min and max;
* **quality** is KL / top-1 agreement against transformers fp32 logits, teacher-forced on the fidelity
  text of :mod:`smoledge.fidelity`.

Layout: ``config`` (sizes, workload, settings), ``models`` (build / export / convert what is missing,
cached), ``full_model`` (the SmolVLM2-2.2B architecture with random weights), ``gguf_convert`` (HF ->
GGUF text + mmproj, llama.cpp quantize), ``peer_*`` (one per peer), ``worker`` (one measured pass),
``runner`` (rounds, subprocesses, aggregation), ``fidelity``, ``targets``, ``report`` (JSON, Markdown,
PNG), ``cli``.  Nothing in the runtime imports this package; peers are the optional ``[bench]`` extra.
"""
