"""Load testing of OpenAI-compatible and TGI endpoints (`capbalancer loadtest`, `capbalancer demo`).

- `workloads`: what is sent (synthetic lengths, ShareGPT/JSONL datasets, timestamped traces);
- `arrivals`: when (Poisson/gamma at a rate, as `vllm bench serve`);
- `client`: one streamed request, timed (TTFT, ITL, TPOT, E2E) and its failure classified;
- `runner`: `run_loadtest(LoadtestConfig) -> LoadtestResult`, the Python API other benchmarks use;
- `stats`, `report`, `plot`, `progress`: vllm-named summary and goodput, text and JSON, figures, live bar;
- `demo`, `procs`: the round_robin-vs-capacity demo on a simulated cluster, and its child processes.

Python use:

    from capbalancer.loadtest.runner import LoadtestConfig, run_loadtest
    from capbalancer.loadtest.workloads import SyntheticWorkload, parse_length
    result = await run_loadtest(LoadtestConfig(url="http://127.0.0.1:8000",
        workload=SyntheticWorkload(parse_length("512"), parse_length("128")), request_rate_per_s=4,
        num_requests=100))
    print(result.summary["p99_ttft_ms"])
"""
