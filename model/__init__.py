"""The hybrid FinGPT model: a frozen Hugging Face backbone with LoRA, a causal time-series
encoder, gated cross-attention fusion and a classification head. Knows nothing of Flower.

- model.build.build_model(model_cfg, num_classes, num_features) -> (HybridFinGPT, tokenizer)
- model.state: federated_state / load_federated_state / state_schema_hash (what travels),
  save_model / load_model (a whole trained model on disk)

Submodules are imported explicitly (nothing here), so that importing one stays cheap.
"""
