"""The training stage: trial configs from the spec (``config``, ``trials``), the Ray Tune sweep that stops each
trial at the capability target (``sweep``), the Ray Train shell (``loop``) around the Ray-free training loop
(``core``), and the DeepSpeed engine and checkpoints (``model``, ``ds_config``)."""
