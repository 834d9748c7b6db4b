"""Perplexity harness, datasets and reports (installed as `llmq.eval`)."""
