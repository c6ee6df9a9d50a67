"""Face-model evaluation: `embedder` (images -> embeddings, shared with deploy),
`verification` (insightface .bin sets, 10-fold accuracy, also during training), `ijb`
(IJB-B/C 1:1 TAR@FAR) and `cli` (`arcshard-eval`)."""
