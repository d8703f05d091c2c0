"""Real-engine test tier: a real vLLM (CPU build) in its own cached venv, a tiny local model, real servers."""
