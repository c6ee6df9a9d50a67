"""Serving a trained backbone: ONNX export with parity checks, embeddings, Triton.

* `deploy.export` (`arcshard-export onnx|triton`): checkpoint -> model.onnx + model.json
  (`deploy.onnx_export`, `deploy.model_card`) -> Triton model repository
  (`deploy.triton`).
* `deploy.embed` (`arcshard-embed`): image files -> L2-normalised embeddings, and
  `compare` for one pair (`deploy.images` decodes the files).
* `deploy/monitoring/`: Prometheus and Grafana files for training runs.

Dependencies point one way: deploy imports trainer, never the reverse.
"""
