"""The evaluation stage: re-measure each kept checkpoint's capability and run the safety suites through a Ray
Serve pool of generation engines (``stage``, ``stream`` for evaluating while training), fan requests out and
judge the answers (``fan_out``, ``panel``), which model serves each checkpoint (``targets``), the engines
(``engines``, ``vllm_engine``), the pool itself (``serve_pool``, ``pool_client``) and its OpenAI-compatible
HTTP API (``http_api``)."""
