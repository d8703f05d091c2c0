"""Simulated LLM engines: faithful instances without GPUs (DESIGN invariant 6).

- `engine.EngineModel`: vLLM v1-style continuous batching on a given clock (pure, no asyncio).
- `http/`: the vLLM, TGI and SGLang HTTP APIs and /metrics over an EngineModel on scaled real time;
  `cluster.serve_fleet` serves a fleet description (`capbalancer sim --cluster FILE`), `embedded` starts
  a small cluster inside the proxy's own loop.
- `gpu_share.SharedGpu`: engines sharing one GPU (fleet `gpu_group`): each step waits for the busy
  siblings' steps, in the engine model, the DES and the HTTP cluster alike.
- `des.run_des`: the proxy's Scheduler against EngineModels on a virtual clock (`capbalancer des`);
  `des.instance_capacity` / `des.ideal_throughput`: an instance's (a fleet's) own saturated throughput.
"""
