"""Mixture-of-experts LMs: recording router choices, routing metrics and SCMoE decoding."""
