"""HTTP fronts for simulated instances: the vLLM, TGI and SGLang APIs and metric names over an EngineModel."""
